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
trainer calls `TrainingDiagnostics` (built from its flags by `from_flags`);
`python diagnostics.py plot RUN_DIR` draws the figures; `python diagnostics.py
align` measures the gradient alignment of any checkpoint.

Records go to RUN_DIR/diagnostics.jsonl, one JSON object per line:
  {"kind": "probe", "stage", "step", "task", "shots", "score", "metric", "format_ratio", "num_examples"}
  {"kind": "alignment", "stage", "step", "task", "layer", "cosines": {group: cos}}
"""

import argparse
import contextlib
import csv
import json
import math
import os
import sys
import traceback

import torch
import torch.distributed as dist

import data
import evaluate
import model as model_lib
from support import cli, dataset_files, lora, run_checkpoints


class DiagnosticsError(ValueError):
    """A probe task, run folder or flag the user can fix; the message says which."""


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
    logits = t5(batch["input_ids"], batch["attention_mask"], model_lib.shift_right(labels),
                prompt=None if prompt is None else prompt.detach())
    loss_sum, count = model_lib.cross_entropy(logits, labels, label_smoothing)
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
    return {group: (float(d / math.sqrt(a * b)) if a > 0 and b > 0 else float("nan"))
            for group, (d, a, b) in zip(groups, sums.tolist())}


def alignment_batches(task, examples, tokenizer, batch_size, seed, device="cpu"):
    """This rank's slice of (a batch of the task, the same inputs with labels shuffled)."""
    task = data.get_task(task)
    if task.label_words is None:
        raise DiagnosticsError(f"task {task.name}: label shuffling needs a classification task "
                               "(one with label words, e.g. rte, cb, wic, snli)")
    if len(examples) < batch_size:
        raise DiagnosticsError(f"task {task.name}: {len(examples)} examples, fewer than --align-batch-size {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    chosen = [examples[i] for i in torch.randperm(len(examples), generator=generator)[:batch_size].tolist()]
    shuffled = data.shuffle_labels(chosen, seed)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if batch_size % world:
        raise DiagnosticsError(f"--align-batch-size {batch_size} must be divisible by the {world} ranks")
    part = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
    return [data.encode_batch(tokenizer, data.training_pairs(task, xs)[part], max_input_tokens=1024,
                              max_target_tokens=256, device=device)
            for xs in (chosen, shuffled)]


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
        raise DiagnosticsError("gradient alignment needs trainable model weights (stage 2 or fine-tuning, "
                               "not prompt tuning)")
    return cosine_similarities(g, h, alignment_groups(t5, layer))


# ----------------------------------------------------------------------------
# During training: probes and alignment at chosen steps


class TrainingDiagnostics:
    """What the trainer calls at chosen steps; never changes the training trajectory.

    Probes and alignment run with the RNG state saved and restored, dropout
    off, and gradients cleared afterwards, so a run with diagnostics ends with
    the same weights as one without. A failing probe is logged and training
    goes on, unless `strict`.
    """

    def __init__(self, out_dir, stage, tokenizer, data_dir, finetune_task, probe_tasks=(), probe_every=0,
                 probe_shots=(1,), probe_limit=100, align_steps=(), align_every=0, align_batch_size=32,
                 align_layer=-1, seed=0, num_beams=1, strict=False):
        self.path = os.path.join(out_dir, "diagnostics.jsonl")
        self.stage, self.tokenizer, self.strict = stage, tokenizer, strict
        self.finetune_task = data.get_task(finetune_task, data_dir)
        self.probe_every, self.probe_shots, self.num_beams = probe_every, tuple(probe_shots), num_beams
        self.align_steps, self.align_every, self.align_layer = set(align_steps), align_every, align_layer
        self.seed = seed
        self.label_words = self.finetune_task.label_words or ()
        self.probe_sets = {}
        for name in probe_tasks:
            try:
                task = data.get_task(name, data_dir)
                _, examples = data.load_eval_split(task, data_dir)
                pool = data.load_split(task, data_dir, task.demo_split) if max(self.probe_shots) else examples
            except data.DataError as e:
                raise DiagnosticsError(f"--probe-tasks {name}: not available in {data_dir} ({e})") from None
            self.probe_sets[task.name] = (examples[:probe_limit], pool)
        self.align_data = None
        if self.align_steps or self.align_every:
            try:
                train = data.load_split(self.finetune_task, data_dir, "train")
            except data.DataError as e:
                raise DiagnosticsError(f"gradient alignment: {e}") from None
            if self.finetune_task.label_words is None:
                raise DiagnosticsError(f"--align-steps: {self.finetune_task.name} is not a classification "
                                       "task; label shuffling needs label words")
            self.align_data = (train, align_batch_size)

    def due(self, step):
        probe = bool(self.probe_sets) and self.probe_every > 0 and step % self.probe_every == 0
        align = self.align_data is not None and (step in self.align_steps
                                                 or (self.align_every > 0 and step % self.align_every == 0))
        return probe, align

    def run(self, step, t5, prompts=None, gathered=contextlib.nullcontext):
        """Measure at `step` if due. `gathered` is the trainer's context that holds full
        weights on every rank (decoding lengths differ across ranks under FSDP)."""
        probe, align = self.due(step)
        if not (probe or align):
            return []
        records = []
        device = next(t5.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            try:
                if probe:
                    with gathered(t5):
                        records += self.probe(step, t5, prompts or {})
                if align:
                    records.append(self.align(step, t5, prompts or {}, device))
            except Exception as e:  # a probe must not kill a long run silently
                if self.strict:
                    raise
                message = f"diagnostics at step {step} failed: {type(e).__name__}: {e}"
                records.append({"kind": "error", "stage": self.stage, "step": step, "error": message})
                print(message + " (training continues; --diagnostics-strict to stop instead)", flush=True)
                traceback.print_exc(limit=3)
        self.write(records)
        return records

    def probe(self, step, t5, prompts):
        try:
            return self._probe(step, t5, prompts)
        finally:
            lora.set_lora_enabled(t5, True)  # training goes on with its adapters, whatever happened

    def _probe(self, step, t5, prompts):
        records = []
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        for name, (examples, pool) in self.probe_sets.items():
            # LoRA adapters, like the prompt, only for the fine-tuned task's format (paper §4)
            lora.set_lora_enabled(t5, evaluate.same_format(name, self.finetune_task))
            for shots in self.probe_shots:
                result = evaluate.score_task(
                    t5, self.tokenizer, name, examples, pool=pool, shots=shots,
                    prompt=evaluate.route_prompt(name, prompts), num_beams=self.num_beams, seed=self.seed,
                    brevity_penalty="t5x", length_penalty=0.6,  # the paper's decoding, as evaluate.py's default
                    format_label_words=self.label_words or None, distributed=distributed)
                records.append({"kind": "probe", "stage": self.stage, "step": step, "task": name, "shots": shots,
                                "metric": result["metric"], "score": result["score"],
                                "format_ratio": result.get("format_ratio"), "num_examples": result["num_examples"]})
                print(f"probe step {step}: {name} {shots}-shot {result['metric']} {result['score']:.2f}"
                      + (f", {'/'.join(self.label_words)} ratio {result['format_ratio']:.1f}%"
                         if self.label_words else ""), flush=True)
        return records

    def align(self, step, t5, prompts, device):
        train, batch_size = self.align_data
        batch, shuffled = alignment_batches(self.finetune_task, train, self.tokenizer, batch_size,
                                            self.seed, device=device)
        prompt = evaluate.route_prompt(self.finetune_task.name, prompts)
        cosines = gradient_alignment(t5, batch, shuffled, prompt, self.align_layer)
        print(f"gradient alignment step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in cosines.items()), flush=True)
        return {"kind": "alignment", "stage": self.stage, "step": step, "task": self.finetune_task.name,
                "layer": self.align_layer, "cosines": cosines}

    def write(self, records):
        if records and (not dist.is_initialized() or dist.get_rank() == 0):
            with open(self.path, "a", encoding="utf-8") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")


def from_flags(cfg, tasks, tokenizer, stage):
    """TrainingDiagnostics for promot.py's --probe-* / --align-* flags (on `cfg`), or None."""
    def numbers(text, flag):
        try:
            return [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise DiagnosticsError(f"--{flag} {text!r}: expected comma-separated integers") from None
    probe_tasks = [t.strip() for t in cfg.probe_tasks.split(",") if t.strip()]
    align_steps = numbers(cfg.align_steps, "align-steps")
    if not ((cfg.probe_every and probe_tasks) or align_steps or cfg.align_every):
        if cfg.probe_every and not probe_tasks:
            raise DiagnosticsError("--probe-every needs --probe-tasks (comma-separated unseen tasks)")
        return None
    if (align_steps or cfg.align_every) and cfg.stage == "1":
        raise DiagnosticsError("--align-steps/--align-every measure the model's gradient; stage 1 trains only the prompt")
    if (align_steps or cfg.align_every) and len(tasks) > 1:
        raise DiagnosticsError("--align-steps/--align-every need a single --task (its labels are shuffled)")
    return TrainingDiagnostics(
        cfg.out, stage, tokenizer, cfg.data_dir, tasks[0].name, probe_tasks=probe_tasks,
        probe_every=cfg.probe_every, probe_shots=numbers(cfg.probe_shots, "probe-shots"),
        probe_limit=cfg.probe_limit, align_steps=align_steps, align_every=cfg.align_every,
        align_batch_size=cfg.align_batch_size, seed=cfg.seed, num_beams=cfg.num_beams,
        strict=cfg.diagnostics_strict)


# ----------------------------------------------------------------------------
# Figures


def read_jsonl(path):
    return [record for _, record in dataset_files.read_jsonl(path)]


def run_records(run_dir):
    """(diagnostics records, checkpoint evaluations from log.jsonl) of one run folder."""
    path = os.path.join(run_dir, "diagnostics.jsonl")
    if not os.path.isfile(path):
        raise DiagnosticsError(f"{run_dir}: no diagnostics.jsonl; train with --probe-every N --probe-tasks ... "
                               "or --align-steps ... to record diagnostics")
    log = os.path.join(run_dir, "log.jsonl")
    evals = [r for r in read_jsonl(log) if r.get("event") == "eval"] if os.path.isfile(log) else []
    return read_jsonl(path), evals


def tables(run_dirs):
    """The figures' numbers as rows: in-context curves, alignment, trade-off."""
    curves, alignment, tradeoff = [], [], []
    for run_dir in run_dirs:
        run = os.path.basename(os.path.normpath(run_dir))
        records, evals = run_records(run_dir)
        probes = [r for r in records if r["kind"] == "probe"]
        for r in probes:
            curves.append({"run": run, "stage": r["stage"], "step": r["step"], "task": r["task"],
                           "shots": r["shots"], "score": r["score"], "format_ratio": r.get("format_ratio")})
        for r in records:
            if r["kind"] == "alignment":
                for group, cos in r["cosines"].items():
                    alignment.append({"run": run, "stage": r["stage"], "step": r["step"], "group": group,
                                      "cosine": cos})
        for e in evals:  # one point per scored checkpoint that also has probes at its step
            unseen = [p["score"] for p in probes if p["step"] == e["step"] and p["stage"] == e["stage"]]
            if unseen:
                tradeoff.append({"run": run, "stage": e["stage"], "step": e["step"], "finetuned_score": e["score"],
                                 "unseen_average": sum(unseen) / len(unseen)})
    return {"in_context": curves, "alignment": alignment, "tradeoff": tradeoff}


def write_csv(rows, path):
    with run_checkpoints.atomic_write(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(run_dirs, out_dir):
    """Writes the CSV tables (always) and the PNG figures (with matplotlib) into out_dir."""
    rows = tables(run_dirs)
    if not any(rows.values()):
        raise DiagnosticsError(f"{', '.join(run_dirs)}: the diagnostics hold no probe or alignment records")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, table in rows.items():
        if table:
            write_csv(table, os.path.join(out_dir, f"{name}.csv"))
            written.append(os.path.join(out_dir, f"{name}.csv"))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: wrote the CSV tables only (pip install matplotlib for the figures)")
        return written

    def save(fig, name):
        path = os.path.join(out_dir, name)
        fig.tight_layout()
        with run_checkpoints.atomic_write(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        written.append(path)

    curves = rows["in_context"]
    if curves:
        keys = sorted({(r["task"], r["shots"]) for r in curves})
        for value, label, name in (("score", "score", "in_context.png"),
                                   ("format_ratio", "format ratio (%)", "format_ratio.png")):
            if value == "format_ratio" and all(r["format_ratio"] is None for r in curves):
                continue
            fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
            for ax, (task, shots) in zip(axes[0], keys):
                for run in sorted({(r["run"], r["stage"]) for r in curves}):
                    pts = sorted((r["step"], r[value]) for r in curves
                                 if (r["run"], r["stage"]) == run and (r["task"], r["shots"]) == (task, shots))
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=f"{run[0]} ({run[1]})")
                ax.set_title(f"{task}, {shots}-shot")
                ax.set_xlabel("fine-tuning step")
                ax.set_ylabel(label)
            axes[0][0].legend(fontsize=7)
            save(fig, name)
    if rows["alignment"]:
        groups = list(dict.fromkeys(r["group"] for r in rows["alignment"]))
        fig, ax = plt.subplots(figsize=(7, 3.5))
        series = sorted({(r["run"], r["stage"], r["step"]) for r in rows["alignment"]})
        width = 0.8 / len(series)
        for i, key in enumerate(series):
            cos = {r["group"]: r["cosine"] for r in rows["alignment"] if (r["run"], r["stage"], r["step"]) == key}
            ax.bar([j + i * width for j in range(len(groups))], [cos.get(g, float("nan")) for g in groups],
                   width, label=f"{key[0]} ({key[1]}) step {key[2]}")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups, rotation=30, fontsize=8)
        ax.set_ylabel("cos(g, g_format)")
        ax.legend(fontsize=7)
        save(fig, "alignment.png")
    if rows["tradeoff"]:
        fig, ax = plt.subplots(figsize=(5, 4))
        for run in sorted({(r["run"], r["stage"]) for r in rows["tradeoff"]}):
            pts = sorted((r["finetuned_score"], r["unseen_average"], r["step"]) for r in rows["tradeoff"]
                         if (r["run"], r["stage"]) == run)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="", label=f"{run[0]} ({run[1]})")
        ax.set_xlabel("fine-tuned task score (validation)")
        ax.set_ylabel("average unseen-task score")
        ax.legend(fontsize=7)
        save(fig, "tradeoff.png")
    return written


# ----------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="The paper's format-specialization diagnostics.")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plot", help="draw the figures (PNG) and tables (CSV) of recorded runs")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders holding diagnostics.jsonl")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/figures, or ./figures for several runs)")
    a = sub.add_parser("align", help="gradient alignment cos(g, g_format) of one checkpoint (Fig. 3)")
    a.add_argument("--model", required=True, help="checkpoint directory (config.json, weights, spiece.model)")
    a.add_argument("--task", required=True, help="classification task whose labels are shuffled, e.g. rte")
    a.add_argument("--data-dir", required=True, help="folder with the task's files (see README, Data sets)")
    a.add_argument("--prompt", default=None, help="prompt.safetensors to prepend (stage-2 models)")
    a.add_argument("--align-batch-size", type=int, default=32, help="examples in the batch (default: 32)")
    a.add_argument("--layer", type=int, default=-1, help="decoder layer of the per-kind groups (default: -1, the last)")
    a.add_argument("--seed", type=int, default=0, help="which examples and which label permutation (default: 0)")
    a.add_argument("--out", default=None, help="also write the cosines to this JSON file")
    renamed = {"--batch-size": "--align-batch-size"}  # promot.py's name for the same setting
    return ap.parse_args(cli.renamed_flags(sys.argv[1:] if argv is None else argv, renamed, "diagnostics.py"))


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.command == "plot":
            out = args.out or (os.path.join(args.runs[0], "figures") if len(args.runs) == 1 else "figures")
            for path in plot(args.runs, out):
                print(f"wrote {path}")
            return 0
        t5 = model_lib.load_pretrained(args.model)
        tokenizer = data.Tokenizer(os.path.join(args.model, "spiece.model"))
        train = data.load_split(data.get_task(args.task, args.data_dir), args.data_dir, "train")
        batch, shuffled = alignment_batches(args.task, train, tokenizer, args.align_batch_size, args.seed)
        prompt = None
        if args.prompt:
            prompts = model_lib.read_prompts(args.prompt, t5.config.d_model, [args.task])
            prompt = evaluate.route_prompt(args.task, prompts, "always")
        cosines = gradient_alignment(t5, batch, shuffled, prompt, args.layer)
        print(f"cos(g, g_format) on {args.align_batch_size} {args.task} examples, decoder layer {args.layer}:")
        for group, cos in cosines.items():
            print(f"  {group:14s} {cos:+.4f}")
        if args.out:
            run_checkpoints.write_json(args.out, {"model": args.model, "task": args.task, "layer": args.layer,
                                                  "batch_size": args.align_batch_size, "seed": args.seed,
                                                  "cosines": cosines}, indent=1)
        return 0
    except (DiagnosticsError, data.DataError, model_lib.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
