"""The README's main job without a model or data: the miniature lab is the default."""

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys

import pytest

import evaluate
import flags
import promot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAB = os.path.join(ROOT, "lab")


def test_committed_lab_data_is_what_the_generator_writes(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "lab.tasks", "--out", str(tmp_path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    committed = os.path.join(LAB, "data")
    assert sorted(os.listdir(tmp_path)) == sorted(os.listdir(committed))
    for task in os.listdir(committed):
        files = sorted(os.listdir(os.path.join(committed, task)))
        match, mismatch, errors = filecmp.cmpfiles(
            os.path.join(committed, task), tmp_path / task, files, shallow=False
        )
        assert (mismatch, errors) == ([], []), task


RECIPE = json.load(open(os.path.join(LAB, "tiny-t5", "recipe.json"), encoding="utf-8"))


def test_promot_without_model_and_data_uses_the_lab_and_its_recipe():
    cfg = promot.parse_args(["--stage", "1"])
    assert (cfg.model, cfg.data_dir, cfg.task, cfg.out) == (
        os.path.join(LAB, "tiny-t5"),
        os.path.join(LAB, "data"),
        "lab_owns",
        os.path.join("runs", "lab"),
    )
    # the bundled model's recipe, the one lab/run.py trains with: 200 + 400 steps, not 5000 + 1000
    assert (cfg.steps, cfg.lr, cfg.batch_size, cfg.prompt_length, cfg.dropout) == (
        200,
        0.2,
        32,
        20,
        0.0,
    )
    cfg = promot.parse_args(["--stage", "2"])
    assert (cfg.steps, cfg.lr, cfg.save_every, cfg.num_beams) == (400, 1e-2, 400, 1)


def test_the_flagless_recipe_is_lab_run_pys_recipe():
    from lab import run as lab_run

    s = lab_run.settings(
        argparse.Namespace(
            model=os.path.join(LAB, "tiny-t5"),
            quick=False,
            steps=None,
            limit=None,
            lr=None,
            stage1_lr=None,
            dropout=None,
            seed=0,
        )
    )
    for stage in ("1", "2", "finetune"):
        cfg = vars(promot.parse_args(["--stage", stage]))
        assert {k: cfg[k] for k in lab_run.recipe(s, stage)} == lab_run.recipe(s, stage), stage


def test_flags_given_win_over_the_recipe_abbreviated_too():
    cfg = promot.parse_args(["--stage", "2", "--lr", "3e-3", "--batch", "8", "--dropout", "0.1"])
    assert (cfg.lr, cfg.batch_size, cfg.dropout, cfg.steps) == (3e-3, 8, 0.1, 400)


def test_a_model_folder_without_a_recipe_gets_the_papers_defaults():
    cfg = promot.parse_args(
        ["--stage", "1", "--model", "m", "--data-dir", "d", "--task", "t"] + ["--out", "o"]
    )
    assert (cfg.steps, cfg.lr, cfg.prompt_length, cfg.batch_size, cfg.dropout) == (
        5000,
        0.2,
        100,
        64,
        0.1,
    )


@pytest.mark.parametrize(
    "command",
    ["promot.py", "evaluate.py", "data.py show", "data.py check", "diagnostics.py plot"]
    + ["diagnostics.py align"],
)
def test_help_shows_no_empty_default(command):
    result = subprocess.run(
        [sys.executable, *command.split(), "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0 and "--help" in result.stdout
    text = " ".join(result.stdout.split())  # argparse wraps "(default: )" across lines
    assert "(default: )" not in text and "(default: None)" not in text and "default: ''" not in text


def test_default_main_job_trains_and_evaluates_the_bundled_model(tmp_path):
    """`promot.py --stage 1` then `--stage 2` then `evaluate.py`, shortened, on the lab defaults."""
    short = [
        "--steps",
        "2",
        "--save-every",
        "2",
        "--batch-size",
        "4",
        "--no-eval",
        "--out",
        str(tmp_path / "run"),
    ]
    for stage in ("1", "2"):
        result = subprocess.run(
            [sys.executable, "promot.py", "--stage", stage, *short],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert "the miniature lab" in result.stdout and "recipe.json" in result.stdout
    # stage 2 names the stage-1 prompt it froze, and RUN/config.json records it
    prompt = str(tmp_path / "run" / "stage1" / "best" / "prompt.safetensors")
    assert f"stage 1's {prompt}, frozen" in result.stdout
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert recorded["stage2"]["prompt"] == prompt and recorded["stage1"]["prompt"] == ""
    best = tmp_path / "run" / "stage2" / "best"
    result = subprocess.run(
        [
            sys.executable,
            "evaluate.py",
            "--model",
            str(best),
            "--data-dir",
            os.path.join(LAB, "data"),
            "--prompt",
            str(best / "prompt.safetensors"),
            "--eval-tasks",
            "lab_who,lab_backwards",
            "--shots",
            "1",
            "--eval-examples",
            "4",
            "--num-beams",
            "1",
            "--out",
            str(tmp_path / "eval.json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "lab_backwards" in result.stdout and "Norm. Avg." in result.stdout


def small_lab(root):
    """A copy of the lab that trains and scores in seconds: the bundled model with a recipe of
    2 steps per stage (stage 1's prompt length 4, stage 2's left to stage 1's file), and two
    of its tasks cut to a few examples."""
    model, data_dir = root / "lab" / "tiny-t5", root / "lab" / "data"
    shutil.copytree(os.path.join(LAB, "tiny-t5"), model)
    every = dict(batch_size=4, dropout=0.0, num_beams=1, eval_examples=4, max_new_tokens=8)
    recipe = {
        "every stage": dict(every, log_every=1, prompt_init="vocab"),
        "prompt": {"steps": 2, "lr": 0.2, "save_every": 1, "prompt_length": 4},
        "model": {"steps": 2, "lr": 0.01, "save_every": 1},
    }
    (model / "recipe.json").write_text(json.dumps(recipe), encoding="utf-8")
    for task in ("lab_owns", "lab_both"):
        (data_dir / task).mkdir(parents=True)
        shutil.copy(os.path.join(LAB, "data", task, "task.json"), data_dir / task)
        for split, n in (("train", 16), ("validation", 4), ("test", 4)):
            lines = open(os.path.join(LAB, "data", task, f"{split}.jsonl")).readlines()[:n]
            (data_dir / task / f"{split}.jsonl").write_text("".join(lines), encoding="utf-8")
    return dict(flags.LAB, model=str(model), data_dir=str(data_dir))


def scores(path):
    results = json.loads(path.read_text(encoding="utf-8"))
    return {(r["task"], r["shots"], r["role"]): r["score"] for r in results["runs"]}, results


def test_flagless_stage_1_stage_2_then_evaluate_score_the_trained_model_against_the_pretrained(
    tmp_path, monkeypatch, capsys
):
    """The README's three flagless commands, in process, on a small copy of the lab: evaluate.py
    scores RUN/stage2/best against the pretrained model, each equal to evaluate.py with every
    flag spelled out."""
    lab = small_lab(tmp_path)
    monkeypatch.setattr(flags, "LAB", lab)
    monkeypatch.chdir(tmp_path)
    assert promot.main(["--stage", "1"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "the miniature lab" in first and os.path.join(lab["model"], "recipe.json") in first
    assert promot.main(["--stage", "2"]) == 0
    capsys.readouterr()
    run = tmp_path / "runs" / "lab"
    recorded = json.loads((run / "config.json").read_text(encoding="utf-8"))
    assert recorded["stage2"]["prompt_length"] == 4  # stage 1's, not B.4's 100
    assert evaluate.main([]) == 0
    said = capsys.readouterr().out
    best = os.path.join("runs", "lab", "stage2", "best")
    assert f"scoring {best}, what promot.py --stage 1 and 2 trained, against --baseline" in said
    trained, results = scores(run / "eval.json")
    pretrained, baseline = scores(run / "eval_pretrained.json")
    assert (results["model"], baseline["model"]) == (best, lab["model"])
    assert {t for t, _, role in trained if role == "evaluation"} == {"lab_both"}  # lab_owns: tuned
    # the oracle: evaluate.py with the flags a user would otherwise type
    spelled = ["--data-dir", lab["data_dir"], "--eval-tasks", "lab_both"]
    spelled += ["--task", "lab_owns", "--out"]
    assert evaluate.main(["--model", lab["model"], *spelled, str(tmp_path / "pre.json")]) == 0
    assert evaluate.main(["--model", best, *spelled, str(tmp_path / "post.json")]) == 0
    assert scores(tmp_path / "pre.json")[0] == pretrained
    assert scores(tmp_path / "post.json")[0] == trained
    avg = {k: v - baseline["norm_avg"][k] for k, v in results["norm_avg"].items()}
    assert all(f"({d:+.2f})" in said for d in avg.values())  # the table's differences
    # a second flagless evaluate reuses the baseline: the flags are the same
    before = (run / "eval_pretrained.json").stat().st_mtime_ns
    assert evaluate.main([]) == 0
    assert (run / "eval_pretrained.json").stat().st_mtime_ns == before
