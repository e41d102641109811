"""docs/defaults.md against the code: every default the table states (`name = value` in its
third column) is the code's actual value, every option it names is a flag of a command, and
the settings the paper leaves unstated are all there. The table fails this test the day it and
the code diverge."""

import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import torch

import data
import decode
import diagnostics
import evaluate
import promot
from support import dataset_files

DOC = Path(__file__).resolve().parent.parent / "docs" / "defaults.md"
# `name = value` in the third column; name starts at one of these (gin quotes such as
# `Z_LOSS = 0.0001` are sources, not checks)
ROOTS = "Config|STAGES|Settings|ShowSettings|promot|data|evaluate|decode|dataset_files"
CHECK = re.compile(rf"`((?:{ROOTS})\b[^`]*?) = ([^`]+)`")
NAMESPACE = dict(
    Config=promot.Config(),
    STAGES=promot.STAGES,
    Settings=evaluate.Settings(),
    ShowSettings=data.ShowSettings(),
    promot=promot,
    data=data,
    evaluate=evaluate,
    decode=decode,
    dataset_files=dataset_files,
)
# Rows that state a behaviour rather than a value; each is checked by its own test below.
BEHAVIOURS = {
    "learning-rate schedule",
    "multi-task stage 1",
    "Table 14",
    "decoder-only prompt tuning",
    "decoder-only input cut",
    "decoder-only output cut",
}
# The settings issue 22 lists: the paper's defaults and the ones it leaves unstated.
REQUIRED = {
    "which tasks get the prompt",
    "how a long input is cut",
    "+1-shot checkpoint choice",
    "a ProMoT checkpoint without `--prompt`",
    "decoding",
    "multi-task stage 2 mixing",
    "multi-task stage 2 checkpoint choice",
    "stage-1 weight decay and label smoothing",
    "z-loss",
    "prompt initialisation",
    "learning-rate schedule",
    "target length",
    "input length",
    "Adafactor's step count",
    "WMT14 En-Fr validation",
    "Table 14",
    # issue 27: the readings of ours the paper's text does not state
    "input and target format",
    "LoRA's targets",
    "decoder-only prompt tuning",
    "Adafactor in stage 2",
}


def rows():
    """{setting: (what the paper says, promot's default, the option)} of the table."""
    table = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if not line.startswith("| ") or line.startswith("| setting |"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        assert len(cells) == 4, line
        assert cells[0] not in table, f"two rows for {cells[0]}"
        table[cells[0]] = tuple(cells[1:])
    return table


def actual(name):
    """The code's value of `name`: an expression, or f(x) for the default of f's argument x."""
    if call := re.fullmatch(r"(.+)\((\w+)\)", name):
        function = eval(call[1], dict(NAMESPACE))
        return inspect.signature(function).parameters[call[2]].default
    return eval(name, dict(NAMESPACE))


def stated_defaults():
    return [
        (setting, name, value)
        for setting, (_, default, _) in rows().items()
        for name, value in CHECK.findall(default)
    ]


def test_the_table_covers_every_setting_the_issue_lists():
    assert REQUIRED <= set(rows()), REQUIRED - set(rows())


def test_every_row_states_a_value_the_test_checks_or_is_a_behaviour_checked_below():
    unchecked = {s for s, (_, default, _) in rows().items() if not CHECK.search(default)}
    assert unchecked == BEHAVIOURS


@pytest.mark.parametrize("setting, name, value", stated_defaults())
def test_each_stated_default_is_the_codes(setting, name, value):
    assert actual(name) == eval(value, {}), f"docs/defaults.md, {setting}: {name}"


def flag_names():
    names = set()
    for settings in (
        promot.Config,
        diagnostics.TrainingFlags,
        evaluate.Settings,
        data.ShowSettings,
    ):
        for f in dataclasses.fields(settings):
            if "help" in f.metadata:
                flag = f.name.replace("_", "-")
                names.add(f"--{'no-' if f.default is True else ''}{flag}")
    return names


def test_every_option_the_table_names_is_a_flag():
    known = flag_names()
    for setting, (_, _, option) in rows().items():
        for name in re.findall(r"--[a-z0-9-]+", option):
            assert name in known, f"docs/defaults.md, {setting}: {name} is no flag"


def test_the_learning_rate_is_constant_promot_sets_it_only_from_lr():
    # the only write of a group's rate: --resume puts back --lr (which may change)
    source = inspect.getsource(promot)
    assert re.findall(r'\["lr"\] = ([\w.]+)', source) == ["run.cfg.lr"]
    assert "lr_scheduler" not in source


def test_the_uniform_prompt_init_is_u_0_to_half():
    cfg = promot.Config(prompt_length=400)
    prompt = promot.init_prompt(cfg, 64, None, None, torch.Generator().manual_seed(0))
    assert prompt.shape == (400, 64) and 0 <= prompt.min() and prompt.max() < 0.5
    assert abs(prompt.mean().item() - 0.25) < 0.01


def test_multitask_stage1_tunes_one_prompt_per_task():
    assert "a soft prompt for each task" in promot.tune_prompts_apart.__doc__  # §5.4
    assert "tune_prompts_apart(run) if apart" in inspect.getsource(promot.train)


def test_table_14_runs_on_open_decoder_only_checkpoints():
    """Its run is tests/test_decoder_only.py's; the row names the file that holds the model."""
    paper, default, _ = rows()["Table 14"]
    assert "PaLM 8B" in paper and "decoder-only" in paper and "causal_lm.py" in default
    assert Path(DOC.parent.parent / "tests" / "test_decoder_only.py").is_file()


def test_a_decoder_only_input_keeps_its_end_and_its_output_stops_at_a_blank_line():
    class Ids:  # a tokenizer of one id per character, BOS 0
        causal, bos_id = True, 0

        def encode(self, text):
            return [0] + [ord(c) for c in text]

    assert data.encode_cut(Ids(), "abcdef", 4) == [0, ord("d"), ord("e"), ord("f")]
    assert evaluate.postprocess(" Paris\n\nQ: and Rome? A: Rome") == "Paris"


def test_promot_states_the_principle():
    doc = " ".join(promot.__doc__.split())
    assert "The defaults reproduce the paper" in doc
    assert "each improvement or reading of ours is a named option" in doc
    assert "docs/defaults.md" in doc
