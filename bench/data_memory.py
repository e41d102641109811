"""Peak memory and wall time of a short training run on a large train file (issue #13).

Writes a WMT14 En-Fr-layout train.jsonl ({"translation": {"en": ..., "fr": ...}})
of --pairs pairs, about 200 bytes a pair (606 MB for 3M; the real export's
3M pairs take 505 MB), and one a tenth of that size. For each it times
data.load_split (building the index, then opening it and reading examples at
random) and runs a 2-step stage-1 promot.py with the bundled tiny model
(lab/tiny-t5) on task wmt14_enfr (the real reader): with no index yet, with
the index, with --train-examples. Each run is a fresh process; its peak
resident memory comes from wait4. The goal: at most 800 MB and under 2
minutes for 3M pairs, and a cost per pair that does not grow with the file.

    python bench/data_memory.py [--pairs 3000000] [--dir FOLDER]   # --dir keeps the files
"""

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
EN = (
    "the european parliament session resumed on friday and we wish you a happy new year in the hope "
    "that members will enjoy festive period commission council report vote debate president"
).split()
FR = (
    "la session du parlement europeen reprise le vendredi et nous vous souhaitons une bonne annee dans "
    "espoir que les membres conseil commission rapport vote debat president"
).split()


def write_train_file(path, pairs, seed=0):
    """`pairs` lines of the `datasets` export of wmt14 fr-en, 8-20 words a side."""
    rng = random.Random(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(pairs):
            k = rng.randint(8, 20)
            en, fr = " ".join(rng.choices(EN, k=k)), " ".join(rng.choices(FR, k=k))
            f.write(f'{{"translation": {{"en": "{en}", "fr": "{fr}"}}}}\n')


def run_promot(data_dir, out, *extra):
    """(wall seconds, peak RSS in MB) of one 2-step stage-1 run in a fresh process."""
    cmd = [
        sys.executable,
        os.path.join(ROOT, "promot.py"),
        "--stage",
        "1",
        "--model",
        os.path.join(ROOT, "lab", "tiny-t5"),
        "--data-dir",
        data_dir,
        "--task",
        "wmt14_enfr",
        "--out",
        out,
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--prompt-length",
        "20",
        "--no-eval",
        "--log-every",
        "1",
        *extra,
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"promot.py failed:\n{output[-3000:]}")
    return wall, usage.ru_maxrss / 1024  # Linux reports KiB


LOADING = r"""
import random, sys, time
sys.path[:0] = [{root!r}]
import data

def peak_mb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) / 1024

before, start = peak_mb(), time.perf_counter()
examples = data.load_split("wmt14_enfr", {data_dir!r}, "train")
opened = time.perf_counter() - start
picks = random.Random(0).sample(range(len(examples)), 20000)
start = time.perf_counter()
for i in picks:
    examples[i]
print(opened, (time.perf_counter() - start) / len(picks), peak_mb() - before)
"""


def time_loading(data_dir):
    """(seconds to open the train split, seconds to read one example at random, MB of peak memory
    that opening and 20,000 reads add), in a fresh process."""
    child = LOADING.format(root=ROOT, data_dir=data_dir)
    out = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, check=True
    ).stdout
    return tuple(float(x) for x in out.split())


def remove_indexes(folder):
    for name in os.listdir(folder):
        if name.endswith(".index"):
            os.remove(os.path.join(folder, name))


def bench_size(root, pairs, train_examples):
    data_dir = os.path.join(root, f"data_{pairs}")
    path = os.path.join(data_dir, "wmt14_enfr", "train.jsonl")
    if not os.path.isfile(path):
        start = time.perf_counter()
        write_train_file(path, pairs)
        print(f"  (wrote {pairs:,} pairs in {time.perf_counter() - start:.0f} s)", flush=True)
    folder = os.path.dirname(path)
    remove_indexes(folder)
    build, _, build_mb = time_loading(data_dir)
    opened, read, read_mb = time_loading(data_dir)
    print(
        f"{pairs:>11,} {os.path.getsize(path) / 2**20:8.0f}  data.load_split: {build:.1f} s and "
        f"+{build_mb:.0f} MB to index ({build / pairs * 1e6:.1f} us a pair); then {opened * 1e3:.1f} ms to open, "
        f"{read * 1e6:.0f} us an example read at random, +{read_mb:.1f} MB for 20,000 reads",
        flush=True,
    )
    rows = {"indexing": (build, read)}
    for label, extra, cold in [
        ("no index yet, all pairs", (), True),
        ("index built, all pairs", (), False),
        (
            f"index built, --train-examples {train_examples}",
            ("--train-examples", str(train_examples)),
            False,
        ),
        (
            f"no index yet, --train-examples {train_examples}",
            ("--train-examples", str(train_examples)),
            True,
        ),
    ]:
        if cold:
            remove_indexes(folder)
        out = os.path.join(root, f"run_{pairs}_{len(rows)}")
        if os.path.isdir(out):
            shutil.rmtree(out)
        rows[label] = run_promot(data_dir, out, *extra)
        wall, rss = rows[label]
        print(
            f"{pairs:>11,} {os.path.getsize(path) / 2**20:8.0f}  {label:40s} {wall:7.1f} {rss:9.0f}",
            flush=True,
        )
    return rows


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--pairs",
        type=int,
        default=3_000_000,
        help="pairs in the large file; the small has a tenth",
    )
    ap.add_argument(
        "--train-examples", type=int, default=5000, help="the --train-examples of the sampled runs"
    )
    ap.add_argument(
        "--dir",
        default=None,
        help="folder for the files (kept; reused when present) [a temporary one]",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.dir or tmp
        print(
            f"{'pairs':>11} {'file MB':>8}  {'run (2 steps of stage 1, tiny model)':40s} {'wall s':>7} "
            f"{'peak MB':>9}",
            flush=True,
        )
        results = {
            n: bench_size(root, n, args.train_examples) for n in (args.pairs // 10, args.pairs)
        }
    small, large = sorted(results)
    for n in (small, large):
        build, read = results[n].pop("indexing")
        print(
            f"cost per pair at {n:,} pairs: indexing {build / n * 1e6:.1f} us (once; later runs reuse the "
            f"index), reading {read * 1e6:.0f} us an example"
        )
    growth = max(r[1] for r in results[large].values()) - max(r[1] for r in results[small].values())
    print(
        f"largest peak of the training runs, {large:,} vs {small:,} pairs: {growth:+.0f} MB "
        "(the mixture's shuffled order takes 4 bytes a pair; the rest is run-to-run noise)"
    )


if __name__ == "__main__":
    main()
