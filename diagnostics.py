"""diagnostics.py: the paper's measurements of format specialization (§3, App. C.3, C.8).

Why fine-tuning forgets, measured three ways:

- in-context probes (Fig. 1, Fig. 2): during fine-tuning, every N steps, score
  k-shot on unseen tasks without the prompt and count how many answers fall in
  the fine-tuned task's label set (the "True/False ratio");
- gradient alignment (Fig. 3, Fig. 7): the cosine between the gradient on a
  batch of the task and the gradient on the same inputs with labels shuffled
  (the "format gradient"), per parameter kind of the last decoder layer and
  for the whole model;
- the trade-off (Fig. 5, Fig. 6): fine-tuned task score against the average
  unseen-task score, one point per checkpoint.

This file is separate from promot.py (which trains) and evaluate.py (which
scores) because it is read on its own: it is the paper's §3 in code. The
trainer adds the `TrainingFlags` to its command line and calls the hook that
`training_hook` returns after every step; `python diagnostics.py plot RUN_DIR`
draws the figures; `python diagnostics.py align` measures the gradient
alignment of any checkpoint.

Records go to RUN_DIR/diagnostics.jsonl, one JSON object per line:
  {"kind": "probe", "stage", "step", "task", "shots", "score", "metric", "format_ratio",
   "num_examples", "format_words": the fine-tuned task's label words, "shared_words": those
   that are also the probed task's own label words}
  {"kind": "alignment", "stage", "step", "task", "layer", "cosines": {group: cos}}
"""

import contextlib
import csv
import json
import math
import os
import sys
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist

import checks
import data
import evaluate
import model as model_lib
from flags import TrainingFlags  # noqa: F401 (promot.py's flags for the hook below)
from support import cli, dataset_files, lora, prompt_formats, run_checkpoints, t5x_loss
from support.errors import BadInput, DamagedFile

# ----------------------------------------------------------------------------
# Gradient alignment (paper §3.3, Fig. 3 and Fig. 7)


def alignment_groups(t5, layer=-1):
    """{group: parameter names}: the MLP kernels and each attention's Q, K, V of one
    decoder layer (the last by default, as in the paper), and the whole model."""
    n = len(t5.decoder.blocks)
    prefix = f"decoder.blocks.{layer % n}."
    names = [name for name, p in t5.named_parameters() if p.requires_grad and ".lora." not in name]
    groups = {"mlp": [x for x in names if x.startswith(prefix + "ff.")]}
    for attention in ("self_attn", "cross_attn"):
        for projection in "qkv":
            groups[f"{attention}.{projection}"] = [prefix + f"{attention}.{projection}.weight"]
    groups["model"] = names
    return groups


def batch_gradients(t5, batch, prompt=None, label_smoothing=0.0):
    """{name: gradient} of the batch's mean token loss; leaves every .grad empty afterwards.

    Under FSDP each rank passes its slice of the global batch and gets its
    shard of the gradient (of the loss normalised by the global token count,
    as the trainer does). The prompt is detached: it is a fixed input here.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    t5.zero_grad(set_to_none=True)
    labels = batch["labels"]
    prompt = None if prompt is None else prompt.detach()
    decoder_input = model_lib.shift_right(labels)
    logits = t5(batch["input_ids"], batch["attention_mask"], decoder_input, prompt=prompt)
    loss_sum, count = t5x_loss.cross_entropy(logits, labels, label_smoothing)
    total = count.double()
    if world > 1:
        dist.all_reduce(total)
    (loss_sum * (world / total)).backward()  # FSDP averages over ranks; undo that
    grads = {}
    for name, p in t5.named_parameters():
        if p.grad is not None:
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            grads[name] = g.detach().clone()
    t5.zero_grad(set_to_none=True)
    return grads


def cosine_similarities(g, h, groups):
    """cos(g, h) per group over whole tensors.

    FSDP2 shards every parameter along dim 0, so the dot products and norms
    of the full tensors are the sums of the shard-local ones over the ranks.
    """
    sums = []
    for names in groups.values():
        dot, gg, hh = (torch.zeros((), dtype=torch.float64) for _ in range(3))
        for name in names:
            if name in g:
                a, b = g[name].double().cpu(), h[name].double().cpu()
                dot, gg, hh = dot + (a * b).sum(), gg + (a * a).sum(), hh + (b * b).sum()
        sums.append(torch.stack([dot, gg, hh]))
    sums = torch.stack(sums)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    return {
        group: (float(d / math.sqrt(a * b)) if a > 0 and b > 0 else float("nan"))
        for group, (d, a, b) in zip(groups, sums.tolist())
    }


def alignment_batches(task, examples, tokenizer, batch_size, seed, device="cpu"):
    """This rank's slice of (a batch of the task, the same inputs with labels shuffled)."""
    task = data.get_task(task)
    if task.label_words is None:
        raise BadInput(
            f"task {task.name}: label shuffling needs a classification task "
            "(one with label words, e.g. rte, cb, wic, snli)"
        )
    if len(examples) < batch_size:
        raise BadInput(
            f"task {task.name}: {len(examples)} examples, "
            f"fewer than --align-batch-size {batch_size}"
        )
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))
    chosen = [examples[i] for i in order[:batch_size].tolist()]
    shuffled = data.shuffle_labels(chosen, seed)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if batch_size % world:
        raise BadInput(f"--align-batch-size {batch_size} must be divisible by the {world} ranks")
    part = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
    return [
        data.encode_batch(
            tokenizer,
            data.training_pairs(task, xs)[part],
            max_input_tokens=1024,
            max_target_tokens=256,
            device=device,
        )
        for xs in (chosen, shuffled)
    ]


def gradient_alignment(t5, batch, shuffled_batch, prompt=None, layer=-1, label_smoothing=0.0):
    """cos(g, g_format) per group (paper §3.3): g on the task's batch, g_format on the
    same inputs with shuffled labels. Dropout is off so that only the labels differ."""
    was_training = t5.training
    t5.eval()
    try:
        g = batch_gradients(t5, batch, prompt, label_smoothing)
        h = batch_gradients(t5, shuffled_batch, prompt, label_smoothing)
    finally:
        t5.train(was_training)
    if not g:
        raise BadInput(
            "gradient alignment needs trainable model weights (stage 2 or fine-tuning, "
            "not prompt tuning)"
        )
    return cosine_similarities(g, h, alignment_groups(t5, layer))


# ----------------------------------------------------------------------------
# During training: probes and alignment at chosen steps

flag, AT_LEAST_0, AT_LEAST_1 = cli.flag, cli.AT_LEAST_0, cli.AT_LEAST_1
# promot.py's flags for what follows (probe_* and align_*) are flags.TrainingFlags, defined
# without torch so that promot.py --help answers at once.


def training_hook(flags, cfg, tasks, tokenizer, stage):
    """`on_step(step, model, prompts, unshard)` measuring what the TrainingFlags ask for, or None
    when they ask for nothing. promot calls it at step 0 before training and after every
    optimizer step; it decides itself what is due. `cfg` gives the run's out, data_dir, seed,
    num_beams and stage; `stage` names the records' stage (the stage's folder)."""
    checks.check_training_flags(flags, cfg.stage, len(tasks))
    probes = flags.probe_every and comma_separated(flags.probe_tasks)
    if not (probes or comma_separated(flags.align_steps)):
        return None
    args = (cfg.out, stage, tokenizer, cfg.data_dir, tasks[0], cfg.seed, cfg.num_beams)
    return TrainingDiagnostics(flags, *args).run


def comma_separated(text):
    return [part.strip() for part in text.split(",") if part.strip()]


class TrainingDiagnostics:
    """What the trainer calls at chosen steps; never changes the training trajectory.

    Probes and alignment run with the RNG state saved and restored, dropout
    off, and gradients cleared afterwards, so a run with diagnostics ends with
    the same weights as one without. A failing probe is logged and training
    goes on (unless `strict`, as the tests set it).
    """

    align_layer = -1  # the decoder layer of the per-kind groups: the last, as in the paper

    def __init__(
        self, flags, out_dir, stage, tokenizer, data_dir, finetune_task, seed=0, num_beams=1
    ):
        self.path = os.path.join(out_dir, "diagnostics.jsonl")
        self.stage, self.tokenizer, self.strict = stage, tokenizer, False
        self.finetune_task = data.get_task(finetune_task, data_dir)
        self.label_words = self.finetune_task.label_words or ()
        self.probe_every = flags.probe_every
        self.probe_shots = tuple(int(shots) for shots in comma_separated(flags.probe_shots))
        steps = comma_separated(flags.align_steps)  # "every:N" records every N steps
        self.align_every = max([int(s[6:]) for s in steps if s.startswith("every:")], default=0)
        self.align_steps = {int(step) for step in steps if not step.startswith("every:")}
        self.seed, self.num_beams = seed, num_beams
        self.probe_sets = dict(
            probe_set(name, data_dir, self.probe_shots, flags.probe_limit)
            for name in comma_separated(flags.probe_tasks)
        )
        self.align_data = None
        if self.align_steps or self.align_every:
            train = alignment_examples(self.finetune_task, data_dir)
            self.align_data = (train, flags.align_batch_size)

    def due(self, step):
        probe = bool(self.probe_sets) and self.probe_every > 0 and step % self.probe_every == 0
        every = self.align_every > 0 and step % self.align_every == 0
        align = self.align_data is not None and (step in self.align_steps or every)
        return probe, align

    def run(self, step, t5, prompts=None, unshard=contextlib.nullcontext):
        """Measure at `step` if due. `unshard` is the trainer's context that holds full
        weights on every rank (decoding lengths differ across ranks under FSDP)."""
        probe, align = self.due(step)
        if not (probe or align):
            return []
        records = []
        device = next(t5.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            try:
                if probe:
                    with unshard(t5):
                        records += self.probe(step, t5, prompts or {})
                if align:
                    records.append(self.align(step, t5, prompts or {}, device))
            except Exception as e:  # a probe must not kill a long run silently
                if self.strict:
                    raise
                message = f"diagnostics at step {step} failed: {type(e).__name__}: {e}"
                records.append(
                    {"kind": "error", "stage": self.stage, "step": step, "error": message}
                )
                print(
                    message + " (training continues)",
                    flush=True,
                )
                traceback.print_exc(limit=3)
        self.write(records)
        return records

    def probe(self, step, t5, prompts):
        try:
            return [
                record
                for name in self.probe_sets
                for record in self._probe(step, t5, prompts, name)
            ]
        finally:
            lora.set_lora_enabled(t5, True)  # training goes on with its adapters, whatever happened

    def _probe(self, step, t5, prompts, name):
        """One probe task at each of the probe shot counts."""
        examples, pool = self.probe_sets[name]
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        # LoRA adapters, like the prompt, only for the fine-tuned task's format (paper §4)
        lora.set_lora_enabled(t5, evaluate.same_format(name, self.finetune_task))
        records = []
        for shots in self.probe_shots:
            result = evaluate.score_task(
                t5,
                self.tokenizer,
                name,
                examples,
                pool=pool,
                shots=shots,
                prompt=evaluate.route_prompt(name, prompts),
                num_beams=self.num_beams,  # the paper's length rule: evaluate.generate's default
                seed=self.seed,
                format_label_words=self.label_words or None,
                distributed=distributed,
            )
            record = dict(kind="probe", stage=self.stage, step=step, task=name, shots=shots)
            record.update(
                {k: result.get(k) for k in ("metric", "score", "format_ratio", "num_examples")}
            )
            # a task whose own answers use the format's words has a high ratio from step 0
            shared = set(data.get_task(name).label_words or ()) & set(self.label_words)
            record.update(format_words=list(self.label_words), shared_words=sorted(shared))
            records.append(record)
            line = (
                f"probe step {step}: {name} {shots}-shot {result['metric']} {result['score']:.2f}"
            )
            if self.label_words:
                line += f", {'/'.join(self.label_words)} ratio {result['format_ratio']:.1f}%"
            print(line, flush=True)
        return records

    def align(self, step, t5, prompts, device):
        train, batch_size = self.align_data
        batch, shuffled = alignment_batches(
            self.finetune_task, train, self.tokenizer, batch_size, self.seed, device=device
        )
        prompt = evaluate.route_prompt(self.finetune_task.name, prompts)
        cosines = gradient_alignment(t5, batch, shuffled, prompt, self.align_layer)
        line = ", ".join(f"{k} {v:.3f}" for k, v in cosines.items())
        print(f"gradient alignment step {step}: {line}", flush=True)
        task, layer = self.finetune_task.name, self.align_layer
        return dict(
            kind="alignment", stage=self.stage, step=step, task=task, layer=layer, cosines=cosines
        )

    def write(self, records):
        if records and (not dist.is_initialized() or dist.get_rank() == 0):
            with open(self.path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)


def probe_set(name, data_dir, shots, limit):
    """(task name, (its first `limit` evaluation examples, its demonstration pool))."""
    try:
        task = data.register_tasks([name], data_dir)[0]  # scored and routed by name
        _, examples = data.load_eval_split(task, data_dir)
        pool = data.load_split(task, data_dir, task.demo_split) if max(shots) else examples
    except (BadInput, DamagedFile) as e:
        raise type(e)(f"--probe-tasks {name}: not available in {data_dir} ({e})") from None
    return task.name, (examples[:limit], pool)


def alignment_examples(task, data_dir):
    """The fine-tuned task's training examples, whose labels the alignment shuffles."""
    try:
        train = data.load_split(task, data_dir, "train")
    except (BadInput, DamagedFile) as e:
        raise type(e)(f"gradient alignment: {e}") from None
    if task.label_words is None:
        raise BadInput(
            f"--align-steps: {task.name} is not a classification task; "
            "label shuffling needs label words"
        )
    return train


# ----------------------------------------------------------------------------
# Figures


def run_records(run_dir):
    """(diagnostics records, checkpoint evaluations from log.jsonl) of one run folder."""
    path, log = os.path.join(run_dir, "diagnostics.jsonl"), os.path.join(run_dir, "log.jsonl")
    if not os.path.isfile(path):
        raise BadInput(
            f"{run_dir}: no diagnostics.jsonl; train with --probe-every N --probe-tasks ... "
            "or --align-steps ... to record diagnostics"
        )
    evals = list(dataset_files.read_jsonl(log)) if os.path.isfile(log) else []
    records = list(dataset_files.read_jsonl(path))
    for lineno, record in records:  # the fields the figures read, as results files are checked
        checks.check_diagnostics_record(path, lineno, record)
    for lineno, record in evals:
        checks.check_diagnostics_record(log, lineno, record, kind_key="event")
    return [r for _, r in records], [e for _, e in evals if e.get("event") == "eval"]


def tables(run_dirs):
    """The figures' numbers as rows: in-context curves, alignment, trade-off."""
    curves, alignment, tradeoff = [], [], []
    for run_dir in run_dirs:
        run = os.path.basename(os.path.normpath(run_dir))
        records, evals = run_records(run_dir)
        probes = [r for r in records if r["kind"] == "probe"]
        for r in probes:
            keys = ("stage", "step", "task", "shots", "score")
            row = {"run": run, **{k: r[k] for k in keys}, "metric": r.get("metric", "")}
            row["format_ratio"] = r.get("format_ratio")
            for k in ("format_words", "shared_words"):  # "" in records written before them
                row[k] = "/".join(r.get(k) or ())
            curves.append(row)
        for r in records:
            if r["kind"] == "alignment":
                at = dict(run=run, stage=r["stage"], step=r["step"])
                alignment += [dict(at, group=g, cosine=cos) for g, cos in r["cosines"].items()]
        for e in evals:  # one point per scored checkpoint that also has probes at its step
            at = (e["step"], e["stage"])
            unseen = [p["score"] for p in probes if (p["step"], p["stage"]) == at]
            unseen = [score for score in unseen if score is not None]  # null: not scored
            if unseen:
                point = dict(run=run, stage=e["stage"], step=e["step"], finetuned_score=e["score"])
                tradeoff.append({**point, "unseen_average": sum(unseen) / len(unseen)})
    return {"in_context": curves, "alignment": alignment, "tradeoff": tradeoff}


def write_csv(rows, path):
    with (
        run_checkpoints.atomic_write(path) as tmp,
        open(tmp, "w", newline="", encoding="utf-8") as f,
    ):
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot(run_dirs, out_dir):
    """Writes the CSV tables (always) and the PNG figures (with matplotlib) into out_dir;
    returns the paths written. A figure with too little to show is skipped, saying why."""
    rows = tables(run_dirs)
    if not any(rows.values()):
        raise BadInput(f"{', '.join(run_dirs)}: the diagnostics hold no probe or alignment records")
    os.makedirs(out_dir, exist_ok=True)
    written = [write_csv(t, os.path.join(out_dir, f"{n}.csv")) for n, t in rows.items() if t]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: wrote the CSV tables only (pip install matplotlib)")
        return written
    figures = {
        **in_context_figures(plt, rows["in_context"]),
        **alignment_figure(plt, rows["alignment"]),
        **tradeoff_figure(plt, rows["tradeoff"]),
    }
    for name, fig in figures.items():
        if isinstance(fig, str):  # the reason it was not drawn
            print(f"skipped {name}: {fig}")
            continue
        written.append(os.path.join(out_dir, name))
        with run_checkpoints.atomic_write(written[-1]) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
    return written


# Every score here (accuracy, exact match, BLEU, ROUGE-2) and every ratio is on 0-100: one
# y-range for all panels, so a 12-point dip reads as 12 points, not as a collapse.
SCALE = (0, 100)
TRADEOFF_MIN_CHECKPOINTS = 3  # a trade-off is read along a curve: one run needs three points


def run_label(run, stage):
    return run if run == stage else f"{run} ({stage})"


def finish(fig, caption):
    """Lays the figure out: one legend for all panels (when they have labels), a caption below."""
    inch = 1 / fig.get_figheight()
    fig.text(0.5, 0.06 * inch, caption, ha="center", va="bottom", fontsize=8)
    bottom = (0.16 * (caption.count("\n") + 1) + 0.12) * inch
    handles = {}
    for ax in fig.axes:
        handles.update(zip(*reversed(ax.get_legend_handles_labels())))
    if handles:
        labels = list(handles)
        fig.legend(
            [handles[k] for k in labels],
            labels,
            loc="lower center",
            ncol=4,
            fontsize=8,
            bbox_to_anchor=(0.5, bottom),
        )
        bottom += 0.32 * inch
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return fig


def curve_panels(plt, curves, value, ylabel, caption):
    """One panel per (task, shots) of `value` against the step, one line per run, all on 0-100."""
    keys = sorted({(r["task"], r["shots"], r["metric"]) for r in curves})
    runs = sorted({(r["run"], r["stage"]) for r in curves})
    size = (3.4 * len(keys), 3.5)
    fig, axes = plt.subplots(1, len(keys), figsize=size, squeeze=False, sharey=True)
    for ax, (task, shots, metric) in zip(axes[0], keys):
        for run in runs:
            points = sorted(
                (r["step"], r[value])
                for r in curves
                if (r["run"], r["stage"], r["task"], r["shots"]) == (*run, task, shots)
            )
            if points:  # clip_on=False: a marker at 100 shows whole
                ax.plot(*zip(*points), marker="o", label=run_label(*run), clip_on=False)
        title = f"{task}, {shots}-shot" + (f" ({metric})" if value == "score" and metric else "")
        ax.set(title=title, xlabel="training step", ylim=SCALE)
        ax.spines["top"].set_visible(False)  # a line at 100 would hide in it
        ax.title.set_fontsize(10)
    axes[0][0].set_ylabel(ylabel)
    return finish(fig, caption)


def in_context_figures(plt, curves):
    """Fig. 1 and 2: the probes' score and format ratio against the training step. The format
    ratio leaves out the tasks whose own answers use the format's words: theirs is high from
    step 0 and says nothing of format specialization (lab_lives' True/False/Neither)."""
    figures = {}
    scored = [r for r in curves if r["score"] is not None]
    if scored:
        caption = "In-context score on unseen tasks during training, routed as evaluate.py routes "
        caption += "(paper Fig. 1); every panel on the same 0-100 scale."
        figures["in_context.png"] = curve_panels(plt, scored, "score", "score", caption)
    ratios = [r for r in curves if r["format_ratio"] is not None]
    shared = {r["task"]: r["shared_words"] for r in ratios if r.get("shared_words")}
    if not ratios:
        return figures
    words = next((r["format_words"] for r in ratios if r.get("format_words")), "")
    words = f" ({words})" if words else ""
    caption = f"Share of answers whose first word is one of the fine-tuned task's answers{words}: "
    caption += "how often the model answers in that task's format (paper Fig. 2)."
    if shared:
        left_out = ", ".join(f"{task} (its answers include {w})" for task, w in shared.items())
        caption += f"\nLeft out: {left_out}, whose ratio is high from step 0."
    kept = [r for r in ratios if r["task"] not in shared]
    if kept:
        figures["format_ratio.png"] = curve_panels(
            plt, kept, "format_ratio", "format ratio (%)", caption
        )
    else:
        figures["format_ratio.png"] = f"every probed task's own answers use its words: {left_out}"
    return figures


GROUP_NAMES = {"mlp": "MLP kernels", "model": "whole model"}


def alignment_order(rows):
    """The groups from the highest mean cosine (over runs and steps) to the lowest."""
    cosines = {}
    for r in rows:
        if not math.isnan(r["cosine"]):
            cosines.setdefault(r["group"], []).append(r["cosine"])
    mean = {g: sum(c) / len(c) for g, c in cosines.items()}
    groups = dict.fromkeys(r["group"] for r in rows)
    return sorted(groups, key=lambda g: -mean.get(g, -math.inf))


def group_name(group):
    """ "self_attn.q" -> "self-attention Q"; the per-kind groups are of the last decoder layer."""
    attention, _, projection = group.partition(".")
    if group in GROUP_NAMES or not projection:
        return GROUP_NAMES.get(group, group)
    return f"{attention.replace('_attn', '-attention').replace('_', ' ')} {projection.upper()}"


def alignment_figure(plt, rows):
    """Fig. 3 and 7: cos(g, g_format) per parameter group, one bar per (run, stage, step),
    groups sorted from the most aligned down, each bar labelled with its value."""
    if not rows:
        return {}
    groups = alignment_order(rows)
    series = sorted({(r["run"], r["stage"], r["step"]) for r in rows})
    runs = list(dict.fromkeys(key[:2] for key in series))
    last_step = {run: max(key[2] for key in series if key[:2] == run) for run in runs}
    height = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(7.5, 1.4 + 0.18 * len(groups) * len(series)))
    for i, key in enumerate(series):
        cos = {r["group"]: r["cosine"] for r in rows if (r["run"], r["stage"], r["step"]) == key}
        y = [len(groups) - 1 - j + 0.4 - (i + 0.5) * height for j in range(len(groups))]
        # one hue per run: light for its earlier steps, dark for its last
        color = plt.cm.tab20(2 * runs.index(key[:2]) + (key[2] != last_step[key[:2]]))
        label = f"{run_label(*key[:2])}, step {key[2]}"
        bars = ax.barh(y, [cos.get(g, math.nan) for g in groups], height, label=label, color=color)
        ax.bar_label(bars, fmt="%+.2f", fontsize=7, padding=2)
    ax.set_yticks(range(len(groups))[::-1], [group_name(g) for g in groups], fontsize=8)
    negative = any(r["cosine"] < 0 for r in rows)  # NaN (an empty group) compares False
    ax.set_xlim(-1.0 if negative else 0.0, 1.15)
    ax.axvline(0, color="grey", linewidth=0.6)
    ax.set_xlabel("cos(g, g_format)")
    caption = (
        "Cosine between the full gradient and the format-only gradient (same inputs, labels "
        "shuffled; paper Fig. 3/7).\nHigher = the update is mostly format learning: the paper "
        "finds about 1 at the start of fine-tuning\nand 0.21 after 400 steps, once its "
        "True/False ratio is near 100%. Per-kind bars: the last decoder layer."
    )
    return {"alignment.png": finish(fig, caption)}


def tradeoff_skip_reason(rows):
    """Why the trade-off figure would show nothing, or None when it has a curve to show."""
    counts = {}
    for r in rows:
        counts[run_label(r["run"], r["stage"])] = counts.get(run_label(r["run"], r["stage"]), 0) + 1
    if max(counts.values(), default=0) >= TRADEOFF_MIN_CHECKPOINTS:
        return None
    have = ", ".join(f"{run}: {n}" for run, n in counts.items()) or "none"
    return (
        f"a trade-off needs a run with at least {TRADEOFF_MIN_CHECKPOINTS} checkpoints that were "
        f"both scored on the validation split and probed at the same step (have {have}); "
        "save more checkpoints (--save-every) at steps the probes run (--probe-every)"
    )


def tradeoff_figure(plt, rows):
    """Fig. 5 and 6: fine-tuned task score against the average unseen-task score, one point per
    checkpoint, joined in step order; both axes on one range ending at 100."""
    if reason := tradeoff_skip_reason(rows):
        return {"tradeoff.png": reason}
    fig, ax = plt.subplots(figsize=(5.5, 5.2))
    for run in sorted({(r["run"], r["stage"]) for r in rows}):
        mine = sorted(
            (r["step"], r["finetuned_score"], r["unseen_average"])
            for r in rows
            if (r["run"], r["stage"]) == run
        )
        _, x, y = zip(*mine)
        ax.plot(x, y, marker="o", label=run_label(*run), clip_on=False)
        for step, a, b in mine:
            ax.annotate(str(step), (a, b), fontsize=7, xytext=(3, 3), textcoords="offset points")
    # both axes on one range, from a round number below every point up to 100: the points
    # keep their true distances and do not crowd into one corner of 0-100
    low = min(min(r["finetuned_score"], r["unseen_average"]) for r in rows)
    scale = (max(0, 10 * math.floor((low - 5) / 10)), 100)
    xlabel, ylabel = "fine-tuned task score (validation)", "average unseen-task score"
    ax.set(xlabel=xlabel, ylabel=ylabel, xlim=scale, ylim=scale, aspect="equal")
    caption = "One point per checkpoint, labelled with its step (paper Fig. 5/6); "
    caption += f"both axes {scale[0]}-100.\n"
    caption += "Up and right is better: the task learned, the unseen tasks kept."
    return {"tradeoff.png": finish(fig, caption)}


# ----------------------------------------------------------------------------
# Command line


@dataclass
class AlignSettings:
    """`diagnostics.py align`: gradient alignment of one checkpoint."""

    model: str = flag("", "checkpoint folder (Hugging Face layout, with spiece.model)")
    task: str = flag("", "classification task whose labels are shuffled, e.g. rte")
    data_dir: str = flag("", "folder with one sub-folder per task")
    prompt: str = flag("", "prompt.safetensors to prepend (stage-2 models)")
    align_batch_size: int = flag(32, "examples in the gradient-alignment batch", valid=AT_LEAST_1)
    layer: int = flag(
        -1, "decoder layer of the per-kind groups, counted from 0 (negative: from the end)"
    )
    seed: int = flag(0, "seed of the chosen examples and the label permutation")
    device: str = flag(
        "auto",
        "where to compute; auto: cuda when available, else cpu",
        choices=("auto", "cpu", "cuda"),
    )
    dtype: str = flag("float32", "compute dtype", choices=("float32", "bfloat16"))
    out: str = flag("", "also write the cosines to this JSON file")


@dataclass
class PlotSettings:
    """`diagnostics.py plot`: figures and tables of recorded runs."""

    out: str = flag(
        "", "folder for the figures and tables [RUN_DIR/figures; several runs: ./figures]"
    )


def parse_args(argv=None):
    """Command line -> argparse namespace with `command` ("plot" or "align") and its settings."""
    ap = cli.Parser(prog="diagnostics.py", description="The paper's §3 diagnostics.")
    sub = ap.add_subparsers(dest="command", required=True)
    kw = dict(formatter_class=cli.HelpFormatter)
    p = sub.add_parser("plot", help="draw the figures and tables of recorded runs", **kw)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders with diagnostics.jsonl")
    cli.add_flags(p, PlotSettings)
    a = sub.add_parser("align", help="gradient alignment cos(g, g_format) of one checkpoint", **kw)
    cli.add_flags(a, AlignSettings, required=("model", "task", "data_dir"))
    return ap.parse_args(argv)


def align_command(args):
    """Prints (and with --out saves) cos(g, g_format) of one checkpoint (Fig. 3)."""
    args = AlignSettings(**{k: v for k, v in vars(args).items() if k != "command"})
    if problem := cli.out_of_range(args):
        raise BadInput(problem)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda: this machine has no CUDA GPU; use --device cpu")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device

    def memory(config):  # before anything is built: the weights, and config.json's sizes
        checks.check_model_numbers(config, os.path.join(args.model, "config.json"))
        weights = 4 * checks.model_parameters(config)
        needs = {f"{args.model}/config.json's weights": weights}
        checks.check_memory_and_layers(needs, device, config, args.model)

    lm, _, tokenizer = evaluate.open_checkpoint(args.model, memory)  # shards checked too
    t5 = lm.load_pretrained(args.model, dtype=getattr(torch, args.dtype), device=device)
    task = data.register_tasks([args.task], args.data_dir)[0]
    train = data.load_split(task, args.data_dir, "train")
    checks.check_template(task, train, "train")  # every example's fields, before the gradients
    size = args.align_batch_size
    batch, shuffled = alignment_batches(task, train, tokenizer, size, args.seed, device)
    prompt = None
    if args.prompt:
        prompts = prompt_formats.read_prompts(args.prompt, t5.config.d_model, [args.task])
        prompt = evaluate.route_prompt(args.task, prompts, "always").to(device)
    cosines = gradient_alignment(t5, batch, shuffled, prompt, args.layer)
    print(f"cos(g, g_format) on {size} {args.task} examples, decoder layer {args.layer}:")
    for group, cos in cosines.items():
        print(f"  {group:14s} {cos:+.4f}")
    if args.out:
        saved = dict(model=args.model, task=args.task, layer=args.layer, batch_size=size)
        run_checkpoints.write_json(
            args.out, {**saved, "seed": args.seed, "cosines": cosines}, indent=1
        )


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.command == "align":
            align_command(args)
        else:
            several = len(args.runs) > 1
            out = args.out or ("figures" if several else os.path.join(args.runs[0], "figures"))
            for path in plot(args.runs, out):
                print(f"wrote {path}")
    except (BadInput, DamagedFile) as e:
        print(f"diagnostics.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
