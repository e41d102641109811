"""Streaming training data (issue #13): a split is read an example at a time through a
byte-offset index cached beside its file (support/dataset_files.py, `indexed_lines`).

The lazy split gives the examples the eager reader gives, `--train-examples` is a seeded
sample, a changed file is re-indexed and never read at stale offsets, the index is written
atomically, and a stopped and resumed run equals a straight one bit for bit. Memory is
measured by bench/data_memory.py, not here."""

import json
import multiprocessing
import os
import random
import tracemalloc

import pytest
import torch

import data
import promot
import promot_fixtures as pf
from support import dataset_files
from support.errors import DamagedFile

N = 30000  # lines: large enough that holding them would show, small enough for a second


@pytest.fixture(autouse=True, scope="module")
def stream_every_file():
    """These files are small; stream them as the real multi-GB ones are (the threshold is 32 MiB)."""
    threshold, dataset_files.STREAM_MIN_BYTES = dataset_files.STREAM_MIN_BYTES, 0
    yield
    dataset_files.STREAM_MIN_BYTES = threshold


def test_small_files_are_read_whole_and_leave_no_index(tmp_path):
    dataset_files.STREAM_MIN_BYTES = 1 << 20
    try:
        write_wmt(tmp_path, wmt_records(50))
        examples = data.load_split("wmt14_enfr", tmp_path, "train")
        assert (
            isinstance(examples, list)
            and len(examples) == 50
            and index_files(tmp_path / "wmt14_enfr") == []
        )
    finally:
        dataset_files.STREAM_MIN_BYTES = 0


def wmt_records(n, seed=0):
    rng = random.Random(seed)
    words = "the cat sat on a mat le chat assis sur un tapis".split()
    return [
        {
            "translation": {
                "en": " ".join(rng.choices(words, k=rng.randint(3, 12))) + f" #{i}",
                "fr": " ".join(rng.choices(words, k=rng.randint(3, 12))),
            }
        }
        for i in range(n)
    ]


def write_lines(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_wmt(data_dir, records, blank_every=0):
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    if blank_every:  # blank lines are skipped but still counted in the line numbers of errors
        lines = [
            x
            for i, line in enumerate(lines)
            for x in ([line, ""] if i % blank_every == 0 else [line])
        ]
    return write_lines(data_dir / "wmt14_enfr" / "train.jsonl", lines)


def pairs(examples):
    return [(e.fields, e.targets) for e in examples]


def index_files(folder):
    return sorted(
        p.name for p in folder.iterdir() if p.name.endswith(".index") or ".tmp-" in p.name
    )


# --- the same examples as the eager reader -------------------------------------------------


def test_a_streamed_split_equals_the_eager_parquet_reading_of_the_same_rows(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    records = wmt_records(N)
    write_wmt(tmp_path / "jsonl", records, blank_every=97)
    (tmp_path / "parquet/wmt14_enfr").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "parquet/wmt14_enfr/train.parquet")
    streamed = data.load_split("wmt14_enfr", tmp_path / "jsonl", "train")
    eager = data.load_split("wmt14_enfr", tmp_path / "parquet", "train")  # parquet is read whole
    assert isinstance(streamed, dataset_files.LazySequence) and len(streamed) == len(eager) == N
    assert pairs(streamed) == pairs(eager)
    assert pairs([streamed[-1], streamed[N // 2]]) == pairs([eager[-1], eager[N // 2]])
    assert pairs(streamed[10:13]) == pairs(eager[10:13])


def test_plain_text_parallel_files_stream_as_their_jsonl_export_does(tmp_path):
    records = wmt_records(N)
    write_wmt(tmp_path / "jsonl", records)
    folder = tmp_path / "text/wmt14_enfr"
    write_lines(folder / "train.en", [r["translation"]["en"] for r in records])
    write_lines(folder / "train.fr", [r["translation"]["fr"] for r in records])
    assert pairs(data.load_split("wmt14_enfr", tmp_path / "text", "train")) == pairs(
        data.load_split("wmt14_enfr", tmp_path / "jsonl", "train")
    )


def test_records_the_reader_drops_are_left_out_of_the_index(tmp_path):
    """SNLI's examples without a gold label: the eager reader dropped them, so does the index."""
    rows = [
        {"premise": f"p{i}", "hypothesis": "h", "label": -1 if i % 3 == 0 else i % 3}
        for i in range(300)
    ]
    write_lines(tmp_path / "snli/train.jsonl", [json.dumps(r) for r in rows])
    examples = data.load_split("snli", tmp_path, "train")
    assert [e.fields["premise"] for e in examples] == [
        r["premise"] for r in rows if r["label"] != -1
    ]
    assert [e.targets for e in examples][:2] == [["Neither"], ["False"]]


def test_a_bad_line_fails_at_loading_with_the_eager_reader_s_message(tmp_path):
    path = write_wmt(tmp_path, wmt_records(N), blank_every=1000)
    lines = path.read_text(encoding="utf-8").split("\n")
    lines[20000] = '{"translation": {"en": "x"}}'
    path.write_text("\n".join(lines), encoding="utf-8")
    # line numbers count the blank lines
    expected = f"task wmt14_enfr, split train: {path}:20001: missing field 'translation.fr'"
    with pytest.raises(DamagedFile) as err:
        data.load_split("wmt14_enfr", tmp_path, "train")
    assert str(err.value) == expected
    assert index_files(path.parent) == []  # nothing half-built is left behind


def test_a_loaded_split_holds_no_examples(tmp_path):
    write_wmt(tmp_path, wmt_records(N))
    data.load_split("wmt14_enfr", tmp_path, "train")  # builds the index
    tracemalloc.start()
    examples = data.load_split("wmt14_enfr", tmp_path, "train")
    for i in random.Random(0).sample(range(N), 1000):
        assert examples[i].targets
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    file_size = (tmp_path / "wmt14_enfr/train.jsonl").stat().st_size
    assert peak < file_size / 8, (peak, file_size)


# --- --train-examples: a seeded sample -----------------------------------------------------


def test_train_examples_is_a_seeded_sample_in_file_order(tmp_path):
    write_wmt(tmp_path, wmt_records(N))

    def sample(seed):
        return [
            e.fields["sentence"]
            for e in data.load_split("wmt14_enfr", tmp_path, "train", limit=500, seed=seed)
        ]

    first = [e.fields["sentence"] for e in data.load_split("wmt14_enfr", tmp_path, "train")[:500]]
    numbers = [int(s.rsplit("#", 1)[1]) for s in sample(0)]
    assert sample(0) == sample(0) != sample(1)
    assert len(set(numbers)) == 500 and numbers == sorted(numbers)
    assert sample(0) != first and max(numbers) > N // 2  # drawn from the whole file, not its head


def test_the_sample_does_not_depend_on_how_the_file_is_read(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    records = wmt_records(2000)
    write_wmt(tmp_path / "jsonl", records)
    (tmp_path / "parquet/wmt14_enfr").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "parquet/wmt14_enfr/train.parquet")
    assert pairs(
        data.load_split("wmt14_enfr", tmp_path / "jsonl", "train", limit=50, seed=3)
    ) == pairs(data.load_split("wmt14_enfr", tmp_path / "parquet", "train", limit=50, seed=3))


# --- a changed file is re-indexed, never read at stale offsets -----------------------------


def test_a_changed_file_is_re_indexed(tmp_path):
    path = write_wmt(tmp_path, wmt_records(N))
    assert len(data.load_split("wmt14_enfr", tmp_path, "train")) == N
    write_wmt(tmp_path, wmt_records(N + 5, seed=1))
    examples = data.load_split("wmt14_enfr", tmp_path, "train")
    assert len(examples) == N + 5
    assert examples[-1].targets == [wmt_records(N + 5, seed=1)[-1]["translation"]["fr"]]
    assert len(index_files(path.parent)) == 1  # the new index replaced the stale one


def test_an_edit_that_keeps_size_and_modification_time_is_still_caught(tmp_path):
    """A stale index would read at the old offsets; the hash of the file's ends tells them apart."""
    path = write_wmt(tmp_path, wmt_records(100))
    assert data.load_split("wmt14_enfr", tmp_path, "train")[0].fields["sentence"].endswith("#0")
    stat = path.stat()
    text = path.read_text(encoding="utf-8")  # line 1 one byte shorter, line 2 one longer: same size
    path.write_text(text.replace('#0"', '#"', 1).replace('#1"', '#1X"', 1), encoding="utf-8")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    examples = data.load_split("wmt14_enfr", tmp_path, "train")
    assert examples[0].fields["sentence"].endswith(" #") and examples[1].fields[
        "sentence"
    ].endswith(" #1X")


def test_reading_after_the_file_changed_raises_instead_of_reading_stale_offsets(tmp_path):
    path = write_wmt(tmp_path, wmt_records(1000))
    examples = data.load_split("wmt14_enfr", tmp_path, "train")
    examples[5]
    with open(path, "a", encoding="utf-8") as f:  # changed in place while a run holds it
        f.write(json.dumps(wmt_records(1)[0]) + "\n")
    with pytest.raises(DamagedFile, match="changed after its index .* was built; run again"):
        examples[5]


def test_an_index_for_another_reader_is_not_reused(tmp_path):
    path = write_lines(tmp_path / "x.jsonl", ['{"a": 1}', '{"a": 2}', '{"a": 3}'])
    odd = dataset_files.indexed_lines(path, "odd", lambda lineno, raw: lineno % 2 == 1)
    every = dataset_files.indexed_lines(path, "every", lambda lineno, raw: True)
    assert [n for n, _ in odd] == [1, 3] and [n for n, _ in every] == [1, 2, 3]
    assert every[1] == (2, b'{"a": 2}\n')


# --- the index is written atomically -------------------------------------------------------


def test_the_index_is_complete_before_it_appears_under_its_name(tmp_path, monkeypatch):
    path = write_wmt(tmp_path, wmt_records(N))
    seen = []
    real_replace = os.replace

    def replace(src, dst):  # at the moment of the rename: only the finished temporary file exists
        seen.append((os.path.exists(dst), os.path.getsize(src), str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    data.load_split("wmt14_enfr", tmp_path, "train")
    [(existed, size, src)] = seen
    assert not existed and ".tmp-" in src and size == 4096 + 16 * N
    [index] = index_files(path.parent)
    assert json.loads((path.parent / index).read_bytes()[:4096])["count"] == N


def test_a_cut_short_index_is_rebuilt(tmp_path):
    """What a crash would leave without the rename; the size check refuses it anyway."""
    path = write_wmt(tmp_path, wmt_records(1000))
    data.load_split("wmt14_enfr", tmp_path, "train")
    [name] = index_files(path.parent)
    index = path.parent / name
    index.write_bytes(index.read_bytes()[:-7])
    assert pairs(data.load_split("wmt14_enfr", tmp_path, "train")) == _eager_wmt(path)
    assert index.stat().st_size == 4096 + 16 * 1000


def _eager_wmt(path):
    return [
        ({"sentence": r["translation"]["en"]}, [r["translation"]["fr"]])
        for _, r in dataset_files.read_jsonl(path)
    ]


def _load_in_another_process(data_dir, queue):
    examples = data.load_split("wmt14_enfr", data_dir, "train")
    queue.put((len(examples), examples[123].targets))


def test_processes_indexing_one_file_at_once_build_it_once_and_agree(tmp_path, monkeypatch):
    """What torchrun's ranks do at start: one builds under the lock, the others wait and read it."""
    path = write_wmt(tmp_path, wmt_records(N))
    real_write = dataset_files._write_index

    def write(*args):  # forked processes inherit this: each build adds a line to builds.log
        with open(tmp_path / "builds.log", "a") as log:
            log.write(f"{os.getpid()}\n")
        return real_write(*args)

    monkeypatch.setattr(dataset_files, "_write_index", write)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    processes = [
        context.Process(target=_load_in_another_process, args=(tmp_path, queue)) for _ in range(3)
    ]
    for p in processes:
        p.start()
    results = [queue.get(timeout=120) for _ in processes]
    for p in processes:
        p.join(timeout=60)
    assert results == [(N, _eager_wmt(path)[123][1])] * 3
    assert len((tmp_path / "builds.log").read_text().split()) == 1
    assert len(index_files(path.parent)) == 1


def test_a_folder_it_cannot_write_sends_the_index_to_the_cache(tmp_path, monkeypatch):
    path = write_wmt(tmp_path / "data", wmt_records(100))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real_write = dataset_files._write_index

    def write(path_, data_, index, *rest):
        if index.parent == path.parent:
            raise PermissionError(13, "Permission denied")
        return real_write(path_, data_, index, *rest)

    monkeypatch.setattr(dataset_files, "_write_index", write)
    assert len(data.load_split("wmt14_enfr", tmp_path / "data", "train")) == 100
    assert (
        index_files(path.parent) == [] and len(index_files(tmp_path / "cache/promot/indexes")) == 1
    )


# --- training on a streamed split ----------------------------------------------------------


def test_the_mixture_order_is_random_shuffle_s_so_old_data_positions_still_hold():
    order = list(range(1000))
    random.Random("7/rte/2").shuffle(order)
    assert list(data.Mixture({"rte": list(range(1000))}, seed=7)._order("rte", 2)) == order


@pytest.fixture(scope="module")
def big_env(tmp_path_factory):
    """The promot fixtures' tiny model and toy_tf task, with a 5,000-example train file."""
    d = tmp_path_factory.mktemp("streaming")
    spiece = pf.make_spiece(str(d / "spiece"))
    data_dir = pf.make_data_dir(str(d / "data"), n_train=5000)
    return dict(model=pf.make_model_dir(str(d / "model"), spiece), data=data_dir, root=d)


def run_stage(env, out, *extra, steps=4):
    argv = [
        "--stage",
        "1",
        "--model",
        env["model"],
        "--data-dir",
        env["data"],
        "--task",
        "toy_tf",
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--save-every",
        "2",
        "--batch-size",
        "4",
        "--prompt-length",
        "5",
        "--log-every",
        "1",
        "--no-eval",
        "--train-examples",
        "300",
        "--seed",
        "5",
        *extra,
    ]
    return promot.train(promot.parse_args(argv))


def test_stop_and_resume_on_a_streamed_sample_equals_a_straight_run_bitwise(big_env):
    straight = run_stage(big_env, big_env["root"] / "straight")
    out = big_env["root"] / "cut"
    assert run_stage(big_env, out, "--stop-after-step", "3").step == 3
    resumed = run_stage(big_env, out, "--resume")
    assert resumed.step == 4
    assert isinstance(resumed.inputs["train_sets"][0], dataset_files.LazySequence)
    assert len(resumed.inputs["train_sets"][0]) == 300
    assert resumed.mixture.state_dict() == straight.mixture.state_dict()
    assert all(torch.equal(straight.prompts[n], resumed.prompts[n]) for n in straight.prompts)
