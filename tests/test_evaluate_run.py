"""The evaluation run end to end: a tiny random checkpoint, a SentencePiece model trained
here and small task files in the published layouts -> the paper's table and a JSON file in
which every number can be traced to its examples. Also the prompt-routing rule and the
errors a user can cause."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import data
import evaluate
import model as model_lib
from helpers import train_spiece, make_checkpoint
from support import prompt_formats
from support.errors import BadInput

WORDS = (
    "the a cat dog sat ran on in mat park premise question hypothesis Is it true or false neither "
    "answer: True False Neither Q: A: Who wrote Hamlet? Shakespeare Paris capital of France "
    "Translate English to German: Hello world Hallo Welt Article: One sentence summary: storm "
    "coast power lost The word is used same way two sentences bank river"
).split()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add contention on a shared CPU
    yield
    torch.set_num_threads(before)


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model dir, data dir, prompt file) for a tiny mT5-style model."""
    root = tmp_path_factory.mktemp("run")
    rng = random.Random(0)
    model_dir = root / "model"
    model_dir.mkdir()
    train_spiece(model_dir, [sentence(rng, 12) for _ in range(800)], 100)
    tokenizer = data.Tokenizer(model_dir / "spiece.model")
    make_checkpoint(str(model_dir), kind="mt5", vocab_size=tokenizer.vocab_size)

    d = root / "data"

    def nli(labels):
        return [
            {
                "premise": sentence(rng, 6),
                "hypothesis": sentence(rng, 4),
                "label": rng.choice(labels),
            }
            for _ in range(6)
        ]

    for name, labels in (("rte", (0, 1)), ("cb", (0, 1, 2))):
        write_jsonl(d / name / "train.jsonl", nli(labels))
        write_jsonl(d / name / "validation.jsonl", nli(labels))

    def wic():
        return [
            {
                "word": "bank",
                "sentence1": sentence(rng, 5),
                "sentence2": sentence(rng, 5),
                "label": rng.choice((0, 1)),
            }
            for _ in range(6)
        ]

    write_jsonl(d / "wic" / "train.jsonl", wic())
    write_jsonl(d / "wic" / "validation.jsonl", wic())

    def qa():
        return [
            {
                "question": sentence(rng, 4) + "?",
                "answer": {"value": "Paris", "aliases": ["paris", "Paris"]},
            }
            for _ in range(6)
        ]

    write_jsonl(d / "trivia_qa" / "train.jsonl", qa())
    write_jsonl(d / "trivia_qa" / "test.jsonl", qa())

    def mt():
        return [{"translation": {"en": sentence(rng, 5), "de": sentence(rng, 5)}} for _ in range(6)]

    write_jsonl(d / "wmt16_ende" / "train.jsonl", mt())
    write_jsonl(d / "wmt16_ende" / "test.jsonl", mt())

    def summ():
        return [
            {"document": sentence(rng, 20), "summary": sentence(rng, 6), "id": str(i)}
            for i in range(6)
        ]

    write_jsonl(d / "xsum" / "train.jsonl", summ())
    write_jsonl(d / "xsum" / "test.jsonl", summ())

    prompt_file = root / "prompt.safetensors"
    prompt = torch.rand(3, 32, generator=torch.Generator().manual_seed(0))
    save_file({"prompt.rte": prompt, "prompt": prompt.clone()}, str(prompt_file))
    # ProMoT's prompt (stage 2), routed by §4's rule (a stage-1 prompt: tests/test_route_by_stage.py)
    (root / "training.json").write_text(json.dumps({"stage": "2", "task": "rte", "shots": 0}))
    return model_dir, d, prompt_file


def common_args(setup, out, *extra):
    model_dir, data_dir, prompt_file = setup
    return [
        "--model",
        str(model_dir),
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
        "--eval-tasks",
        "cb,wic,trivia_qa,wmt16_ende,xsum",
        "--shots",
        "0,1",
        "--num-beams",
        "2",
        "--max-new-tokens",
        "5",
        "--eval-batch-size",
        "4",
        "--eval-examples",
        "5",
        *extra,
    ]


@pytest.fixture(scope="module")
def promot_run(setup, tmp_path_factory):
    """One run with the RTE prompt, and its stdout/stderr."""
    out = tmp_path_factory.mktemp("out") / "results.json"
    cap = {}
    import contextlib
    import io

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        cap["rc"] = evaluate.main(common_args(setup, out, "--prompt", str(setup[2])))
    return (
        out,
        json.loads(out.read_text(encoding="utf-8")),
        stdout.getvalue(),
        stderr.getvalue(),
        cap["rc"],
    )


# --- the run -----------------------------------------------------------------------------


def test_run_scores_the_fine_tuned_task_0_shot_and_every_task_at_every_shot(promot_run):
    _, results, _, _, rc = promot_run
    assert rc == 0 and results["format"] == evaluate.RESULTS_FORMAT
    got = [(r["task"], r["role"], r["shots"]) for r in results["runs"]]
    assert got[0] == ("rte", "fine-tuned", 0)
    assert sorted(got[1:]) == sorted(
        (t, "evaluation", k)
        for t in ("cb", "wic", "trivia_qa", "wmt16_ende", "xsum")
        for k in (0, 1)
    )


def test_by_default_the_prompt_goes_to_the_tasks_of_the_fine_tuned_tasks_format(promot_run):
    _, results, _, stderr, _ = promot_run
    used = {r["task"]: r["prompt"] for r in results["runs"]}
    # §4 and §5.3: CB and WiC "share the same format as the RTE fine-tuning task".
    assert used == {
        "rte": True,
        "wic": True,
        "cb": True,
        "trivia_qa": False,
        "wmt16_ende": False,
        "xsum": False,
    }
    assert {r["route"] for r in results["runs"]} == {"same_format"}  # the rule, on every row
    assert "evaluate.py: scoring with the prompt " in stderr
    assert "--route by_stage: same_format" in stderr


def test_every_score_can_be_recomputed_from_the_examples_in_the_json(promot_run):
    _, results, _, _, _ = promot_run
    for run in results["runs"]:
        task = data.get_task(run["task"])
        assert len(run["examples"]) == run["num_examples"] == 5
        for ex in run["examples"]:
            assert set(ex) == {"input", "raw_output", "prediction", "references"}
            assert ex["prediction"] == evaluate.postprocess(ex["raw_output"], task.label_words)
        preds = [ex["prediction"] for ex in run["examples"]]
        refs = [ex["references"] for ex in run["examples"]]
        assert run["score"] == pytest.approx(evaluate.compute_metric(run["metric"], preds, refs))
        if run["role"] == "evaluation":  # share of RTE-format answers (paper Fig. 2)
            assert run["format_ratio"] == pytest.approx(
                evaluate.format_ratio(preds, ("False", "True"))
            )


def test_inputs_in_the_json_are_the_k_shot_prompts_of_data_py(setup, promot_run):
    _, results, _, _, _ = promot_run
    data_dir = setup[1]
    run = next(r for r in results["runs"] if r["task"] == "trivia_qa" and r["shots"] == 1)
    queries = data.load_split("trivia_qa", data_dir, "test")[:5]
    expected = data.kshot_inputs(
        "trivia_qa", queries, data.load_split("trivia_qa", data_dir, "train"), 1, seed=0
    )
    assert [(ex["input"], ex["references"]) for ex in run["examples"]] == expected


def test_norm_avg_is_the_mean_of_the_evaluation_scores_per_shots(promot_run):
    _, results, _, _, _ = promot_run
    for k in (0, 1):
        scores = [
            r["score"] for r in results["runs"] if r["role"] == "evaluation" and r["shots"] == k
        ]
        assert results["norm_avg"][str(k)] == pytest.approx(sum(scores) / 5)


def test_table_has_the_papers_layout(promot_run):
    out, results, stdout, _, _ = promot_run
    lines = stdout.strip().splitlines()
    assert lines[0] == "| | 0-shot | 1-shot | split |"
    assert lines[2].startswith("| Fine-tuning rte (0-shot, accuracy; prompt) |")
    tasks = ("rte", "cb", "wic", "trivia_qa", "wmt16_ende", "xsum")
    split = {t: data.get_task(t).eval_split for t in tasks}
    assert lines[2].endswith(f" | {split['rte']} |")  # each row names the split it scored
    assert (
        lines[3]
        == f"| Norm. Avg. | {results['norm_avg']['0']:.2f} | {results['norm_avg']['1']:.2f} | |"
    )
    assert [(line.split(" |")[0], line.split(" | ")[-1]) for line in lines[4:9]] == [
        ("| cb (accuracy; prompt)", f"{split['cb']} |"),
        ("| wic (accuracy; prompt)", f"{split['wic']} |"),
        ("| trivia_qa (exact_match)", f"{split['trivia_qa']} |"),
        ("| wmt16_ende (bleu)", f"{split['wmt16_ende']} |"),
        ("| xsum (rouge2)", f"{split['xsum']} |"),
    ]
    assert lines[9:] == [
        "",
        "Note: rows marked prompt or LoRA were scored with it (--route by_stage: same_format).",
        f"results, every example included: {out}",
    ]


def test_a_plus_1_shot_run_reports_its_task_0_and_1_shot_and_says_which_chose_the_checkpoint(
    setup, tmp_path, capsys
):
    """A "+1-shot" run (§5.3) chose best/ on 0-shot validation scores (Table 2: "We use 0-shot in
    fine-tuning tasks"): training.json (promot's export) says so, and the table shows the
    fine-tuned task both ways, marking the one that chose."""
    folder = tmp_path / "best"
    folder.mkdir()
    (folder / "prompt.safetensors").write_bytes(setup[2].read_bytes())
    (folder / "training.json").write_text(
        json.dumps(
            {
                "stage": "1",
                "task": "rte",
                "shots": 1,
                "step": 3,
                "chosen_by": "validation score at 0-shot",
                "chosen_at_shots": 0,
            }
        )
    )
    argv = common_args(setup, tmp_path / "r.json", "--prompt", str(folder / "prompt.safetensors"))
    assert evaluate.main(with_flag(argv, "--eval-tasks", "cb")) == 0
    results = json.loads((tmp_path / "r.json").read_text())
    tuned = [
        (r["shots"], r["chose_checkpoint"], r["prompt"])
        for r in results["runs"]
        if r["role"] == "fine-tuned"
    ]
    assert tuned == [(0, True, True), (1, False, True)]
    table = capsys.readouterr().out
    assert "| Fine-tuning rte (0-shot, accuracy; prompt; chose the checkpoint) |" in table
    assert "| Fine-tuning rte (1-shot, accuracy; prompt) |" in table
    cb = {r["shots"]: r["score"] for r in results["runs"] if r["task"] == "cb"}
    assert results["norm_avg"]["1"] == evaluate.normalized_average(
        [cb[1]]
    )  # the fine-tuned rows stay out
    assert evaluate.main(with_flag(argv, "--eval-tasks", "cb") + ["--task-shots", "0"]) == 0
    assert [
        r["shots"]
        for r in json.loads((tmp_path / "r.json").read_text())["runs"]
        if r["role"] == "fine-tuned"
    ] == [0]


@pytest.mark.parametrize("content", ['{"shots": "1"', '{"shots": "1"}', '{"shots": -1}'])
def test_a_damaged_training_json_is_one_line_before_any_scoring(setup, tmp_path, capsys, content):
    folder = tmp_path / "best"
    folder.mkdir()
    (folder / "prompt.safetensors").write_bytes(setup[2].read_bytes())
    (folder / "training.json").write_text(content)
    argv = common_args(setup, tmp_path / "r.json", "--prompt", str(folder / "prompt.safetensors"))
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(f"evaluate.py: error: {folder / 'training.json'}") and err.count("\n") == 1
    ), err
    assert ("malformed JSON" if content.count("{") > content.count("}") else "a number >= 0") in err
    assert not (tmp_path / "r.json").exists()


def with_flag(argv, flag, value):
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def test_progress_line_reports_examples_per_second_and_eta(promot_run):
    _, _, _, stderr, _ = promot_run
    assert "trivia_qa 1-shot: 5/5 examples," in stderr and "examples/s, ETA" in stderr
    assert "cb 1-shot +prompt: 5/5 examples," in stderr


def test_baseline_adds_the_norm_avg_difference(setup, promot_run, tmp_path, capsys):
    baseline_out, baseline, _, _, _ = promot_run
    out = tmp_path / "plain.json"
    assert (
        evaluate.main(common_args(setup, out, "--baseline", str(baseline_out), "--route", "never"))
        == 0
    )
    ours = json.loads(out.read_text())
    assert not any(r["prompt"] for r in ours["runs"])
    norm_line = next(
        line for line in capsys.readouterr().out.splitlines() if line.startswith("| Norm. Avg.")
    )
    diff = ours["norm_avg"]["1"] - baseline["norm_avg"]["1"]
    assert f"{ours['norm_avg']['1']:.2f} ({diff:+.2f})" in norm_line


def test_a_100k_character_input_is_cut_to_the_default_budget_of_1024_tokens(
    setup, monkeypatch, capsys
):
    model_dir, _, _ = setup
    tokenizer = data.Tokenizer(model_dir / "spiece.model")
    t5 = model_lib.load_pretrained(str(model_dir))
    widths = []
    monkeypatch.setattr(
        evaluate,
        "generate",
        lambda model, ids, mask, **kw: (
            widths.append(ids.shape[1])
            or torch.tensor([tokenizer.encode("<extra_id_0> Paris <extra_id_1>")] * len(ids))
        ),
    )
    huge = data.Example({"question": sentence(random.Random(1), 20000)}, ["Paris"])
    assert len(huge.fields["question"]) > 100_000
    end = evaluate.score_task(t5, tokenizer, "trivia_qa", [huge])  # no --max-input-tokens: 1024
    fair = evaluate.score_task(t5, tokenizer, "trivia_qa", [huge], truncation="fair")
    assert widths[0] == 1024 and 1000 < widths[1] <= 1024  # T5X's cut: the first 1023 ids and EOS
    cut = {"max_input_tokens": 1024, "inputs": 1, "trimmed": 1}  # the results say what was cut
    assert end["truncation"] == {**end["truncation"], **cut, "rule": "end"}
    assert fair["truncation"] == {**fair["truncation"], **cut, "rule": "fair"}
    assert end["truncation"]["tokens_removed"] > 10_000
    assert (
        fair["examples"][0]["input"].endswith(" A: <extra_id_0>")
        and fair["score"] == end["score"] == 100.0
    )
    assert capsys.readouterr().err.count("trivia_qa, 0-shot, max 1024 tokens") == 2


def test_the_cli_defaults_are_the_papers_decoding_cut_and_routing(tmp_path):
    args = evaluate.parse_args(
        ["--model", "m", "--data-dir", "d", "--out", str(tmp_path / "r.json")]
    )
    assert (args.num_beams, args.length_rule, args.length_penalty) == (
        4,
        "t5x",
        0.6,
    )  # App. B.4, T5X
    assert (args.truncation, args.max_input_tokens, args.route) == ("end", None, "by_stage")


def test_score_task_turns_a_fixed_answer_into_the_expected_scores(setup, monkeypatch):
    # A model that always answers "<extra_id_0> Paris Q: ... <extra_id_1>": the B.2 cut
    # leaves "Paris", which is every TriviaQA reference here and no CB label.
    model_dir, data_dir, _ = setup
    tokenizer = data.Tokenizer(model_dir / "spiece.model")
    t5 = __import__("model").load_pretrained(str(model_dir))
    answer = tokenizer.encode("<extra_id_0> Paris Q: the cat <extra_id_1>")
    monkeypatch.setattr(
        evaluate, "generate", lambda model, ids, mask, **kw: torch.tensor([answer] * len(ids))
    )
    qa = evaluate.score_task(
        t5, tokenizer, "trivia_qa", data.load_split("trivia_qa", data_dir, "test"), shots=0
    )
    assert qa["score"] == 100.0 and {ex["prediction"] for ex in qa["examples"]} == {"Paris"}
    cb = evaluate.score_task(
        t5,
        tokenizer,
        "cb",
        data.load_split("cb", data_dir, "validation"),
        shots=0,
        format_label_words=("Paris",),
    )
    assert cb["score"] == 0.0 and cb["format_ratio"] == 100.0
    answer[:] = tokenizer.encode("<extra_id_0> True <extra_id_1>")
    examples = data.load_split("cb", data_dir, "validation")
    cb = evaluate.score_task(t5, tokenizer, "cb", examples, shots=0)
    true_share = 100 * sum(e.targets == ["True"] for e in examples) / len(examples)
    assert 0 < true_share < 100 and cb["score"] == pytest.approx(true_share)


# --- the routing rule --------------------------------------------------------------------


@pytest.mark.parametrize(
    "task, route, expected",
    [
        ("rte", "fine_tuned_only", True),
        ("wic", "fine_tuned_only", False),
        ("wic", "same_answers", True),
        ("cb", "same_answers", False),
        ("cb", "same_format", True),
        ("trivia_qa", "same_format", False),
        ("trivia_qa", "always", True),
        ("rte", "never", False),
    ],
)
def test_route_prompt_follows_the_chosen_reading(task, route, expected):
    prompt = torch.zeros(2, 4)
    assert (evaluate.route_prompt(task, {"rte": prompt}, route) is prompt) == expected


def test_route_prompt_picks_each_tasks_own_prompt_in_multi_task_promot():
    rte, wmt = torch.zeros(2, 4), torch.ones(2, 4)
    prompts = {"rte": rte, "wmt14_enfr": wmt}
    assert (
        evaluate.route_prompt("rte", prompts) is rte
        and evaluate.route_prompt("wic", prompts) is rte
    )
    assert evaluate.route_prompt("wic", prompts, "fine_tuned_only") is None
    assert evaluate.route_prompt("wmt14_enfr", prompts) is wmt
    assert evaluate.route_prompt("wic", prompts, "same_answers") is rte
    assert (
        evaluate.route_prompt("wmt16_ende", prompts, "same_format") is None
    )  # another language pair


# --- prompt files -------------------------------------------------------------------------


def test_read_prompts_reads_promots_multi_task_file(tmp_path):
    rte, wmt = torch.rand(3, 8), torch.rand(3, 8)
    save_file({"prompt.rte": rte, "prompt.wmt14_enfr": wmt}, str(tmp_path / "p.safetensors"))
    prompts = prompt_formats.read_prompts(str(tmp_path / "p.safetensors"), d_model=8)
    assert list(prompts) == ["rte", "wmt14_enfr"]
    assert torch.equal(prompts["rte"], rte) and torch.equal(prompts["wmt14_enfr"], wmt)


def test_read_prompts_reads_a_t5x_npy_for_the_named_tasks(tmp_path):
    import numpy

    numpy.save(tmp_path / "p.npy", numpy.ones((3, 8), dtype=numpy.float32))
    prompts = prompt_formats.read_prompts(str(tmp_path / "p.npy"), d_model=8, tasks=["rte"])
    assert list(prompts) == ["rte"] and prompts["rte"].shape == (3, 8)


def test_a_prompt_file_that_names_no_task_asks_for_the_task(tmp_path):
    save_file({"prompt": torch.rand(3, 8)}, str(tmp_path / "p.safetensors"))
    with pytest.raises(BadInput, match="--task"):
        prompt_formats.read_prompts(str(tmp_path / "p.safetensors"), d_model=8)


# --- bad input: one clear message each, nothing half-written -----------------------------


def run_expecting_error(args, capsys):
    assert evaluate.main(args) == 2
    return capsys.readouterr().err


def test_unknown_task_is_one_clear_message(setup, tmp_path, capsys):
    args = common_args(setup, tmp_path / "r.json")
    args[args.index("--eval-tasks") + 1] = "cb,trivia"
    err = run_expecting_error(args, capsys)
    assert "unknown task 'trivia'" in err and "trivia_qa" in err
    assert not (tmp_path / "r.json").exists()


def test_missing_task_folders_are_all_named_in_one_message_with_the_eval_tasks_that_would_run(
    setup, tmp_path, capsys
):
    """The data folder holds five of the paper's eight unseen tasks (data.EVALUATION_TASKS)."""
    args = common_args(setup, tmp_path / "r.json")
    del args[args.index("--eval-tasks") : args.index("--eval-tasks") + 2]  # the paper's eight
    err = run_expecting_error(args, capsys)
    assert err.count("\n") == 1 and "has no folder for 3 evaluation tasks of 8: " in err
    assert "web_questions, wmt16_enro, wiki_lingua_en." in err
    assert "--eval-tasks cb,wic,trivia_qa,wmt16_ende,xsum, or pass --skip-missing-tasks" in err
    assert not (tmp_path / "r.json").exists()


def test_skip_missing_tasks_scores_the_others_and_names_the_skipped_in_json_and_table(
    setup, tmp_path, capsys
):
    args = common_args(setup, tmp_path / "r.json", "--skip-missing-tasks", "--shots", "0")
    args[args.index("--eval-tasks") + 1] = "cb,web_questions"
    assert evaluate.main(args) == 0
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "r.json").read_text())
    assert results["skipped_tasks"] == ["web_questions"]
    assert [r["task"] for r in results["runs"]] == ["cb"]
    assert "Not scored (no folder): web_questions" in out


def test_prompt_of_the_wrong_width_is_one_clear_message(setup, tmp_path, capsys):
    bad = tmp_path / "wide.safetensors"
    save_file({"prompt.rte": torch.zeros(3, 48)}, str(bad))
    err = run_expecting_error(common_args(setup, tmp_path / "r.json", "--prompt", str(bad)), capsys)
    assert "wide.safetensors" in err and "(3, 48)" in err and "d_model = 32" in err


def test_baseline_of_another_format_is_one_clear_message(setup, tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"accuracy": 91.3}))
    err = run_expecting_error(
        common_args(setup, tmp_path / "r.json", "--baseline", str(other)), capsys
    )
    assert "other.json" in err and "not an evaluate.py results file" in err


def test_empty_task_file_is_one_clear_message(setup, tmp_path, capsys):
    model_dir, data_dir, _ = setup
    empty = tmp_path / "data"
    (empty / "cb").mkdir(parents=True)
    (empty / "cb" / "validation.jsonl").write_text("")
    err = run_expecting_error(
        [
            "--model",
            str(model_dir),
            "--data-dir",
            str(empty),
            "--out",
            str(tmp_path / "r.json"),
            "--eval-tasks",
            "cb",
            "--shots",
            "0",
        ],
        capsys,
    )
    assert "cb" in err and "no examples" in err


def test_bad_shots_is_one_clear_message(setup, tmp_path, capsys):
    args = common_args(setup, tmp_path / "r.json")
    args[args.index("--shots") + 1] = "1,four"
    assert "--shots" in run_expecting_error(args, capsys)


def test_non_positive_beam_width_is_one_clear_message(setup, tmp_path, capsys):
    args = common_args(setup, tmp_path / "r.json")
    args[args.index("--num-beams") + 1] = "0"
    assert "--num-beams 0: expected >= 1 (and < 2**63)" in run_expecting_error(args, capsys)


def test_interrupted_run_is_one_line_and_leaves_the_previous_results_file_untouched(
    setup, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "r.json"
    previous = json.dumps({"format": evaluate.RESULTS_FORMAT, "runs": []})  # --out replaces ours
    out.write_text(previous)
    real = evaluate.score_task
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "score_task", interrupted)
    assert evaluate.main(common_args(setup, out)) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        "evaluate.py: interrupted (Ctrl-C); what was saved is intact"
    )
    assert out.read_text() == previous and os.listdir(tmp_path) == ["r.json"]


# --- torchrun: examples split across ranks, then gathered --------------------------------


def test_torchrun_two_ranks_give_the_single_process_results(setup, promot_run, tmp_path):
    out = tmp_path / "dist.json"
    args = common_args(setup, out, "--prompt", str(setup[2]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(29500 + os.getpid() % 1000),
            os.path.join(root, "evaluate.py"),
            *args,
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = promot_run[1]["runs"]
    dist = json.loads(out.read_text())
    assert dist["settings"]["world_size"] == 2
    assert [r["examples"] for r in dist["runs"]] == [r["examples"] for r in single]
    assert [r["score"] for r in dist["runs"]] == [r["score"] for r in single]


# --- several data folders, the default tasks, warnings ---------------------------------------


@pytest.fixture(scope="module")
def own_folder(tmp_path_factory):
    """A second data folder with two tasks of one's own: `clean` in the tokenizer's words and
    `foreign` in characters it never saw (so its inputs are mostly <unk>)."""
    folder = tmp_path_factory.mktemp("own")
    rng = random.Random(2)
    texts = {
        "clean": lambda: sentence(rng, 6),
        "foreign": lambda: " ".join(rng.choice(("中文", "漢字", "ÆØÅ", "ığş")) for _ in range(6)),
    }
    for name, make in texts.items():
        (folder / name).mkdir()
        (folder / name / "task.json").write_text(json.dumps({"metric": "exact_match"}))
        for split in ("train", "validation"):
            write_jsonl(
                folder / name / f"{split}.jsonl", [{"input": make(), "target": "Paris"}] * 4
            )
    return folder


def own_args(setup, out, data_dir, *extra):
    args = common_args(setup, out, "--shots", "0", *extra)
    args[args.index("--data-dir") + 1] = data_dir
    del args[args.index("--eval-tasks") : args.index("--eval-tasks") + 2]
    return args


def test_data_dir_takes_several_folders_each_task_read_from_the_one_that_holds_it(
    setup, own_folder, tmp_path
):
    out = tmp_path / "r.json"
    both = f"{setup[1]},{own_folder}"
    assert evaluate.main(own_args(setup, out, both, "--eval-tasks", "cb,clean")) == 0
    runs = {r["task"]: r for r in json.loads(out.read_text())["runs"]}
    assert sorted(runs) == ["cb", "clean"]
    # the oracle: each folder's own file, read alone
    for task, folder in (("cb", setup[1]), ("clean", own_folder)):
        split, examples = data.load_eval_split(task, folder)
        refs = [list(x.targets) for x in examples[:5]]
        assert (runs[task]["split"], [x["references"] for x in runs[task]["examples"]]) == (
            split,
            refs,
        )


def test_a_task_in_two_data_folders_is_refused_in_one_line_naming_both(
    setup, own_folder, tmp_path, capsys
):
    second = tmp_path / "second"
    shutil.copytree(own_folder / "clean", second / "clean")
    both = f"{own_folder},{second}"
    err = run_expecting_error(own_args(setup, tmp_path / "r.json", both), capsys)
    assert err.count("\n") == 1 and "task 'clean'" in err
    assert str(own_folder) in err and str(second) in err


def test_without_paper_tasks_eval_tasks_are_the_folders_present_but_the_fine_tuned(
    setup, own_folder, tmp_path, capsys
):
    out = tmp_path / "r.json"
    assert evaluate.main(own_args(setup, out, str(own_folder))) == 0
    runs = json.loads(out.read_text())["runs"]
    assert {r["task"] for r in runs} == set(os.listdir(own_folder)) == {"clean", "foreign"}
    assert "holds none of the paper's tasks; its own: clean,foreign" in capsys.readouterr().err
    assert evaluate.main(own_args(setup, out, str(own_folder), "--task", "clean")) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [(r["task"], r["role"]) for r in runs] == [
        ("clean", "fine-tuned"),
        ("foreign", "evaluation"),
    ]


def test_inputs_mostly_unk_are_warned_as_the_tokenizer_counts_them(
    setup, own_folder, tmp_path, capsys
):
    out = tmp_path / "r.json"
    assert evaluate.main(own_args(setup, out, str(own_folder))) == 0
    err = capsys.readouterr().err
    sp = data.Tokenizer(setup[0] / "spiece.model").sp  # the oracle: SentencePiece's own ids

    def share(task):
        ids = [
            i
            for x in data.load_split(task, own_folder, "validation")
            for i in sp.encode(x.fields["input"])
        ]
        return sum(i == sp.unk_id() for i in ids) / len(ids)

    warned = {
        t
        for t in ("clean", "foreign")
        if f"of the tokens of {t}'s validation inputs are <unk>" in err
    }
    assert warned == {t for t in ("clean", "foreign") if share(t) > 0.05} == {"foreign"}
    assert json.loads(out.read_text())["warnings"] == [
        line for line in err.splitlines() if line.startswith("warning:")
    ]


def test_a_trained_checkpoint_scoring_0_on_its_task_is_warned_a_pretrained_one_not(
    setup, promot_run, tmp_path, capsys
):
    _, results, _, stderr, _ = promot_run  # beside the prompt: a training.json (stage 2, rte)
    zero = [r for r in results["runs"] if r["role"] == "fine-tuned" and r["score"] == 0]
    assert zero and f"scores 0 on its fine-tuned task rte (0-shot, {zero[0]['split']})" in stderr
    assert len(results["warnings"]) == len(zero)
    args = common_args(setup, tmp_path / "r.json", "--task", "rte", "--eval-tasks", "cb")
    assert evaluate.main(args) == 0  # the same model, no training.json: nothing trained
    assert "scores 0" not in capsys.readouterr().err
