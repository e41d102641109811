"""Does `python lab/run.py` still show what docs/lab.md claims, on this machine?

A check to run by hand after a change that may move the lab's numbers (not a CI test: a full run
takes minutes per seed).

    python bench/lab_table.py                          # seed 0: the claims, then every cell
    python bench/lab_table.py --seeds 0,1,2            # the claims on three seeds, and their spread
    python bench/lab_table.py --model lab/tiny-llama   # the decoder-only miniature's
    ATEN_CPU_CAPABILITY=default python bench/lab_table.py   # other CPU kernels (no AVX2/AVX-512)
    python bench/lab_table.py --table RUN/table.json   # a run that already exists
    python bench/lab_table.py --table R0/table.json R1/table.json R2/table.json  # their spread

Float results differ across CPUs (kernels, thread counts), and training amplifies the
difference, so the published cells are exact only on the machine that printed them. What the
docs claim is checked with a tolerance that holds elsewhere (CLAIMS): standard fine-tuning
forgets (the unseen tasks' Norm. Avg. at least 10 points below the pretrained model's), ProMoT
keeps most of it (at least 10 points above fine-tuning), both learn the fine-tuned task, and the
prompt-tuning column equals the pretrained one on the unseen tasks (the prompt is removed there).
The exit status is 1 when a claim fails; with --exact also when a cell differs from the table
docs/lab.md publishes for that seed (the one after a paragraph that says "seed N").
"""

import argparse
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cells(line):
    """The cells of one markdown table row, stripped."""
    return [c.strip() for c in line.strip().strip("|").split("|")]


def tables(text):
    """[(paragraph above, [row lines])] for every markdown table in `text`."""
    lines, found, i = text.splitlines(), [], 0
    while i < len(lines):
        if not lines[i].startswith("|"):
            i += 1
            continue
        above = i
        while above > 0 and not lines[above - 1].strip():  # the blank lines before the table
            above -= 1
        last = above
        while above > 0 and lines[above - 1].strip():
            above -= 1
        end = i
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        found.append(("\n".join(lines[above:last]), lines[i:end]))
        i = end
    return found


def published(docs, header, seed, model="lab/tiny-t5"):
    """The rows of the table in `docs` with this header row, after a paragraph naming the seed
    (and, for another model than lab/tiny-t5, naming the model)."""
    said = re.compile(rf"\bseed {seed}\b", re.IGNORECASE)
    name = Path(model).name
    for paragraph, rows in tables(docs.read_text(encoding="utf-8")):
        named = name in paragraph if name != "tiny-t5" else "tiny-llama" not in paragraph
        if cells(rows[0]) == cells(header) and said.search(paragraph) and named:
            return rows
    raise SystemExit(
        f"{docs}: no table with lab/run.py's header ({header.strip()}) after a paragraph "
        f"that says 'seed {seed}'"
    )


def differences(theirs, ours):
    """One line per cell that differs between two tables of the same layout (row lines)."""
    columns = cells(ours[0])
    if cells(theirs[0]) != columns:
        return [f"header: published {theirs[0].strip()}, this run {ours[0].strip()}"]
    rows = {cells(r)[0]: cells(r)[1:] for r in theirs[2:]}
    found = []
    for line in ours[2:]:
        label, values = cells(line)[0], cells(line)[1:]
        if label not in rows:
            found.append(f"{label}: not in the published table")
            continue
        for column, mine, theirs_ in zip(columns[1:], values, rows.pop(label)):
            if mine != theirs_:
                found.append(f"{label} | {column}: published {theirs_}, this run {mine}")
    found += [f"{label}: published, but not in this run's table" for label in rows]
    return found


# (what the docs say, the check on one seed's table.json "table"): the tolerances hold on other CPUs
LEARNED = 95.0  # the fine-tuned task after fine-tuning and after ProMoT (pretrained: ~90)
CLAIMS = [
    (
        "standard fine-tuning forgets: Norm. Avg. >= 10 points below the pretrained model's",
        lambda t: t["pretrained"]["norm_avg"] - t["finetune"]["norm_avg"] >= 10,
    ),
    (
        "ProMoT keeps most of it: Norm. Avg. >= 10 points above standard fine-tuning's",
        lambda t: t["promot"]["norm_avg"] - t["finetune"]["norm_avg"] >= 10,
    ),
    (
        f"the fine-tuned task is learned: >= {LEARNED} after fine-tuning and after ProMoT",
        lambda t: min(t["finetune"][TASK], t["promot"][TASK]) >= LEARNED,
    ),
    (
        "prompt tuning's unseen tasks are the pretrained model's (its prompt is removed there)",
        lambda t: t["prompt_tuning"]["norm_avg"] == t["pretrained"]["norm_avg"],
    ),
]
TASK = "lab_owns"
SPREAD = ("pretrained", "finetune", "promot", "promot_1shot")


def machine():
    """This machine in one line: CPU model, cores, torch, its CPU kernels and threads."""
    import os

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    kernels, threads = torch.backends.cpu.get_cpu_capability(), torch.get_num_threads()
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {kernels} kernels, "
        f"{threads} thread(s) per run (OMP_NUM_THREADS)"
    )


def run_lab(model, seed):
    """RUN/table.json of a fresh `python lab/run.py --model MODEL --seed SEED`."""
    out = Path(tempfile.mkdtemp(prefix="lab_table_")) / "run"
    command = [sys.executable, "lab/run.py", "--model", model, "--seed", str(seed), "--out", out]
    print("$ " + " ".join(map(str, command)), flush=True)
    subprocess.run([*map(str, command), "--quiet"], cwd=ROOT, check=True)
    return out / "table.json"


def check_claims(table, seed):
    """The failed claims of one seed's table, each printed with PASS or FAIL."""
    failed = []
    for claim, holds in CLAIMS:
        ok = holds(table)
        print(f"seed {seed}: {'PASS' if ok else 'FAIL'} {claim}")
        failed += [] if ok else [claim]
    return failed


def spread(tables, seeds):
    """A markdown table: Norm. Avg., the fine-tuned task and the True/False answers per method,
    one column per seed, then the mean [min, max] over the seeds."""
    names = dict(
        pretrained="Pretrained",
        finetune="Standard fine-tuning",
        promot="ProMoT",
        promot_1shot="ProMoT + 1-shot",
    )
    measures = {"norm_avg": "Norm. Avg.", TASK: TASK, "true_false_ratio": "True/False answers (%)"}
    columns = [f"seed {seed}" for seed in seeds] + ["mean [min, max]"]
    lines = ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for key, measure in measures.items():
        for method in SPREAD:
            values = [t[method][key] for t in tables]
            low, high, mean = min(values), max(values), statistics.mean(values)
            cells_ = [f"{v:.1f}" for v in values] + [f"{mean:.1f} [{low:.1f}, {high:.1f}]"]
            lines.append(f"| {measure}: {names[method]} | " + " | ".join(cells_) + " |")
    print(f"\nover {len(tables)} seeds:\n" + "\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0", help="comma-separated lab/run.py seeds")
    p.add_argument("--model", default="lab/tiny-t5", help="lab/run.py's --model")
    p.add_argument(
        "--table",
        nargs="+",
        help="table.json of existing lab/run.py runs (each with its own seed), instead of runs",
    )
    p.add_argument("--docs", default=str(ROOT / "docs" / "lab.md"), help="the published tables")
    p.add_argument(
        "--exact", action="store_true", help="also compare every cell with docs/lab.md's table"
    )
    args = p.parse_args(argv)
    print(f"machine: {machine()}", flush=True)
    runs = [(None, Path(t)) for t in args.table or ()]
    runs = runs or [(int(seed), None) for seed in args.seeds.split(",")]
    failed, tables, seeds = [], [], []
    for seed, path in runs:
        path = path or run_lab(args.model, seed)
        record = json.loads(path.read_text(encoding="utf-8"))
        seed, table = record["settings"]["seed"], record["table"]
        tables.append(table)
        seeds.append(seed)
        failed += check_claims(table, seed)
        if args.exact:
            ours = (path.parent / "table.md").read_text(encoding="utf-8").splitlines()
            ours = [line for line in ours if line.strip()]
            found = differences(published(Path(args.docs), ours[0], seed, args.model), ours)
            for line in found:
                print(f"seed {seed}: {line}")
            count = sum(len(cells(r)) - 1 for r in ours[2:])
            print(f"seed {seed}: {count - len(found)} of {count} cells as published")
            failed += found
    if len(tables) > 1:
        spread(tables, seeds)
    print("all claims hold" if not failed else f"{len(failed)} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
