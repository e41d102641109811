"""The README's main job without a model or data: the miniature lab is the default."""

import argparse
import filecmp
import json
import os
import subprocess
import sys

import pytest

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
            quick=False, steps=None, limit=None, lr=None, stage1_lr=None, dropout=None, seed=0
        )
    )
    for stage in ("1", "2", "finetune"):
        cfg = vars(promot.parse_args(["--stage", stage]))
        assert {k: cfg[k] for k in lab_run.recipe(s, stage)} == lab_run.recipe(s, stage), stage


def test_flags_given_win_over_the_recipe_abbreviated_too():
    cfg = promot.parse_args(["--stage", "2", "--lr", "3e-3", "--batch", "8", "--dropout", "0.1"])
    assert (cfg.lr, cfg.batch_size, cfg.dropout, cfg.steps) == (3e-3, 8, 0.1, 400)


def test_with_a_model_or_data_dir_the_defaults_are_the_papers():
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
