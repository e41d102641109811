"""The command lines of promot.py and evaluate.py (flags.py): --help without torch, a recipe for
any model (--recipe FILE, else the model folder's recipe.json; flags given win), stage 2's
prompt length read from stage 1's file, and the choices flags.py lists agreeing with the code
that implements them."""

import json
import os
import subprocess
import sys

import pytest
import torch

import data
import decode
import evaluate
import flags
import promot
from support import prompt_formats
from support.mixture import MIXING_RATES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAB_RECIPE = os.path.join(ROOT, "lab", "tiny-t5", "recipe.json")


def cli(tmp_path, stage="1", *extra, model="m"):
    """promot.py's flags for a run that parse_args alone reads (no model or data needed)."""
    out = str(tmp_path / "run")
    return ["--stage", stage, "--model", str(model), "--data-dir", "d", "--task", "t"] + [
        "--out",
        out,
        *extra,
    ]


def write_recipe(folder, recipe):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.json").write_text(json.dumps(recipe), encoding="utf-8")
    return folder / "recipe.json"


# --- --help without torch ------------------------------------------------------------------


@pytest.mark.parametrize("command", ["promot.py", "evaluate.py"])
def test_help_imports_no_torch(command):
    """python -X importtime lists every module imported, on stderr: torch is not among them."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", command, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and "usage:" in result.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert "argparse" in imported  # the listing is there, so the next line can fail
    assert not {m for m in imported if m.split(".")[0] in ("torch", "numpy", "transformers")}


def test_help_explains_shots_in_both_commands():
    """The two --shots differ (a training's demonstrations, the table's columns): each help
    names the other."""
    for parser, other in (
        (flags.promot_parser(), "evaluate.py"),
        (flags.evaluate_parser(), "promot.py"),
    ):
        (shots,) = [a for a in parser._actions if a.dest == "shots"]
        assert f"{other}'s --shots" in shots.help


def test_flags_choices_are_the_ones_the_code_implements():
    assert flags.STAGE_NAMES == tuple(promot.STAGES)
    assert flags.ROUTES == evaluate.ROUTES
    assert flags.LENGTH_RULES == decode.LENGTH_RULES
    assert flags.TRUNCATIONS == data.TRUNCATIONS
    mixing = {f.name: f for f in promot.Config.__dataclass_fields__.values()}["mixing"]
    assert mixing.metadata["choices"] == MIXING_RATES == data.MIXING_RATES


# --- recipes ---------------------------------------------------------------------------------


def test_the_model_folders_recipe_is_used_with_model_given_and_named_first(tmp_path, capsys):
    model = tmp_path / "model"
    recipe = write_recipe(
        model, {"every stage": {"batch_size": 8}, "prompt": {"steps": 30}, "model": {"steps": 7}}
    )
    cfg = promot.parse_args(cli(tmp_path, "1", model=model))
    first = capsys.readouterr().out.splitlines()[0]
    assert (cfg.batch_size, cfg.steps, cfg.recipe) == (8, 30, str(recipe))
    assert first.startswith(f"promot.py: the recipe {recipe}") and "--steps 30" in first
    cfg = promot.parse_args(cli(tmp_path, "2", model=model))
    assert (cfg.batch_size, cfg.steps) == (8, 7)  # the model-tuning section


def test_flags_given_win_and_recipe_none_gives_the_papers_defaults(tmp_path):
    model = tmp_path / "model"
    write_recipe(model, {"every stage": {"batch_size": 8, "dropout": 0.0}})
    cfg = promot.parse_args(cli(tmp_path, "1", "--batch-size", "16", model=model))
    assert (cfg.batch_size, cfg.dropout) == (16, 0.0)
    cfg = promot.parse_args(cli(tmp_path, "1", "--recipe", "none", model=model))
    paper = promot.Config()
    assert (cfg.batch_size, cfg.dropout, cfg.recipe) == (paper.batch_size, paper.dropout, "")


def test_recipe_flag_reads_any_file_for_any_model(tmp_path):
    recipe = write_recipe(tmp_path / "elsewhere", {"model": {"lr": 0.003, "shots": "1"}})
    cfg = promot.parse_args(cli(tmp_path, "finetune", "--recipe", str(recipe)))
    assert (cfg.lr, cfg.shots, cfg.steps) == (0.003, [1], promot.STAGES["finetune"].steps)


def test_the_lab_recipe_is_lab_tiny_t5s_with_model_given_too(tmp_path):
    lab = os.path.join(ROOT, "lab", "tiny-t5")
    given = promot.parse_args(cli(tmp_path, "2", model=lab))
    flagless = promot.parse_args(["--stage", "2", "--out", str(tmp_path / "run")])
    recipe = json.load(open(LAB_RECIPE, encoding="utf-8"))
    expected = {**recipe["every stage"], **recipe["model"]}
    expected.pop("prompt_length")  # stage 2's comes from stage 1's file when there is one
    assert {k: getattr(given, k) for k in expected} == expected
    assert {k: getattr(flagless, k) for k in expected} == expected


@pytest.mark.parametrize(
    "recipe, expected",
    [
        ({"model": {"steps": "many"}}, "'model': steps 'many': expected int"),
        ({"model": {"steps": 0}}, "'model': steps 0: expected >= 1"),
        ({"model": {"mixing": "some"}}, "mixing 'some': expected one of equal, proportional"),
        ({"model": {"stepz": 3}}, "'model': 'stepz' is no setting"),
        ({"every_stage": {"steps": 3}}, "'every_stage': expected a section"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_a_wrong_recipe_is_one_line_naming_the_file(tmp_path, capsys, recipe, expected):
    path = write_recipe(tmp_path / "r", recipe)
    assert promot.main(cli(tmp_path, "2", "--recipe", str(path))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and expected in err, err


def test_a_missing_recipe_file_is_one_line(tmp_path, capsys):
    missing = tmp_path / "no.json"
    assert promot.main(cli(tmp_path, "1", "--recipe", str(missing))) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--recipe {missing}: no such file" in err, err


def test_help_says_which_default_is_the_recipes(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at hyphens, paths have some
    model = tmp_path / "model"
    recipe = write_recipe(model, {"every stage": {"batch_size": 8}, "prompt": {"steps": 30}})
    text = " ".join(flags.promot_parser(["--model", str(model)]).format_help().split())
    assert f"Recipe in force for this command line: {recipe}" in text
    paper = promot.Config().batch_size
    assert f"global batch size in examples (the recipe's: 8; without it: {paper})" in text
    assert "training steps [1: 5000; else 1000] (the recipe's: 30 (prompt))" in text
    assert "decoder-only 50" in text and "[1: 0.2, decoder 0.3" in text  # App. C.6's, named
    flagless = " ".join(flags.promot_parser([]).format_help().split())
    assert f"Recipe in force for this command line: {LAB_RECIPE}" in flagless


# --- stage 2's prompt length -----------------------------------------------------------------


def stage1_prompt(tmp_path, length):
    best = tmp_path / "run" / "stage1" / "best"
    best.mkdir(parents=True)
    prompt_formats.save_prompts({"t": torch.zeros(length, 8)}, best / "prompt.safetensors")


def test_stage_2_takes_the_prompt_length_of_stage_1s_file(tmp_path):
    stage1_prompt(tmp_path, 7)
    model = tmp_path / "model"
    write_recipe(model, {"every stage": {"prompt_length": 20}})  # stage 1's file wins over it
    assert promot.parse_args(cli(tmp_path, "2", model=model)).prompt_length == 7
    assert promot.parse_args(cli(tmp_path, "2", "--prompt-length", "9")).prompt_length == 9
    # stage 1 makes a new prompt: the recipe's, else B.4's 100
    assert promot.parse_args(cli(tmp_path, "1", model=model)).prompt_length == 20
    assert promot.parse_args(cli(tmp_path, "1")).prompt_length == flags.PROMPT_LENGTH


def test_a_second_value_after_a_flag_says_values_go_comma_separated(capsys):
    """`--data-dir mine lab/data` (two folders, space-separated): argparse's "unrecognized
    arguments" gains how several go; an unknown flag keeps argparse's message alone."""
    assert evaluate.main(["--model", "m", "--data-dir", "mine", "lab/data", "--out", "o"]) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: lab/data" in err and "comma-separated, --data-dir a,b" in err
    assert evaluate.main(["--model", "m", "--frobnicate", "3"]) == 2
    assert "comma-separated" not in capsys.readouterr().err


def test_a_missing_model_names_the_bundled_one_and_only_then(capsys):
    """promot.py with --data-dir but no --model suggests lab/tiny-t5; a missing --task alone
    does not."""
    base = ["--stage", "1", "--data-dir", "mine", "--out", "o"]
    assert promot.main([*base, "--task", "t"]) == 2
    assert "required: --model (--model lab/tiny-t5: the bundled" in capsys.readouterr().err
    assert promot.main([*base, "--model", "m"]) == 2
    err = capsys.readouterr().err
    assert "required: --task (omit both" in err and "lab/tiny-t5" not in err
