"""The miniature lab: its synthetic suite (lab/tasks.py), its bundled checkpoint
(lab/tiny-t5/, made by lab/make_tiny_t5.py) and its one-command comparison (lab/run.py)."""

import json
import random
import sys
from pathlib import Path

import pytest
import torch

import checks
import data
import evaluate
import model as model_lib
from lab import tasks as lab_tasks
from support import dataset_files

ROOT = Path(__file__).resolve().parent.parent
BUNDLED = ROOT / "lab" / "tiny-t5"


# --------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------


def test_suite_has_at_least_eight_tasks_in_at_least_four_output_formats():
    tasks = [data.get_task(n) for n in lab_tasks.TASK_NAMES]
    assert len(tasks) >= 8
    assert len({t.format for t in tasks}) >= 4
    assert {t.metric for t in tasks} == {"accuracy", "exact_match", "bleu", "rouge2"}


def test_generators_are_deterministic_given_the_seed():
    for name in lab_tasks.TASK_NAMES:
        first = lab_tasks.generate(name, "validation", 50, seed=3)
        again = lab_tasks.generate(name, "validation", 50, seed=3)
        other = lab_tasks.generate(name, "validation", 50, seed=4)
        assert [(e.fields, e.targets) for e in first] == [(e.fields, e.targets) for e in again]
        assert [e.fields for e in first] != [e.fields for e in other]


def test_a_smaller_split_is_a_prefix_of_a_larger_one():
    small = lab_tasks.generate("lab_who", "train", 30)
    large = lab_tasks.generate("lab_who", "train", 300)
    assert [e.fields for e in small] == [e.fields for e in large[:30]]


def test_train_validation_and_test_splits_are_disjoint():
    for name in lab_tasks.TASK_NAMES:
        keys = {
            split: {json.dumps(e.fields, sort_keys=True) for e in lab_tasks.generate(name, split)}
            for split in lab_tasks.SPLITS
        }
        assert len(keys["train"]) == lab_tasks.SIZES["train"], (
            f"{name}: duplicate training examples"
        )
        assert not keys["train"] & keys["validation"], name
        assert not keys["train"] & keys["test"], name
        assert not keys["validation"] & keys["test"], name


def test_answers_are_the_label_words_and_true_false_only_where_the_format_says():
    for name in lab_tasks.TASK_NAMES:
        task = data.get_task(name)
        answers = {e.targets[0] for e in lab_tasks.generate(name, "train", 500)}
        if task.label_words:
            assert answers == set(task.label_words), name  # every class occurs, nothing else
        if "True" not in (task.label_words or ()):
            assert not answers & {"True", "False"}, name


def test_lookup_answers_are_read_off_the_input():
    """The multiple choice and the short answers need no memorised fact (issue 16): the answer
    is the one word of the input in a fixed relation to a fixed marker, and there are distractors."""
    for ex in lab_tasks.generate("lab_kind", "train", 300):
        options = [ex.fields[f"option_{letter}"] for letter in "abcd"]
        assert [o in lab_tasks.ANIMALS for o in options].count(True) == 1
        assert options["ABCD".index(ex.targets[0])] in lab_tasks.ANIMALS
    for name, kind, cue in (
        ("lab_who", lab_tasks.NAMES, " has "),
        ("lab_where", lab_tasks.CITIES, "lives in "),
    ):
        for ex in lab_tasks.generate(name, "train", 300):
            question = ex.fields["question"]
            words = question.replace(".", " ").replace("?", " ").split()
            candidates = [w for w in words[:-4] if w in kind]  # the two facts, not the question
            assert len(candidates) == 2 and ex.targets[0] in candidates, question
            sentence = next(s for s in question.split(". ") if ex.targets[0] in s)
            assert cue in sentence, question


def test_registered_task_and_written_jsonl_task_give_the_same_model_inputs(tmp_path):
    """promot.py / evaluate.py read the written files; tests and make_tiny_t5 use the registry."""
    lab_tasks.write_suite(tmp_path, sizes={"train": 40, "validation": 10, "test": 10})
    for name in lab_tasks.TASK_NAMES:
        spec = json.loads((tmp_path / name / "task.json").read_text())
        written = data.Task(name=name, template=spec["template"], metric=spec["metric"])
        rows = data.examples_reader(dataset_files.jsonl_task_reader(name))(tmp_path, "test")
        demo_rows = data.examples_reader(dataset_files.jsonl_task_reader(name))(tmp_path, "train")[
            :2
        ]
        queries = lab_tasks.generate(name, "test", 10)
        demos = lab_tasks.generate(name, "train", 2)
        assert [data.make_input(written, r, demo_rows) for r in rows] == [
            data.make_input(data.get_task(name), q, demos) for q in queries
        ]
        assert [r.targets for r in rows] == [q.targets for q in queries]
        assert spec["metric"] == data.get_task(name).metric


# --------------------------------------------------------------------------
# The bundled checkpoint
# --------------------------------------------------------------------------


def test_bundled_checkpoint_is_in_the_public_layout_and_under_20_mb():
    names = {p.name for p in BUNDLED.iterdir()}
    assert {"config.json", "model.safetensors", "spiece.model"} <= names
    assert sum(p.stat().st_size for p in BUNDLED.iterdir()) <= 20 * 2**20
    config = json.loads((BUNDLED / "config.json").read_text())
    assert config["feed_forward_proj"] == "gated-gelu" and config["tie_word_embeddings"] is False


@pytest.fixture(scope="module")
def bundled():
    t5 = model_lib.load_pretrained(str(BUNDLED)).eval()
    tokenizer = data.Tokenizer(BUNDLED / "spiece.model")
    checks.check_tokenizer_fits(tokenizer, t5.config.vocab_size)
    return t5, tokenizer


# Scores (0-100) the bundled model must reach on 64 test examples, greedy, from the
# template alone (0-shot) and with one demonstration: at least lab_tasks.CHANCE + 30 for
# the classification and short-answer tasks (issue 16), 90 for the generation tasks.
# Measured with the committed checkpoint (0-shot / 1-shot): lab_owns 90.6 / 95.3,
# lab_both 90.6 / 92.2, lab_lives 85.9 / 89.1, the three lookups and the three generation
# tasks 100 / 100.
REQUIRED = {
    "lab_owns": 85,
    "lab_both": 85,
    "lab_lives": 75,
    "lab_kind": 90,
    "lab_who": 90,
    "lab_where": 90,
    "lab_zorbish": 90,
    "lab_backwards": 90,
    "lab_news": 90,
}


def score_bundled(bundled, name, shots=1, n=64):
    t5, tokenizer = bundled
    return evaluate.score_task(
        t5,
        tokenizer,
        data.get_task(name),
        lab_tasks.generate(name, "test", n),
        pool=lab_tasks.generate(name, "train", 200),
        shots=shots,
        num_beams=1,
        max_new_tokens=32,
        batch_size=32,
    )


@pytest.mark.parametrize("shots", (0, 1))
@pytest.mark.parametrize("name", lab_tasks.TASK_NAMES)
def test_bundled_model_does_every_task_from_template_and_demonstration(bundled, shots, name):
    required = REQUIRED[name]
    assert required >= lab_tasks.CHANCE[name] + 30
    result = score_bundled(bundled, name, shots=shots)
    assert result["score"] >= required, [
        (r["input"][-80:], r["raw_output"]) for r in result["examples"][:3]
    ]


@pytest.mark.parametrize("name", [n for n in lab_tasks.TASK_NAMES if data.get_task(n).label_words])
def test_bundled_model_answers_classification_tasks_with_their_label_words(bundled, name):
    """The format, at least, is learned everywhere: every answer is one of the task's label words."""
    result = score_bundled(bundled, name, n=32)
    labels = set(data.get_task(name).label_words)
    assert all(r["prediction"] in labels for r in result["examples"]), [
        r["raw_output"] for r in result["examples"][:5]
    ]


# --------------------------------------------------------------------------
# The pretraining script
# --------------------------------------------------------------------------


def test_pretraining_batches_mix_tasks_and_give_demonstrations_only_when_asked(monkeypatch):
    from lab import make_tiny_t5 as make

    assert make.SEQUENCE_TASKS == {"lab_zorbish", "lab_backwards", "lab_news"}
    assert make.LOOKUP_TASKS == {"lab_kind", "lab_who", "lab_where"}
    pools = {n: lab_tasks.generate(n, "train", 50) for n in lab_tasks.TASK_NAMES}
    mixture = data.Mixture(
        pools,
        rates={
            n: 0.5 if n in make.SEQUENCE_TASKS else 2.0 if n in make.LOOKUP_TASKS else 1.0
            for n in pools
        },
    )
    asked = []  # (task of the example, number of demonstrations it gets)
    choose = data.choose_demonstrations

    def spy(example, pool, k, seed=0):
        asked.append((next(n for n in pools if pool is pools[n]), k))
        return choose(example, pool, k, seed=seed)

    monkeypatch.setattr(data, "choose_demonstrations", spy)
    rng = random.Random(0)
    groups = make.batch_groups(mixture, pools, rng, 256, max_shots=0)
    assert sum(len(rows) for rows in groups.values()) == 256 and set(groups) == set(pools)
    # the zero-shot phase: none, except one for the fine-tuning task (pretrained only with shots)
    assert {(n, k) for n, k in asked} == {(n, 1 if n in make.FEW_SHOT_ONLY else 0) for n in pools}
    for name, rows in groups.items():  # each group holds its own task's prompts, 0-shot here
        targets = {data.make_target(data.get_task(name), e) for e in pools[name]}
        assert all(y in targets and x.endswith("<extra_id_0>") for x, y in rows), name
    counts = {n: sum(1 for m, _ in asked if m == n) for n in pools}
    plain = sum(counts[n] for n in ("lab_owns", "lab_both", "lab_lives"))  # rate 1
    assert (
        sum(counts[n] for n in make.SEQUENCE_TASKS) < 0.75 * plain
    )  # drawn at half rate (expected 0.5)
    assert (
        sum(counts[n] for n in make.LOOKUP_TASKS) > 1.5 * plain
    )  # and at twice the rate (expected 2)
    # --fine-tuning-task-rate 0 (the bundled checkpoint's second run) leaves lab_owns out
    no_owns = data.Mixture(
        pools, rates={n: 0.0 if n == lab_tasks.FINE_TUNING_TASK else 1.0 for n in pools}
    )
    assert lab_tasks.FINE_TUNING_TASK not in make.batch_groups(
        no_owns, pools, rng, 256, max_shots=0
    )
    asked.clear()
    make.batch_groups(mixture, pools, rng, 256, max_shots=4)
    assert {k for _, k in asked} == {0, 1, 2, 3, 4}
    assert min(k for n, k in asked if n in make.FEW_SHOT_ONLY) == 1


def test_pretraining_script_writes_a_loadable_checkpoint(tmp_path):
    from lab import make_tiny_t5 as make

    out = tmp_path / "tiny"
    # --threads 1: main() sets the thread count of this process, and later tests compare
    # in-process training bitwise with 1-thread subprocesses (conftest sets 1 thread)
    threads = torch.get_num_threads()
    make.main(
        [
            "--out",
            str(out),
            "--threads",
            "1",
            "--steps",
            "4",
            "--d-model",
            "32",
            "--d-ff",
            "64",
            "--layers",
            "1",
            "--heads",
            "2",
            "--warmup",
            "2",
            "--zero-shot-steps",
            "0.5",
            "--eval-every",
            "0",
            "--eval-examples",
            "2",
            "--log-every",
            "2",
        ]
    )
    assert torch.get_num_threads() == threads
    record = json.loads((out / "pretraining.json").read_text())
    assert [h["step"] for h in record["loss_history"]] == [2, 4]
    assert all(h["loss"] > 0 for h in record["loss_history"])
    t5 = model_lib.load_pretrained(str(out))
    checks.check_tokenizer_fits(data.Tokenizer(out / "spiece.model"), t5.config.vocab_size)
    assert t5.config.d_model == 32 and record["parameters"] == sum(
        p.numel() for p in t5.parameters()
    )


# --------------------------------------------------------------------------
# The comparison, shortened
# --------------------------------------------------------------------------


def test_lab_run_quick_goes_through_stage_1_stage_2_finetune_and_evaluate_and_writes_the_table(
    tmp_path, capsys
):
    from lab import run as lab_run

    table = lab_run.main(
        [
            "--quick",
            "--steps",
            "3",
            "--eval-examples",
            "6",
            "--out",
            str(tmp_path / "run"),
            "--quiet",
        ]
    )
    assert list(table) == list(lab_run.METHODS)
    numbers = [
        line.split(" $ ")[0] for line in capsys.readouterr().out.splitlines() if " $ " in line
    ]
    assert numbers == [f"[{k}/{lab_run.COMMANDS}]" for k in range(1, 13)]  # each command, once
    for row in table.values():
        assert 0 <= row["true_false_ratio"] <= 100 and 0 <= row["norm_avg"] <= 100
        assert set(lab_tasks.TASK_NAMES) <= set(row)
    text = (tmp_path / "run" / "table.md").read_text()
    assert "Norm. Avg." in text and "ProMoT + 1-shot" in text
    # the table in the form docs/lab.md holds, which bench/lab_table.py compares cell for cell
    sys.path.insert(0, str(ROOT / "bench"))
    import lab_table

    assert lab_table.differences(text.splitlines(), text.splitlines()) == []
    assert lab_table.tables("seed 0:\n\n" + text)[0] == ("seed 0:", text.splitlines())
    # its recipe (lab/tiny-t5/recipe.json, the flagless promot.py's) with --quick's changes
    recorded = json.loads((tmp_path / "run" / "table.json").read_text())["settings"]["recipe"]
    assert recorded["prompt"]["lr"] == 0.2 and recorded["model"]["lr"] == 1e-2
    assert recorded["model"]["steps"] == 3 and recorded["every stage"]["batch_size"] == 16
    # The diagnostics of standard fine-tuning and ProMoT's stage 2: probes and gradient
    # alignment before the first step and after the last (3), drawn by `evaluate.py plot`.
    figures = tmp_path / "run" / "figures"
    for run_name in ("finetune", "promot"):
        records = [
            json.loads(line)
            for line in (tmp_path / "run" / run_name / "diagnostics.jsonl").read_text().splitlines()
        ]
        kinds = {(r.get("kind"), r.get("step")) for r in records}
        assert {("probe", 0), ("probe", 3), ("alignment", 0), ("alignment", 3)} <= kinds, kinds
    for name in ("in_context.csv", "alignment.csv"):
        rows = (figures / name).read_text().splitlines()
        assert len(rows) > 2 and all(
            t in (figures / "in_context.csv").read_text() for t in lab_run.PROBE_TASKS
        )
    # Prompt tuning leaves the model untouched: tasks of other formats see no prompt, so
    # they score exactly as the pretrained model does (paper §4, prompt routing).
    for name in lab_run.OTHER_FORMAT_TASKS:
        assert table["prompt_tuning"][name] == table["pretrained"][name]


def test_lab_table_shows_the_fine_tuned_task_0_shot_when_a_plus_1_shot_run_also_scored_it_1_shot():
    """evaluate.py scores a +1-shot run's task 0- and 1-shot (training.json); the lab's row is 0-shot."""
    from lab import run as lab_run

    runs = [
        {"task": "lab_owns", "role": "fine-tuned", "shots": 0, "score": 70.0},
        {"task": "lab_owns", "role": "fine-tuned", "shots": 1, "score": 90.0},
    ]
    runs += [
        {"task": t, "role": "evaluation", "shots": 1, "score": 50.0, "format_ratio": 0.0}
        for t in lab_run.EVALUATION_TASKS
    ]
    table = lab_run.summarize({"promot_1shot": {"runs": runs, "norm_avg": {"1": 50.0}}})
    assert table["promot_1shot"]["lab_owns"] == 70.0


def test_bench_lab_table_names_each_cell_that_differs_from_the_published_table(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import lab_table

    published = [
        "| | Pretrained | ProMoT |",
        "|---|---|---|",
        "| **Norm. Avg.** | 97.5 | 83.4 |",
        "| lab_who (exact_match) | 100.0 | 98.4 |",
    ]
    run = published[:2] + ["| **Norm. Avg.** | 97.5 | 81.0 |", published[3]]
    assert lab_table.differences(published, run) == [
        "**Norm. Avg.** | ProMoT: published 83.4, this run 81.0"
    ]
    docs = "Seed 1:\n\n" + "\n".join(run) + "\n\nseed 0:\n\n" + "\n".join(published) + "\n"
    (tmp_path / "lab.md").write_text(docs, encoding="utf-8")
    assert lab_table.published(tmp_path / "lab.md", published[0], 0) == published
    assert lab_table.published(tmp_path / "lab.md", published[0], 1) == run


def test_the_lab_figure_is_titled_with_the_model_it_ran(tmp_path, monkeypatch):
    """figure.png's title names the model (lab/run.py's model_name), not a panel's title."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from lab import run as lab_run

    titles = []
    monkeypatch.setattr(Figure, "suptitle", lambda self, t, **kw: titles.append(t))
    row = {lab_run.FINE_TUNING_TASK: 90.0, "norm_avg": 80.0, "true_false_ratio": 5.0}
    table = {method: dict(row) for method in lab_run.METHODS}
    assert lab_run.figure(table, tmp_path / "figure.png", "tiny-llama (llama)")
    assert titles == ["tiny-llama (llama)"] and (tmp_path / "figure.png").stat().st_size > 0
