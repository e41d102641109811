"""lab/run.py: the whole ProMoT comparison, in miniature, on a CPU.

    python lab/run.py          # under 10 minutes on 2 CPU cores -> runs/lab_comparison/table.md
    python lab/run.py --quick  # a couple of minutes: fewer steps and examples (CI)

It does what the paper's Table 3 does, with the bundled tiny T5 (lab/tiny-t5/)
and the synthetic suite (lab/tasks.py) in place of mT5 XXL and the ten data sets,
by calling the two programs a user calls, promot.py and evaluate.py, as
subprocesses (every command is printed, so each step can be rerun by hand):

  1. write the suite as JSONL tasks:  python -m lab.tasks --out RUN/data
  2. Pretrained:                      evaluate.py on lab/tiny-t5
  3. Prompt tuning:                   promot.py --stage 1, evaluate.py with its prompt
  4. ProMoT:                          promot.py --stage 2 (same run folder), evaluate.py
  5. Standard fine-tuning:            promot.py --stage finetune, evaluate.py
  6. ProMoT + 1-shot:                 stages 1 and 2 with --shots 1, evaluate.py
  7. the table:                       RUN/table.md (and RUN/table.json)
  8. the diagnostics figures:         diagnostics.py plot RUN/finetune RUN/promot --out RUN/figures

Standard fine-tuning and ProMoT's stage 2 run with the paper's §3 diagnostics:
in-context probes of four unseen tasks (lab_lives, lab_kind, lab_who, lab_news: their
scores and the share of "True"/"False" answers, Fig. 1-2) every `probe_every` steps,
and the gradient alignment with label-shuffled data (Fig. 3) at the first and
last step. They never change the training trajectory (tested in tests/).

The fine-tuning task is lab_owns (True/False, like RTE), scored 0-shot; the
other eight tasks are scored 1-shot (their Norm. Avg.). The extra row
"True/False answers" is the paper's Fig. 2 measure: the percent of answers
whose first word is "True" or "False" on the tasks whose answers are never
True/False (lab_kind, lab_who, lab_where, lab_zorbish, lab_backwards, lab_news).
evaluate.py prepends a ProMoT prompt to the tasks of the fine-tuned task's format
group (its default --route by_stage, paper §4 and §5.3): lab_owns, and lab_both and
lab_lives as RTE's goes to WiC and CB; every other task sees the plain model. A stage-1
prompt goes to lab_owns alone (§5.1).

Settings differ from the paper's App. B.4 where a 1.3M-parameter model and a
10-minute budget need it (steps, batch, prompt length, greedy decoding, model lr
1e-2, dropout 0, and the model-tuning stages scored at their last step rather than
at the best of ten checkpoints: the bundled model does lab_owns at 91% before any
fine-tuning, so the best-checkpoint rule would stop every run at its first
checkpoint); the training flags are the bundled model's recipe, lab/tiny-t5/recipe.json (the
one promot.py uses without --model and --data-dir), the rest are the constants below, and all
are written into RUN/table.json. The commands are numbered ("[3/12] $ ...").
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lab import tasks as lab_tasks  # noqa: E402

FINE_TUNING_TASK = lab_tasks.FINE_TUNING_TASK
EVALUATION_TASKS = lab_tasks.EVALUATION_TASKS
# Tasks whose answers are never "True"/"False": where a True/False answer is format specialization.
OTHER_FORMAT_TASKS = tuple(
    n for n in EVALUATION_TASKS if "True" not in (lab_tasks.make_task(n).label_words or ())
)
# Probed during standard fine-tuning and stage 2 (paper Fig. 1-2): the CB-like task, the multiple
# choice, a short answer and the summary, which standard fine-tuning turns to "True"/"False".
PROBE_TASKS = ("lab_lives", "lab_kind", "lab_who", "lab_news")

# The training flags of every stage are the bundled model's recipe, lab/tiny-t5/recipe.json, which
# promot.py also uses when run without --model and --data-dir. Stage 1 learns only the prompt, so
# it gets a high lr (paper: 0.2 for 5000 steps). Model tuning (standard fine-tuning, stage 2) uses
# lr 1e-2, ten times the paper's 1e-3 for mT5 XXL (Adafactor, relative to the parameter RMS): the
# 1.3M-parameter model learns lab_owns and forgets nothing after 700 steps at 1e-3 or 1000 at
# 3e-3; the damage starts after ~600 steps at 5e-3 and ~250 at 1e-2 (`--lr 1e-3`; docs/lab.md).
# The model-tuning stages keep only their last checkpoint (save_every = their steps): the model
# does lab_owns at 90-100% before fine-tuning, so the best-checkpoint rule would stop at the
# first checkpoint, before anything happens. Dropout is 0, not the paper's 0.1: the bundled
# model was pretrained without dropout (as T5.1.1 was), and with the previous checkpoint
# standard fine-tuning at 0.1 did not learn lab_owns at all (57.8% after 200 steps).
RECIPE = "recipe.json"  # in the --model folder: lab/tiny-t5/'s, or lab/tiny-llama/'s
SECTIONS = ("every stage", "prompt", "model")
# --quick (CI): what it changes in the recipe
QUICK = {
    "every stage": dict(batch_size=16, eval_examples=32),
    "prompt": dict(steps=60, save_every=30),
    "model": dict(steps=200, save_every=200),
}
# What lab/run.py adds to the recipe: the examples evaluate.py scores per task (limit), the
# training examples per task it writes, and the diagnostics' probes during model tuning.
COMPARISON = {
    "full": dict(limit=64, train_size=4000, probe_every=50, probe_limit=32),
    "quick": dict(limit=32, train_size=1000, probe_every=50, probe_limit=16),
}

METHODS = ("pretrained", "prompt_tuning", "finetune", "promot", "promot_1shot")
TITLES = {
    "pretrained": "Pretrained",
    "prompt_tuning": "Prompt tuning",
    "finetune": "Standard fine-tuning",
    "promot": "ProMoT",
    "promot_1shot": "ProMoT + 1-shot",
}


class Commands:
    """Runs the comparison's programs one after another, each announced with its number
    ("[3/12] $ python promot.py ..."); a program's output goes to its log file and, unless
    `quiet`, to the screen."""

    def __init__(self, total: int, quiet: bool, stream=None):
        self.total, self.quiet, self.done, self.stream = total, quiet, 0, stream or sys.stdout

    def __call__(self, cmd, log_path: Path) -> None:
        self.done += 1
        command = " ".join(shlex.quote(str(c)) for c in cmd)
        print(f"[{self.done}/{self.total}] $ {command}", file=self.stream, flush=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w", encoding="utf-8") as log:
            proc = subprocess.Popen(
                [str(c) for c in cmd],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
            )
            for line in proc.stdout:
                log.write(line)
                if not self.quiet:
                    print("    " + line.rstrip(), file=self.stream, flush=True)
            code = proc.wait()
        if code != 0:
            tail = log_path.read_text(encoding="utf-8").splitlines()[-15:]
            raise SystemExit(
                f"lab/run.py: command {self.done}/{self.total} failed (exit {code}); last lines "
                f"of {log_path}:\n" + "\n".join(tail)
            )


def recipe(s: dict, stage: str) -> dict:
    """promot.py's flags for `stage` from the recipe in `s`: every stage's, then stage 1's or
    the model-tuning stages'."""
    return {**s["recipe"]["every stage"], **s["recipe"][STAGE_SECTION[stage]]}


STAGE_SECTION = {"1": "prompt", "2": "model", "finetune": "model"}


def diagnostics_flags(s: dict) -> list:
    """promot.py flags for the paper's §3 measurements during model tuning."""
    steps = s["recipe"]["model"]["steps"]
    every = min(s["probe_every"], steps)
    return [
        "--probe-every",
        every,
        "--probe-tasks",
        ",".join(PROBE_TASKS),
        "--probe-shots",
        1,
        "--probe-limit",
        s["probe_limit"],
        "--align-steps",
        f"0,{steps}",
        "--align-batch-size",
        16,
    ]


def train(run, stage, out: Path, s: dict, model: str, data_dir: Path, extra=()):
    """promot.py --stage `stage` with the recipe's flags, into the run folder `out`."""
    cmd = [sys.executable, "promot.py", "--stage", stage, "--model", model, "--data-dir", data_dir]
    cmd += ["--task", FINE_TUNING_TASK, "--out", out, "--seed", s["seed"]]
    for name, value in recipe(s, stage).items():
        cmd += [f"--{name.replace('_', '-')}", value]
    run([*cmd, *extra], out.parent / "logs" / f"{out.name}_{stage}.txt")


def evaluate(run, name, model, prompt, out: Path, s: dict, data_dir: Path):
    cmd = [
        sys.executable,
        "evaluate.py",
        "--model",
        model,
        "--data-dir",
        data_dir,
        "--out",
        out / "eval" / f"{name}.json",
        "--eval-tasks",
        ",".join(EVALUATION_TASKS),
        "--shots",
        "1",
        "--task",
        FINE_TUNING_TASK,
        "--num-beams",
        1,
        "--max-new-tokens",
        40,
        "--eval-batch-size",
        32,
        "--eval-examples",
        s["limit"],
    ]
    if prompt:
        cmd += ["--prompt", prompt]
    run(cmd, out / "eval" / f"{name}.log")
    return json.loads((out / "eval" / f"{name}.json").read_text(encoding="utf-8"))


def summarize(results: dict) -> dict:
    """{method: {task: score, "norm_avg": ..., "true_false_ratio": ...}} from evaluate.py's JSON."""
    table = {}
    for method, res in results.items():
        row = {}
        for r in res[
            "runs"
        ]:  # a +1-shot run's task is also scored 1-shot (its training.json); here 0-shot
            if r["role"] == "evaluation" or r["shots"] == 0:
                row[r["task"]] = r["score"]
        row["norm_avg"] = res["norm_avg"]["1"]
        ratios = [
            r["format_ratio"]
            for r in res["runs"]
            if r["role"] == "evaluation" and r["task"] in OTHER_FORMAT_TASKS
        ]
        row["true_false_ratio"] = sum(ratios) / len(ratios)
        table[method] = row
    return table


def markdown(table: dict) -> str:
    """Tasks as rows, methods as columns, like the paper's Table 3."""
    methods = list(table)
    lines = [
        "| | " + " | ".join(TITLES[m] for m in methods) + " |",
        "|---" * (len(methods) + 1) + "|",
    ]

    def row(label, key, fmt="{:.1f}"):
        lines.append(
            f"| {label} | " + " | ".join(fmt.format(table[m][key]) for m in methods) + " |"
        )

    row(f"**{FINE_TUNING_TASK}** (fine-tuned, 0-shot, accuracy)", FINE_TUNING_TASK)
    row("**Norm. Avg.** (8 unseen tasks, 1-shot)", "norm_avg")
    row("**True/False answers** on the 6 other-format tasks (%)", "true_false_ratio")
    for name in EVALUATION_TASKS:
        row(f"{name} ({lab_tasks.make_task(name).metric})", name)
    return "\n".join(lines)


def figure(table: dict, path: Path, title: str = "") -> bool:
    """Two bar charts: the fine-tuned task and the unseen tasks' Norm. Avg. per method, and the
    True/False answer ratio on other-format tasks (the paper's Fig. 2 measure, at the end of
    training). Needs matplotlib (requirements.txt); returns False without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    methods = list(table)
    x = range(len(methods))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.38
    left.bar(
        [i - width / 2 for i in x],
        [table[m][FINE_TUNING_TASK] for m in methods],
        width,
        label=f"{FINE_TUNING_TASK} (fine-tuned, 0-shot)",
        color="#4c72b0",
    )
    left.bar(
        [i + width / 2 for i in x],
        [table[m]["norm_avg"] for m in methods],
        width,
        label="Norm. Avg. of 8 unseen tasks (1-shot)",
        color="#dd8452",
    )
    right.bar(list(x), [table[m]["true_false_ratio"] for m in methods], 0.6, color="#c44e52")
    for ax, name in (
        (left, "scores"),
        (right, "'True'/'False' answers on other-format tasks (%)"),
    ):
        ax.set_xticks(list(x))
        ax.set_xticklabels([TITLES[m] for m in methods], rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 118 if ax is left else 100)
        ax.set_title(name, fontsize=10)
    left.legend(fontsize=8, loc="upper center", ncol=2)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="The miniature ProMoT comparison (pretrained, prompt tuning, "
        "fine-tuning, ProMoT, ProMoT + 1-shot) on a bundled tiny model: lab/tiny-t5 (T5.1.1), "
        "or lab/tiny-llama (decoder-only, App. C.6), each trained with its recipe.json."
    )
    p.add_argument(
        "--out",
        default=str(ROOT / "runs" / "lab_comparison"),
        help="run folder (replaced); not runs/lab, which the flagless promot.py uses",
    )
    p.add_argument(
        "--model",
        default=str(ROOT / "lab" / "tiny-t5"),
        help="pretrained checkpoint with a recipe.json: lab/tiny-t5, lab/tiny-llama",
    )
    p.add_argument(
        "--quick", action="store_true", help="fewer steps and examples: a couple of minutes"
    )
    p.add_argument(
        "--steps", type=int, default=None, help="override the steps of every training stage"
    )
    p.add_argument(
        "--eval-examples",
        dest="limit",
        type=int,
        default=None,
        help="override the examples scored per task",
    )
    p.add_argument(
        "--lr", type=float, default=None, help="override the model-tuning lr (stage 2, fine-tuning)"
    )
    p.add_argument(
        "--stage1-lr", type=float, default=None, help="override the prompt lr of stage 1"
    )
    p.add_argument(
        "--dropout", type=float, default=None, help="override the dropout of every stage"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="promot.py's --seed for every training stage (data order, prompt init, "
        "demonstrations); "
        "evaluation keeps its demonstrations (seed 0), so the pretrained column does not move",
    )
    p.add_argument("--quiet", action="store_true", help="print only commands and the table")
    p.add_argument(
        "--figures-only",
        action="store_true",
        help="redraw --out's figure.png and figures/ from its table.json and runs, train nothing",
    )
    return p.parse_args(argv)


def main(argv=None):
    """Every command of the comparison, then RUN/table.md, RUN/table.json and the figures."""
    args = parse_args(argv)
    out = Path(args.out)
    if args.figures_only:
        return redraw(out)
    s = settings(args)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    started = time.time()
    data_dir = out / "data"
    run = Commands(COMMANDS, args.quiet)
    run(
        [sys.executable, "-m", "lab.tasks", "--out", data_dir, "--train-size", s["train_size"]],
        out / "log_data.txt",
    )

    timings, results = {}, {}

    def timed(name, fn):
        t0 = time.time()
        value = fn()
        timings[name] = round(time.time() - t0, 1)
        return value

    m = args.model
    results["pretrained"] = timed(
        "eval pretrained", lambda: evaluate(run, "pretrained", m, None, out, s, data_dir)
    )
    timed("stage 1", lambda: train(run, "1", out / "promot", s, m, data_dir))
    prompt = out / "promot" / "stage1" / "best" / "prompt.safetensors"
    results["prompt_tuning"] = timed(
        "eval prompt tuning", lambda: evaluate(run, "prompt_tuning", m, prompt, out, s, data_dir)
    )
    diag = diagnostics_flags(s)
    timed("finetune", lambda: train(run, "finetune", out / "finetune", s, m, data_dir, diag))
    tuned = out / "finetune" / "finetune" / "best"
    results["finetune"] = timed(
        "eval finetune", lambda: evaluate(run, "finetune", tuned, None, out, s, data_dir)
    )
    timed("stage 2", lambda: train(run, "2", out / "promot", s, m, data_dir, diag))
    best = out / "promot" / "stage2" / "best"
    results["promot"] = timed(
        "eval promot",
        lambda: evaluate(run, "promot", best, best / "prompt.safetensors", out, s, data_dir),
    )
    one_shot = ["--shots", 1]
    timed(
        "stage 1 +1-shot", lambda: train(run, "1", out / "promot_1shot", s, m, data_dir, one_shot)
    )
    timed(
        "stage 2 +1-shot", lambda: train(run, "2", out / "promot_1shot", s, m, data_dir, one_shot)
    )
    best1 = out / "promot_1shot" / "stage2" / "best"
    results["promot_1shot"] = timed(
        "eval promot 1-shot",
        lambda: evaluate(
            run, "promot_1shot", best1, best1 / "prompt.safetensors", out, s, data_dir
        ),
    )

    table = summarize({k: results[k] for k in METHODS})
    drew = figure(table, out / "figure.png", model_name(args.model))
    plot = [sys.executable, "diagnostics.py", "plot", out / "finetune", out / "promot"]
    timed("figures", lambda: run([*plot, "--out", out / "figures"], out / "logs" / "plot.txt"))
    record = dict(table=table, settings=s, model=str(args.model), seconds=timings)
    write_table(out, record, (time.time() - started) / 60, drew)
    return table


def redraw(out: Path) -> dict:
    """--figures-only: figure.png from RUN/table.json, figures/ from the runs' diagnostics."""
    path = out / "table.json"
    if not path.is_file():
        raise SystemExit(f"lab/run.py: {path}: no such file; run lab/run.py --out {out} first")
    record = json.loads(path.read_text(encoding="utf-8"))
    if not figure(record["table"], out / "figure.png", model_name(record["model"])):
        raise SystemExit("lab/run.py: --figures-only needs matplotlib (pip install matplotlib)")
    plot = [sys.executable, "diagnostics.py", "plot", out / "finetune", out / "promot"]
    Commands(1, True)([*plot, "--out", out / "figures"], out / "logs" / "plot.txt")
    print(f"figure: {out}/figure.png; diagnostics: {out}/figures/", flush=True)
    return record["table"]


def model_name(model) -> str:
    """The figure's name for a model folder: its config.json's model_type and size."""
    config = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
    return f"{Path(model).name} ({config.get('model_type', 't5')})"


def write_table(out: Path, record: dict, minutes: float, drew: bool) -> None:
    """RUN/table.md (what docs/lab.md publishes), RUN/table.json (its settings and times), and
    the table on the screen."""
    text = markdown(record["table"])
    (out / "table.md").write_text(text + "\n", encoding="utf-8")
    record = dict(record, minutes=round(minutes, 1))
    (out / "table.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print("\n" + text)
    if drew:
        print(f"figure: {out}/figure.png")
    print(f"diagnostics (CSV, and PNG with matplotlib): {out}/figures/")
    print(f"\n{out}/table.md written in {minutes:.1f} min", flush=True)


# The programs main() runs: the data, 5 training stages, 5 evaluations, the figures.
COMMANDS = 12


def settings(args) -> dict:
    """The recipe (the model folder's recipe.json; --quick's changes; the override flags) and
    lab/run.py's own settings, as RUN/table.json records them."""
    path = Path(args.model) / RECIPE
    if not path.is_file():
        raise SystemExit(f"lab/run.py: {path}: no such file; --model needs a recipe.json")
    text = json.loads(path.read_text(encoding="utf-8"))
    sections = {name: dict(text[name]) for name in SECTIONS}
    for name, values in (QUICK if args.quick else {}).items():
        sections[name].update(values)
    s = dict(COMPARISON["quick" if args.quick else "full"], seed=args.seed, recipe=sections)
    if args.steps:
        for name in SECTIONS[1:]:
            sections[name].update(steps=args.steps, save_every=args.steps)
    if args.limit:
        s.update(limit=args.limit)
        sections["every stage"].update(eval_examples=args.limit)
    if args.lr is not None:
        sections["model"].update(lr=args.lr)
    if args.stage1_lr is not None:
        sections["prompt"].update(lr=args.stage1_lr)
    if args.dropout is not None:
        sections["every stage"].update(dropout=args.dropout)
    return s


if __name__ == "__main__":
    main()
