"""evaluate.py's default route on the miniature lab, through the real commands: a stage-1 prompt
(the prompt-tuning baseline) is removed on every task but its own, so its unseen-task scores are
the pretrained model's, as the paper's Tables 10 and 12-14 report them (CB and WiC included; §5.1
compares "when the prompt is removed"); ProMoT's stage-2 prompt keeps §4's same-format rule.

The lab: lab_owns (RTE's part) is the fine-tuned task, and lab_both (WiC's part) shares its
format group (lab/tasks.py), so §4's rule would give it lab_owns' prompt."""

import json
import os
import shutil

import pytest

import data
import evaluate
import promot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL, DATA = os.path.join(ROOT, "lab", "tiny-t5"), os.path.join(ROOT, "lab", "data")
# Two steps each. A 200-token prompt: long enough to change some of the bundled model's lab_both
# answers when it is prepended (checked below), so equal answers mean the prompt was removed.
SHORT = ["--steps", "2", "--save-every", "2", "--batch-size", "4", "--no-eval"]
SHORT += ["--prompt-length", "200", "--train-examples", "16"]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """promot.py --stage 1, then --stage 2, on lab_owns: RUN/stage1/best/, RUN/stage2/best/."""
    out = tmp_path_factory.mktemp("lab") / "run"
    for stage in ("1", "2"):
        argv = ["--stage", stage, "--model", MODEL, "--data-dir", DATA, "--task", "lab_owns"]
        assert promot.main(argv + ["--out", str(out), *SHORT]) == 0
    return out


def scored(folder, name, *flags):
    """evaluate.py on lab_both, 1-shot, greedy: ({task: its run}, the --route it ran with)."""
    out = folder / f"{name}.json"
    argv = ["--data-dir", DATA, "--eval-tasks", "lab_both", "--shots", "1", "--num-beams", "1"]
    assert evaluate.main(argv + ["--eval-examples", "16", "--out", str(out), *flags]) == 0
    results = json.loads(out.read_text(encoding="utf-8"))
    return {r["task"]: r for r in results["runs"]}, results["settings"]["route"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """The oracle: the bundled model alone on lab_owns and lab_both."""
    runs, _ = scored(tmp_path_factory.mktemp("pre"), "pre", "--model", MODEL, "--task", "lab_owns")
    assert not any(r["prompt"] for r in runs.values())
    return runs


def stage1_prompt(run_folder):
    best = run_folder / "stage1" / "best"
    assert json.loads((best / "training.json").read_text())["stage"] == "1"  # promot's export
    return str(best / "prompt.safetensors")


def test_lab_both_shares_lab_owns_format_group():  # why the two defaults differ on it
    both, owns = data.get_task("lab_both", DATA), data.get_task("lab_owns", DATA)
    assert both.format_group == owns.format_group


def test_a_stage_1_prompt_is_removed_on_lab_both_which_scores_as_the_pretrained_model(
    run_folder, pretrained, tmp_path
):
    runs, flag = scored(tmp_path, "stage1", "--model", MODEL, "--prompt", stage1_prompt(run_folder))
    assert flag == "by_stage" and {r["route"] for r in runs.values()} == {"fine_tuned_only"}
    assert (runs["lab_owns"]["prompt"], runs["lab_both"]["prompt"]) == (True, False)
    # the paper's equal columns: the pretrained model's score, answer for answer
    assert runs["lab_both"]["score"] == pretrained["lab_both"]["score"]
    assert runs["lab_both"]["examples"] == pretrained["lab_both"]["examples"]


def test_with_the_prompt_lab_both_answers_differ_so_the_equality_above_can_fail(
    run_folder, pretrained, tmp_path
):
    flags = ["--model", MODEL, "--prompt", stage1_prompt(run_folder), "--route", "same_format"]
    runs, flag = scored(tmp_path, "prompted", *flags)
    assert flag == "same_format" and runs["lab_both"]["prompt"]
    answers = [e["raw_output"] for e in runs["lab_both"]["examples"]]
    assert answers != [e["raw_output"] for e in pretrained["lab_both"]["examples"]]


def test_a_prompt_without_training_json_for_the_pretrained_model_is_read_as_stage_1(
    run_folder, tmp_path
):
    bare = tmp_path / "bare.safetensors"  # a prompt file promot's export does not describe
    shutil.copy(stage1_prompt(run_folder), bare)
    flags = ["--model", MODEL, "--prompt", str(bare), "--task", "lab_owns"]
    runs, _ = scored(tmp_path, "bare", *flags)
    assert (runs["lab_owns"]["prompt"], runs["lab_both"]["prompt"]) == (True, False)


def test_a_stage_2_promot_export_keeps_the_same_format_rule(run_folder, tmp_path):
    best = run_folder / "stage2" / "best"
    assert json.loads((best / "training.json").read_text())["stage"] == "2"
    runs, _ = scored(tmp_path, "stage2", "--model", str(best))  # its own prompt.safetensors
    assert {r["route"] for r in runs.values()} == {"same_format"}
    assert (runs["lab_owns"]["prompt"], runs["lab_both"]["prompt"]) == (True, True)


def test_route_by_name_overrides_the_stage(run_folder, tmp_path, capsys):
    best = str(run_folder / "stage2" / "best")
    runs, flag = scored(tmp_path, "alone", "--model", best, "--route", "fine_tuned_only")
    assert flag == "fine_tuned_only" and {r["route"] for r in runs.values()} == {flag}
    assert (runs["lab_owns"]["prompt"], runs["lab_both"]["prompt"]) == (True, False)
    out, err = capsys.readouterr()
    assert "scored with it (--route fine_tuned_only)." in out
    assert "routed by --route fine_tuned_only" in err


def test_the_table_and_the_log_name_the_reading_by_stage_chose(run_folder, tmp_path, capsys):
    prompt = stage1_prompt(run_folder)
    scored(tmp_path, "named", "--model", MODEL, "--prompt", prompt)
    out, err = capsys.readouterr()
    assert "| lab_both (accuracy) |" in out  # no "; prompt" mark
    assert "scored with it (--route by_stage: fine_tuned_only)." in out
    assert f"scoring with the prompt {prompt}, routed by --route by_stage: fine_tuned_only" in err
