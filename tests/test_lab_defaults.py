"""The README's main job without a model or data: the miniature lab is the default."""

import filecmp
import os
import subprocess
import sys

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


def test_promot_without_model_and_data_uses_the_lab():
    cfg = promot.parse_args(["--stage", "1"])
    assert (cfg.model, cfg.data_dir, cfg.task, cfg.out) == (
        os.path.join(LAB, "tiny-t5"),
        os.path.join(LAB, "data"),
        "lab_owns",
        os.path.join("runs", "lab"),
    )
    assert (
        cfg.steps == 5000 and cfg.lr == 0.2 and cfg.prompt_length == 100
    )  # still the paper's recipe


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
        assert "the miniature lab" in result.stdout
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
