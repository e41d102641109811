"""flags.py: the command lines of promot.py and evaluate.py, without torch.

Each command's settings are a dataclass whose fields are its flags (support/cli.py makes the
parser): promot.py's `Config` with diagnostics.py's `TrainingFlags`, and evaluate.py's
`Settings`. They live here, apart from the code that runs them, so that `--help` answers before
torch loads (each command's first lines call `answer_help`): a tenth of a second, not several.
The same holds for the recipe in force, read to say in --help which default is whose.

The lists of choices name what promot.STAGES, evaluate.ROUTES, decode.LENGTH_RULES and
data.TRUNCATIONS implement; tests/test_command_line.py checks that they agree.
"""

import os
from dataclasses import dataclass, field

from support import cli
from support.cli import AT_LEAST_0, AT_LEAST_1, RATE, flag
from support.errors import BadInput, DamagedFile
from support.mixture import MIXING_RATES

# The miniature lab (docs/lab.md): what both commands run without --model and --data-dir.
_HERE = os.path.dirname(os.path.abspath(__file__))
LAB = {
    "model": os.path.join(_HERE, "lab", "tiny-t5"),
    "data_dir": os.path.join(_HERE, "lab", "data"),
    "task": "lab_owns",
    "out": os.path.join("runs", "lab"),
}

STAGE_NAMES = ("1", "2", "finetune", "joint", "random-prompt")  # promot.STAGES' rows
ROUTES = ("same_format", "same_answers", "fine_tuned_only", "always", "never")  # evaluate's
LENGTH_RULES = ("t5x", "transformers")  # decode.LENGTH_RULES
TRUNCATIONS = ("end", "fair")  # data.TRUNCATIONS
SELECT = ("0-shot", "0-shot-min", "train-shots", "train-shots-min")
C7 = "stage 1 with low-rank updates (LoRA) instead of a prompt (App. C.7)"
DIAGNOSTICS = "the paper's §3 measurements during training (docs/diagnostics.md)"
PROMPT_LENGTH = 100  # B.4; App. C.6 gives a decoder-only model 50
SEED = (lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)")
TARGET_ROOM = (lambda v: v >= 4, ">= 4 (two sentinels, an answer, EOS)")
# A recipe's sections: every stage's values, then those of what the stage tunes.
RECIPE_SECTIONS = ("every stage", "prompt", "lora", "model")


# ---------------------------------------------------------------------------
# promot.py
# ---------------------------------------------------------------------------


@dataclass
class TrainingFlags:
    """promot.py's diagnostics flags (docs/diagnostics.md); all off by default."""

    probe_every: int = flag(0, "probe at step 0 and every N steps (0: off)", valid=AT_LEAST_0)
    probe_tasks: str = flag("", "comma-separated unseen tasks the probes score")
    probe_shots: str = flag("1", "comma-separated demonstration counts of the probes")
    probe_limit: int = flag(100, "examples scored per probe task", valid=AT_LEAST_1)
    align_steps: str = flag("", "steps that record the gradient alignment: 0,100 and/or every:N")
    align_batch_size: int = flag(32, "examples in the gradient-alignment batch", valid=AT_LEAST_1)


@dataclass
class Config:
    """Every setting of promot.py (docs/training.md explains each). None: the stage's default
    [in brackets]; a recipe replaces the defaults it names."""

    stage: str = flag("1", "ProMoT stage 1 or 2, or a baseline (STAGES)", choices=STAGE_NAMES)
    model: str = flag("", "pretrained checkpoint folder [lab: lab/tiny-t5]")
    data_dir: str = flag("", "folder with one sub-folder per task [lab: lab/data]")
    task: str = flag("", "fine-tuned task, or several comma-separated [lab: lab_owns]")
    out: str = flag("", "run folder; each stage writes RUN/<stage>/ [lab: runs/lab]")
    recipe: str = flag("", "JSON of flag values per stage [--model's recipe.json; none: no recipe]")
    seed: int = flag(0, "seed of data order, prompt init, dropout, demonstrations", valid=SEED)
    steps: int = flag(None, "training steps [1: 5000; else 1000]", valid=AT_LEAST_1)
    batch_size: int = flag(64, "global batch size in examples", valid=AT_LEAST_1)
    micro_batch_size: int = flag(
        None, "examples per rank per forward pass [training: all; scoring: 16]", valid=AT_LEAST_1
    )
    lr: float = flag(
        None, "learning rate [1: 0.2, decoder 0.3, LoRA 1e-3; else 1e-3]", valid=AT_LEAST_0
    )
    label_smoothing: float = flag(None, "label smoothing [1: 0; else 0.1]", valid=RATE)
    weight_decay: float = flag(None, "Adafactor weight decay [1: 1e-5; else 0]", valid=RATE)
    dropout: float = flag(0.1, "dropout rate", valid=RATE)
    save_every: int = flag(None, "save, score every N steps [1: 1000; else 100]", valid=AT_LEAST_1)
    resume: bool = flag(False, "continue from the latest checkpoint of RUN/<stage>/")
    allow_change: str = flag("", "with --resume: go on although these changed: data, model")
    keep_checkpoints: int = flag(1, "training checkpoints kept", valid=AT_LEAST_1)
    hash_weights: bool = flag(False, "fingerprint --model's weights by content, not size and time")
    stop_after_step: int = flag(None, "save and stop after this step", valid=AT_LEAST_1)
    prompt_length: int = flag(
        None, "soft prompt length [100; decoder-only 50; stage 2: stage 1's]", valid=AT_LEAST_1
    )
    prompt_init: str = flag("uniform", "a new prompt: uniform, vocab, text[:WORDS] or file:PATH")
    prompt: str = flag("", "stage 2's frozen stage-1 file [RUN/stage1/best/]")
    train_examples: int = flag(None, "train on a seeded sample of N examples", valid=AT_LEAST_1)
    shots: list = flag(
        "0",
        "demonstrations before each training input (evaluate.py's --shots: its table's columns)",
    )
    select: str = flag("0-shot", "best/ by the tasks' mean (or -min) score", choices=SELECT)
    # T5's multi-task mixing rate: a recipe's setting ("mixing": "proportional"), not a flag
    mixing: str = field(default="equal", metadata=dict(choices=MIXING_RATES))
    max_input_tokens: int = flag(
        None, "input tokens kept, EOS included [the task's, else 1024]", valid=AT_LEAST_1
    )
    max_target_tokens: int = flag(256, "target tokens kept, EOS included", valid=TARGET_ROOM)
    truncation: str = flag("end", "how long inputs are cut (end: T5X's)", choices=TRUNCATIONS)
    dtype: str = flag("float32", "compute dtype", choices=("float32", "bfloat16"))
    device: str = flag("auto", "device to train on", choices=("auto", "cpu", "cuda"))
    activation_checkpointing: bool = flag(False, "recompute each block in backward")
    eval: bool = flag(True, "do not score checkpoints; best/ is the last")
    eval_examples: int = flag(None, "score the first N examples of each task", valid=AT_LEAST_1)
    num_beams: int = flag(4, "beam width when scoring", valid=AT_LEAST_1)
    max_new_tokens: int = flag(None, "longest decoded answer [per metric]", valid=AT_LEAST_1)
    log_every: int = flag(10, "print a progress line every N steps", valid=AT_LEAST_1)
    z_loss: float = 1e-4  # T5X's z-loss; not a flag (bench/train.py turns it off to compare)
    # App. C.7's module in the prompt's place, and diagnostics.py's flags: under their own headings
    stage1_module: str = flag("prompt", "what stage 1 trains", choices=("prompt", "lora"), group=C7)
    lora_rank: int = flag(4, "the rank of its q and v updates", valid=AT_LEAST_1, group=C7)
    diagnostics: TrainingFlags = field(default_factory=TrainingFlags)


PROMOT_ABOUT = (
    "ProMoT training (Wang et al., ICLR 2024), one stage per call. Defaults: the paper's "
    "(docs/defaults.md; [1: X; else Y] is --stage 1's and the other stages'; App. C.6's for a "
    "decoder-only checkpoint), except where the recipe in force sets a flag (--recipe FILE, "
    "else the --model folder's recipe.json): '(the recipe's: ...)' below. Flags given win. "
    "Without --model and --data-dir: the miniature lab (docs/lab.md) and its recipe."
)


def recipe_path(recipe, model):
    """The recipe in force: --recipe FILE, else the model folder's recipe.json when it has one;
    "" for none (--recipe none, or no such file)."""
    if recipe == "none":
        return ""
    if recipe and not os.path.isfile(recipe):
        raise BadInput(f"--recipe {recipe}: no such file (JSON of flag values; docs/training.md)")
    own = os.path.join(model, "recipe.json")
    return recipe or (own if model and os.path.isfile(own) else "")


def promot_parser(argv=None):
    """promot.py's parser; its --help names the recipe the command line `argv` puts in force
    and, on each flag the recipe sets, the recipe's values."""
    p = cli.Parser(prog="promot.py", formatter_class=cli.HelpFormatter, description=PROMOT_ABOUT)
    cli.add_flags(p, Config, required=("stage",))
    cli.add_flags(p, TrainingFlags, title=DIAGNOSTICS)
    known = cli.Parser(add_help=False)
    for name in ("--model", "--data-dir", "--recipe"):
        known.add_argument(name, default="")
    try:  # a command line or recipe that does not read is left to the parse that follows
        given = known.parse_known_args(argv)[0]
        path = recipe_path(given.recipe, given.model or ("" if given.data_dir else LAB["model"]))
        cli.mark_recipe(p, path, cli.read_recipe(path, RECIPE_SECTIONS) if path else {})
    except (BadInput, DamagedFile):
        pass
    return p


# ---------------------------------------------------------------------------
# evaluate.py
# ---------------------------------------------------------------------------


@dataclass
class Settings:
    """Every flag of evaluate.py; a bracket says what an unset flag means. The defaults are the
    paper's (App. B.4: beam 4, T5X's decoding); docs/evaluation.md explains each flag."""

    model: str = flag("", "checkpoint folder [lab: runs/lab/stage2/best, else lab/tiny-t5]")
    data_dir: str = flag("", "task folders' folder, or several comma-separated [lab: lab/data]")
    out: str = flag(
        "",
        "results JSON to write, every example included [lab: runs/lab/eval.json; --model "
        "RUN/<stage>/best: RUN/<stage>/eval.json]",
    )
    task: str = flag("", "fine-tuned task(s), scored first [training.json's, the prompt file's]")
    eval_tasks: str = flag(None, "tasks to score [the paper's eight, else --data-dir's folders]")
    skip_missing_tasks: bool = flag(False, "skip evaluation tasks without a folder; name them")
    shots: list = flag(
        "1,4",
        "demonstrations before each scored input, a column each (promot.py's --shots: training's)",
    )
    task_shots: list = flag(
        None, "demonstrations for the fine-tuned task(s) [0 and the training's]"
    )
    prompt: str = flag("", "soft prompt file (prompt.safetensors, T5X .npy) [--model's own]")
    lora: str = flag("", "LoRA adapter file of promot.py --stage1-module lora [--model's own]")
    bare_model: bool = flag(False, "score --model alone, without its prompt or LoRA file")
    route: str = flag(
        "by_stage",
        "tasks that get the prompt or LoRA [by_stage: stage 1's fine_tuned_only, else same_format]",
        choices=("by_stage", *ROUTES),
    )
    baseline: str = flag("", "results JSON of another run, for the Norm. Avg. differences")
    eval_examples: int = flag(
        None, "score the first N examples of each task [all]", valid=AT_LEAST_1
    )
    eval_batch_size: int = flag(16, "examples per rank per decoding batch", valid=AT_LEAST_1)
    num_beams: int = flag(4, "beam width (App. B.4); 1 is greedy search", valid=AT_LEAST_1)
    max_new_tokens: int = flag(None, "longest answer in tokens [the metric's]", valid=AT_LEAST_1)
    length_penalty: float = flag(0.6, "alpha of the length rule", valid=cli.FINITE)
    length_rule: str = flag("t5x", "beam search's length rule", choices=LENGTH_RULES)
    max_input_tokens: int = flag(
        None, "input tokens kept, EOS included [the task's, else 1024]", valid=AT_LEAST_1
    )
    truncation: str = flag("end", "how long inputs are cut (end: T5X's)", choices=TRUNCATIONS)
    seed: int = flag(0, "seed for choosing demonstrations")
    demo_pool: int = flag(
        None, "draw demonstrations from N training examples [all]", valid=AT_LEAST_1
    )
    dtype: str = flag("float32", "compute dtype of the model", choices=("float32", "bfloat16"))
    device: str = flag(
        "auto", "auto: cuda when available, else cpu", choices=("auto", "cpu", "cuda")
    )
    # The flagless run: the pretrained lab model, scored first into --baseline (not a flag)
    baseline_model: str = ""


EVALUATE_ABOUT = (
    "Score a (ProMoT-)fine-tuned T5/mT5 or decoder-only checkpoint on the paper's tasks and print "
    "its table. Without --model and --data-dir: the miniature lab, scoring what the flagless "
    "promot.py --stage 1 and --stage 2 trained (runs/lab/stage2/best) against the pretrained "
    "lab/tiny-t5."
)


def evaluate_parser(argv=None):
    """evaluate.py's parser (`argv` is unused: the signature of promot_parser's)."""
    p = cli.Parser(
        prog="evaluate.py", formatter_class=cli.HelpFormatter, description=EVALUATE_ABOUT
    )
    cli.add_flags(p, Settings)
    return p


def answer_help(parser_of, argv):
    """When `argv` asks for --help, print it and exit, before the command imports torch; every
    other command line is left to the command's own parse (and its one-line errors)."""
    try:
        parser_of(argv).parse_known_args(argv)
    except BadInput:
        pass
