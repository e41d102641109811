"""promot.py: ProMoT's training program (both stages, every baseline of the paper).

Run it:
    python promot.py --stage 1 --model CKPT --data-dir DATA --task rte --out runs/rte
    python promot.py --stage 2 --model CKPT --data-dir DATA --task rte --out runs/rte
    torchrun --nproc_per_node 8 promot.py ...      # the same, sharded with FSDP2

Read it top to bottom: 1. the method (`STAGES`, `init_prompt`, `train_step`);
2. `train`, one stage from named steps; 3. the command line (`parse_args`: the flags of
flags.Config, a recipe's values, the stage's defaults; `main`).
The defaults reproduce the paper (App. B.4, and the prompt-tuning code base's gin files where
the paper is silent); each improvement or reading of ours is a named option, documented in
docs/defaults.md beside the paper's words it departs from. The network is in model.py,
tasks in data.py, decoding and metrics in evaluate.py, the paper's §3 measurements in
diagnostics.py (one hook called after each step), the input checks in checks.py; Adafactor,
FSDP2, run-folder checkpoints and App. C.7's stage-1 module are plumbing in support/.
"""

import datetime
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace

import flags

if __name__ == "__main__":  # --help answers from flags.py, before torch loads (seconds)
    flags.answer_help(flags.promot_parser, sys.argv[1:])

import torch
import torch.distributed as dist

import causal_lm
import checks
import data
import diagnostics
import evaluate
import model as model_lib
from support import cli, fsdp, hf_files, lora, prompt_formats, run_checkpoints, t5x_loss
from support.adafactor import Adafactor
from support.errors import BadInput, DamagedFile

# ---------------------------------------------------------------------------
# 1. The method
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One way to train: what learns, where the soft prompt comes from, the paper's defaults."""

    folder: str  # RUN/<folder>/ holds its checkpoints, best/ and final/
    prompt: str  # "new": made by --prompt-init; "stage1": stage 1's best, read; "": none
    trains_prompt: bool
    trains_model: bool
    lr: float  # App. B.4: 0.2 for a prompt alone (prompt tuning's rate), 1e-3 for the model
    label_smoothing: float
    weight_decay: float  # None = none; stage 1 follows T5X's prompt-tuning config
    steps: int
    save_every: int


# fmt: off
STAGES = {  # folder          prompt    trains: prompt  model   lr    smooth  decay  steps  save
    "1":             Stage("stage1",        "new",    True,  False, 0.2,  0.0,  1e-5, 5000, 1000),
    "2":             Stage("stage2",        "stage1", False, True,  1e-3, 0.1,  None, 1000, 100),
    "finetune":      Stage("finetune",      "",       False, True,  1e-3, 0.1,  None, 1000, 100),
    "joint":         Stage("joint",         "new",    True,  True,  1e-3, 0.1,  None, 1000, 100),
    "random-prompt": Stage("random-prompt", "new",    False, True,  1e-3, 0.1,  None, 1000, 100),
}
# fmt: on
# 1 = ProMoT stage 1 and the "prompt tuning" baseline; 2 = ProMoT stage 2; finetune = standard
# fine-tuning; joint and random-prompt are Table 6's ablations. The other variants are flags on
# these rows: "+1-shot" (§5.3) is --shots 1, multi-task (Table 5) is --task a,b (one prompt per
# task), and --stage1-module lora (App. C.7) trains low-rank adapters in the prompt's place.


def what_trains(cfg):
    """(prompt source, trains prompt, trains model): the run's row of STAGES. When App. C.7's
    module takes the prompt's place, the run has no prompt; the module trains where the row
    says the prompt does (read_inputs makes it)."""
    stage = STAGES[cfg.stage]
    if cfg.stage1_module == "prompt":
        return stage.prompt, stage.trains_prompt, stage.trains_model
    return "", False, stage.trains_model


def init_prompt(cfg, d_model, tokenizer, task, generator):
    """A (p, d_model) fp32 prompt, initialised as the prompt-tuning code base does.

    uniform: flax `initializers.uniform(0.5)`, i.e. U[0, 0.5) (prompt-tuning's
    t5_1_1_prompt.gin); vocab: rows of the embedding table sampled from the
    5000 most frequent pieces (SentencePiece ids are frequency-ordered); text:
    one row per word (text:WORDS, else the task's label words), the mean of its
    pieces' embeddings, like prompt-tuning's `from_class_labels`, the rest sampled
    from the vocabulary; file:PATH: the prompt in that file.
    """
    p, (kind, _, path) = cfg.prompt_length, cfg.prompt_init.partition(":")
    if kind == "uniform":
        return torch.rand(p, d_model, generator=generator) * 0.5
    if kind == "file":
        return prompt_formats.read_prompts(path, d_model, [task.name], p)[task.name]
    table = evaluate.model_family(cfg.model).read_embedding(cfg.model).float()
    rows = table[torch.randint(0, min(5000, table.shape[0]), (p,), generator=generator)]
    if kind == "text":
        for i, word in enumerate(prompt_words(cfg, task)):
            ids = [i for i in tokenizer.encode(word, add_eos=False) if i != tokenizer.bos_id]
            rows[i] = table[ids].mean(0)
    return rows.clone()


def prompt_words(cfg, task):
    """The words of --prompt-init text:WORDS, or of plain `text`: the task's label words."""
    return names(cfg.prompt_init.partition(":")[2]) or list(task.label_words or ())


def train_step(t5, batches, prompts, optimizer, cfg, ctx):
    """One optimizer step on this rank's micro-batches; returns (mean loss, tokens) of the
    global batch.

    `prompts` maps task -> (p, d) prompt, prepended to each row of its task
    (empty: no prompt). The loss is the token cross-entropy (plus T5X's z-loss)
    summed over the global batch divided by its token count, so 1 process and
    N ranks (and any micro-batching) take the same step. A non-finite loss
    returns before the update, leaving the weights as they were.
    """
    targets = [int((b["labels"] != -100).sum()) for b in batches]
    prompt_tokens = cfg.prompt_length if prompts else 0
    inputs = sum(int(b["attention_mask"].sum()) + len(b["tasks"]) * prompt_tokens for b in batches)
    # NCCL reduces device tensors only
    written = 0 if isinstance(t5, causal_lm.CausalLM) else sum(targets)  # a decoder's row holds it
    counts = torch.tensor([sum(targets), inputs + written], dtype=torch.float64, device=ctx.device)
    if ctx.world > 1:
        dist.all_reduce(counts)
    global_targets, global_tokens = counts.tolist()
    model_trains = any(p.requires_grad for p in t5.parameters())
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for i, b in enumerate(batches):
        if ctx.world > 1 and model_trains:  # reduce-scatter once, after the last micro-batch
            t5.set_requires_gradient_sync(i == len(batches) - 1)
        prompt = None
        if len(prompts) == 1:
            prompt = next(iter(prompts.values()))
        elif prompts:  # multi-task: each row its own task's prompt
            prompt = torch.stack([prompts[name] for name in b["tasks"]])
        # one process: autocast; under FSDP the MixedPrecisionPolicy casts instead
        bf16 = cfg.dtype == "bfloat16" and ctx.world == 1
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits, labels = forward(t5, b, prompt)
        loss, _ = t5x_loss.cross_entropy(logits, labels, cfg.label_smoothing, cfg.z_loss)
        # Divided by the global token count; times the world size because FSDP
        # averages gradients over ranks, and the true gradient is their sum.
        (loss * (ctx.world / global_targets)).backward()
        loss_sum += loss.detach().double()
    if ctx.world > 1:
        dist.all_reduce(loss_sum)
        for p in prompts.values():  # replicated outside FSDP: average like FSDP does
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad.div_(ctx.world)
    mean_loss = float(loss_sum) / global_targets
    if math.isfinite(mean_loss):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return mean_loss, global_tokens


def forward(model, batch, prompt):
    """(logits, labels) of one micro-batch. T5 reads [P; input] and writes the target (teacher
    forcing); a decoder-only model (App. C.6) reads [P; input; target], and the logits after
    each token are scored against the next one (data.encode_batch: labels on target and EOS)."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if isinstance(model, causal_lm.CausalLM):  # the logits only where the next token is learned
        learned, none = labels[:, 1:] != -100, labels.new_zeros(len(ids), 1, dtype=torch.bool)
        p = 0 if prompt is None else prompt.shape[-2]
        keep = torch.cat([none.expand(-1, p), learned, none], dim=1)  # over [P; x]
        return model(ids, mask, prompt=prompt, keep=keep), labels[:, 1:][learned]
    return model(ids, mask, model_lib.shift_right(labels), prompt=prompt), labels


# ---------------------------------------------------------------------------
# 2. One stage, from named steps
# ---------------------------------------------------------------------------


class Diverged(RuntimeError):
    """The loss or the weights went non-finite; not a user error (exit 1)."""


def train(cfg):
    """Run one stage as `cfg` says; returns its Run (live model and prompts, step, best)."""
    checks.check_training_settings(cfg, what_trains(cfg)[0])
    ctx = fsdp.setup_distributed(cfg.device)
    inputs = read_inputs(cfg, ctx)
    stage = STAGES[cfg.stage].folder
    on_step = diagnostics.training_hook(
        cfg.diagnostics, cfg, inputs["tasks"], inputs["tokenizer"], stage
    )
    # multi-task stage 1: one prompt-tuning run per task
    apart = cfg.stage == "1" and cfg.stage1_module == "prompt" and len(inputs["tasks"]) > 1
    fsdp.barrier()  # every rank has checked --out before rank 0 writes into it
    recorded = {**settings(cfg, ctx.world), **inputs["recorded"]}
    with run_checkpoints.stage_folder(cfg.out, stage, recorded, ctx.main) as stage_dir:
        run = Run(cfg, ctx, inputs, stage_dir, on_step or (lambda *args: None))
        return tune_prompts_apart(run) if apart else run_stage(run)


def run_stage(run):
    """One stage, whole: load, make the prompts, build the optimizer, resume, loop, export."""
    cfg, ctx, inputs = run.cfg, run.ctx, run.inputs
    torch.manual_seed(cfg.seed + ctx.rank)  # dropout masks differ across ranks
    run.model = load_model(cfg, ctx, inputs)
    run.prompts = make_prompts(cfg, ctx, inputs, run.prompt_source, run.trains_prompt)
    run.optimizer = build_optimizer(cfg, run)
    pools = {t.name: x for t, x in zip(inputs["tasks"], inputs["train_sets"])}
    run.mixture = data.Mixture(pools, cfg.mixing, seed=cfg.seed)  # T5's cap, 2**19
    if cfg.resume:
        resume(run)
    if run.step == 0:
        run.on_step(0, run.model, run.prompts, fsdp.unsharded)
    meter, truncation = cli.StepMeter(run.step, cfg.steps), data.TruncationStats()
    run.log(line=describe(run))
    with run_checkpoints.StopRequest() as stop:
        while run.step < cfg.steps:
            started = time.time()
            batches = micro_batches(run, truncation)
            loss, tokens = train_step(run.model, batches, run.prompts, run.optimizer, cfg, ctx)
            if not math.isfinite(loss):
                what = f"loss is {loss} at step {run.step + 1}; stopped without updating"
                raise diverged(run, what)
            run.step += 1
            meter.step(tokens, time.time() - started)  # before the diagnostics' probes
            run.on_step(run.step, run.model, run.prompts, fsdp.unsharded)
            report(run, meter, loss)
            if not checkpoint_if_due(run, stop.agreed(ctx.device)):
                return run  # stopped early (SIGTERM, --stop-after-step): --resume goes on
    for name in ("final",) if cfg.eval else ("final", "best"):  # no scores: best/ is the last
        export(os.path.join(run.stage_dir, name), run)
    say_done(run)
    return run


def tune_prompts_apart(run):
    """Multi-task stage 1 (§5.4, "a soft prompt for each task"): each task's prompt is tuned on
    its own data and keeps its own best checkpoint, in a run folder of its own
    (RUN/stage1/tasks/<task>/); then RUN/stage1/best/ and final/ hold all of them, in the one
    prompt file stage 2 reads."""
    runs, cfg, folder = {}, run.cfg, run.stage_dir
    run.log(line=f"stage1: one prompt-tuning run per task (§5.4), each in {folder}/tasks/<task>/")
    for task in run.inputs["tasks"]:
        out = os.path.join(folder, "tasks", task.name)
        runs[task.name] = train(replace(cfg, task=task.name, out=out))
        if runs[task.name].step < cfg.steps:
            return runs[task.name]  # stopped early: the same command with --resume goes on
    for name in ("best", "final"):
        files = {t: os.path.join(r.stage_dir, name, "prompt.safetensors") for t, r in runs.items()}
        run.prompts = {t: prompt_formats.read_prompts(path)[t] for t, path in files.items()}
        export(os.path.join(folder, name), run)
    run.step, run.best = cfg.steps, {t: r.best for t, r in runs.items()}
    each = ", ".join(f"{t} step {b['step']}" for t, b in run.best.items())
    done = f"done: one prompt per task in {folder}/best (each task's best checkpoint: {each})"
    run.log({"event": "done", "best": run.best}, f"{done} and {folder}/final")
    return run


@dataclass
class Run:
    """One stage: settings, inputs, folder, what trains, and what the steps make.
    `train` returns it."""

    cfg: object
    ctx: fsdp.Dist
    inputs: dict
    stage_dir: str
    on_step: object  # diagnostics.training_hook's on_step, or a no-op
    model: torch.nn.Module = None
    prompts: dict = None
    optimizer: Adafactor = None
    mixture: data.Mixture = None
    step: int = 0
    best: dict = field(
        default_factory=lambda: {"step": None, "score": None, "scores": None, "evaluated": []}
    )

    def __post_init__(self):
        self.prompt_source, self.trains_prompt, self.trains_model = what_trains(self.cfg)

    def log(self, record=None, line=None):
        """A record in RUN/log.jsonl and/or a progress line (rank 0 only)."""
        if self.ctx.main:
            stage = STAGES[self.cfg.stage].folder
            run_checkpoints.log(self.cfg.out, record and {"stage": stage, **record}, line)


def load_model(cfg, ctx, inputs):
    """The pretrained model (model.py's T5 or causal_lm.py's decoder) on this device (sharded
    under torchrun), the stage-1 module attached when it is not the prompt, the run's dropout.

    One process loads the checkpoint directly. Under torchrun the model is
    built on the meta device, sharded, and each rank copies only its slice of
    every tensor as the file streams by (support/fsdp.py)."""
    lm = inputs["lm"]
    if ctx.world == 1:
        t5 = lm.load_pretrained(cfg.model, dtype=torch.float32, device=ctx.device)
    else:
        t5 = lm.build(inputs["config"], "meta")
    tensors = inputs["module"].attach(t5)  # before sharding: FSDP shards them with their block
    decoder_only = lm is causal_lm  # its layers; T5's encoder and decoder blocks
    blocks = list(t5.model.layers if decoder_only else [*t5.encoder.blocks, *t5.decoder.blocks])

    def copy(name, tensor):
        fsdp.copy_into_shard(t5.get_parameter(name), tensor)

    if ctx.world > 1:
        bf16, recompute = cfg.dtype == "bfloat16", cfg.activation_checkpointing
        fsdp.shard_model(t5, ctx.mesh, blocks, bf16=bf16, activation_checkpointing=recompute)
        t5.to_empty(device=ctx.device)
        lm.load_weights(t5, cfg.model, copy=copy)
        if decoder_only:  # a computed buffer, in no checkpoint
            t5.rope = causal_lm.rope_table(inputs["config"], ctx.device)
    elif cfg.activation_checkpointing:
        for block in blocks:
            fsdp.checkpoint_block(block)
    for name, tensor in tensors.items():
        copy(name, tensor)
    if not decoder_only:  # Llama-family models train without dropout
        model_lib.set_dropout(t5, cfg.dropout)
    return t5


def make_prompts(cfg, ctx, inputs, source, trains):
    """{task: prompt}: none, stage 1's (frozen), or new ones (one per task, the same on every
    rank)."""
    tasks, d_model = inputs["tasks"], inputs["config"].d_model
    if source == "":
        prompts = {}
    elif source == "stage1":
        prompts = inputs["prompts"]  # read and checked by read_inputs
    else:
        g = torch.Generator().manual_seed(cfg.seed)  # the same on every rank
        prompts = {t.name: init_prompt(cfg, d_model, inputs["tokenizer"], t, g) for t in tasks}
    return {
        n: torch.nn.Parameter(p.to(ctx.device), requires_grad=trains) for n, p in prompts.items()
    }


def build_optimizer(cfg, run):
    """Freeze what this stage keeps fixed; Adafactor (T5X's rule) on the rest.

    The prompt (and a stage-1 module in its place) steps without the parameter-scale
    multiplier: prompt-tuning's config."""
    for p in run.model.parameters():
        p.requires_grad_(run.trains_model)
    module = run.inputs["module"].trainable(run.model)  # trains where the prompt would
    prompts = list(run.prompts.values()) if run.trains_prompt else []
    weights = [p for p in run.model.parameters() if p.requires_grad] if run.trains_model else []
    groups = [(module, False), (prompts, False), (weights, True)]
    optimizer = Adafactor(
        [dict(params=ps, multiply_by_parameter_scale=scaled) for ps, scaled in groups if ps],
        lr=cfg.lr,
        weight_decay_rate=cfg.weight_decay or None,
    )
    optimizer.init_state()
    run.model.train()
    return optimizer


def training_state(run):
    """What a checkpoint holds; tensors are the live ones, so loading fills them in place."""
    prompts = {n: p.detach() for n, p in run.prompts.items()}
    state = {"prompts": prompts, "optimizer": run.optimizer.state_dict()}
    module = run.inputs["module"]
    weights = run.model.state_dict() if run.trains_model else module.state(run.model)
    if weights:
        state["model"] = weights
    return state


def resume(run):
    """The latest checkpoint's weights, optimizer, RNG and data position (--resume)."""
    state, say = training_state(run), lambda m: run.log(line=m)
    ckpt, trainer = run_checkpoints.resume_stage(
        run.stage_dir, state, run.ctx.device, run.best, say
    )
    if ckpt is None:
        return say(f"--resume: no checkpoint in {run.stage_dir}/checkpoints yet; from step 0")
    run.optimizer.load_state_dict(state["optimizer"])
    for group in run.optimizer.param_groups:
        group["lr"] = run.cfg.lr  # --lr may change on --resume (after a NaN, say)
    run.step = trainer["step"]
    run.mixture.load_state_dict(trainer.get("data_position"))  # checked: one line if wrong
    record = {"event": "resume", "step": run.step, "checkpoint": ckpt}
    run.log(record, f"resumed from {ckpt} (step {run.step})")
    if run.step % run.cfg.save_every == 0:
        score_and_keep_best(run)  # in case the run stopped between saving and scoring


def describe(run):
    """The stage's first progress line: what trains, on what, for how long."""
    cfg, ctx, folder = run.cfg, run.ctx, STAGES[run.cfg.stage].folder
    frozen = STAGES[cfg.stage].prompt == "stage1"  # stage 2: it names stage 1's file
    trainable = sum(p.numel() for g in run.optimizer.param_groups for p in g["params"])
    return (
        f"{folder}: {cfg.steps} steps of {cfg.batch_size} examples on "
        f"{cli.count(ctx.world, 'rank')} ({ctx.device.type}), {trainable:,} trainable parameters, "
        f"lr {cfg.lr}" + (f"; stage 1's {cfg.prompt}, frozen" if frozen else "")
    )


def report(run, meter, loss):
    """A progress line (and log.jsonl record) every --log-every steps and at the last."""
    cfg, folder = run.cfg, STAGES[run.cfg.stage].folder
    if run.step % cfg.log_every == 0 or run.step == cfg.steps:
        tps, eta, elapsed = meter.report(run.step)
        record = {"step": run.step, "loss": loss, "lr": cfg.lr, "tokens_per_s": tps}
        run.log(
            {**record, "elapsed_s": elapsed},
            f"{folder} step {run.step}/{cfg.steps} | loss {loss:.4f} | lr {cfg.lr:.2e} "
            f"| {tps:,.0f} tok/s | ETA {datetime.timedelta(seconds=round(eta))}",
        )


def say_done(run):
    """The stage's last line: where final/ and best/ are."""
    best, done = run.best, f"done: {run.stage_dir}/final"
    if best["step"] is not None:
        done += f"; best checkpoint step {best['step']} ({best['score']:.2f}) in "
        done += f"{run.stage_dir}/best"
    record = {"event": "done", "step": run.step, "best_step": best["step"]}
    run.log({**record, "best_score": best["score"]}, done)


def micro_batches(run, stats):
    """This rank's share of the next global batch (data.Mixture's order), as micro-batches;
    `stats` counts what cutting the inputs removed."""
    cfg, ctx, inputs = run.cfg, run.ctx, run.inputs
    tokenizer, per_rank = inputs["tokenizer"], cfg.batch_size // ctx.world
    micro = cfg.micro_batch_size or per_rank
    which = dict(rank=ctx.rank, world=ctx.world, shots=cfg.shots[0], seed=cfg.seed)
    fitting = dict(tokenizer=tokenizer, max_input_tokens=cfg.max_input_tokens, stats=stats)
    fitting["truncation"] = cfg.truncation
    rows = data.rank_batch(
        run.mixture, inputs["tasks"], inputs["train_sets"], cfg.batch_size, **which, **fitting
    )
    lengths = cfg.max_input_tokens, cfg.max_target_tokens
    return [
        data.encode_batch(
            tokenizer,
            [(x, y) for _, x, y in rows[i : i + micro]],
            *lengths,
            tasks=[t for t, _, _ in rows[i : i + micro]],
            device=ctx.device,
        )
        for i in range(0, per_rank, micro)
    ]


def diverged(run, what):
    """Diverged, naming the last good checkpoint and what to try."""
    last = run_checkpoints.latest_checkpoint(os.path.join(run.stage_dir, "checkpoints"))
    return Diverged(
        f"{what}. The last good checkpoint is {last or 'none (no checkpoint saved yet)'}; try "
        "a lower --lr or --dtype float32, then continue with --resume (--lr may change)"
    )


def checkpoint_if_due(run, signalled):
    """Save (and score) at --save-every, at the end, and when asked to stop; False = stop now."""
    cfg, ctx = run.cfg, run.ctx
    stop = signalled or run.step == cfg.stop_after_step
    scheduled = run.step % cfg.save_every == 0 or run.step == cfg.steps
    if not (scheduled or stop):
        return True
    if not fsdp.all_finite([p for g in run.optimizer.param_groups for p in g["params"]]):
        raise diverged(run, f"the weights hold NaN or inf after step {run.step}; not saved")
    trainer = dict(step=run.step, examples_seen=run.step * cfg.batch_size, world_size=ctx.world)
    trainer["data_position"] = run.mixture.state_dict()
    folder = os.path.join(run.stage_dir, "checkpoints")
    path = run_checkpoints.save_checkpoint(
        folder, run.step, training_state(run), trainer, ctx.device, keep=cfg.keep_checkpoints
    )
    run.log({"event": "checkpoint", "step": run.step, "path": path})
    if scheduled:
        score_and_keep_best(run)
    if stop and run.step < cfg.steps:
        why = "SIGTERM" if signalled else f"--stop-after-step {cfg.stop_after_step}"
        run.log(
            {"event": "stopped", "step": run.step, "reason": why},
            f"stopped at step {run.step} ({why}); checkpoint saved. Continue with the same "
            "command plus --resume",
        )
        return False
    return True


@torch.no_grad()
def score_and_keep_best(run):
    """Score this checkpoint on the validation split with evaluate.score_task (the paper's
    decoding, App. B.2 post-processing, metric); export it to best/ when it is the best so
    far (App. B.4). Under FSDP the weights are gathered for the duration and each rank
    decodes a share of the batches."""
    cfg, ctx, inputs, best, scores = run.cfg, run.ctx, run.inputs, run.best, {}
    if not cfg.eval or run.step in best["evaluated"]:
        return
    bf16 = cfg.dtype == "bfloat16" and ctx.world == 1
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=bf16)
    rng = torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else [])
    with rng, fsdp.unsharded(run.model), autocast:
        for task, examples, pool in zip(inputs["tasks"], inputs["val_sets"], inputs["train_sets"]):
            result = evaluate.score_task(
                run.model,
                inputs["tokenizer"],
                task,
                examples[: cfg.eval_examples],
                pool=pool,
                shots=selection_shots(cfg),
                prompt=run.prompts.get(task.name),
                num_beams=cfg.num_beams,
                max_new_tokens=cfg.max_new_tokens,
                batch_size=cfg.micro_batch_size or 16,
                seed=cfg.seed,
                max_input_tokens=cfg.max_input_tokens,
                truncation=cfg.truncation,
                distributed=ctx.world > 1,
            )  # and generate's default: the paper's decoding (T5X's length rule, alpha 0.6)
            scores[task.name] = float(result["score"])
    values = list(scores.values())  # multi-task: their mean or minimum (the paper is silent)
    score = min(values) if cfg.select.endswith("-min") else sum(values) / len(values)
    improved = best["score"] is None or score > best["score"]
    if improved:
        export(os.path.join(run.stage_dir, "best"), run)
        best.update(step=run.step, score=score, scores=scores)
    best["evaluated"].append(run.step)
    if ctx.main:
        run_checkpoints.write_best(os.path.join(run.stage_dir, "best.json"), best)
    line = f"eval step {run.step}: validation " + ", ".join(
        f"{k} {v:.2f}" for k, v in scores.items()
    )
    line += " (best so far)" if improved else f" (best: step {best['step']}, {best['score']:.2f})"
    record = dict(event="eval", step=run.step, split="validation", scores=scores, score=score)
    run.log({**record, "best_step": best["step"]}, line)


def export(folder, run):
    """A directory evaluate.py, transformers and PEFT read: the model in the public layout
    (when it trained) with spiece.model, prompt.safetensors (+ peft_<task>/ for PEFT), the
    stage-1 module in the prompt's place, training.json."""
    cfg, model = run.cfg, run.model
    state = fsdp.full_state_dict(model) if run.trains_model else None  # a collective
    for name in run.inputs["module"].tensors(model) if state else ():  # saved on their own
        state.pop(name, None)
    checkpoints = os.path.join(run.stage_dir, "checkpoints")  # named if a write fails
    with run_checkpoints.write_or_say(folder, checkpoints):
        if run.ctx.main:
            if run.trains_model:
                run.inputs["lm"].save_pretrained(model, folder, state_dict=state)
                hf_files.copy_tokenizer(cfg.model, folder)  # its tokenizer beside it
            os.makedirs(folder, exist_ok=True)
            if run.prompts:  # prompt.safetensors, and each prompt in PEFT's format, peft_<task>/
                base = folder if run.trains_model else cfg.model
                prompt_formats.export_prompts(folder, run.prompts, base)
        run.inputs["module"].save(model, folder, fsdp.full_tensor, run.ctx.main)
        if run.ctx.main:  # what evaluate.py's table says of the fine-tuned task's rows
            best = os.path.basename(folder) == "best" and cfg.eval
            shots = selection_shots(cfg) if best else None
            info = dict(stage=cfg.stage, task=cfg.task, shots=cfg.shots[0], step=run.step)
            run_checkpoints.write_training_record(folder, **info, chosen_at_shots=shots)
    fsdp.barrier()


def selection_shots(cfg):
    """Demonstrations when scoring checkpoints for best/: 0 (Table 2), or --shots'."""
    return 0 if cfg.select.startswith("0-shot") else cfg.shots[0]


# ---------------------------------------------------------------------------
# 3. The command line: settings (defaults = App. B.4), inputs, main
# ---------------------------------------------------------------------------

# The settings are flags.Config (every flag, defaults = App. B.4) with diagnostics.py's
# TrainingFlags: a module without torch, so that --help answers at once.
Config, PROMPT_LENGTH = flags.Config, flags.PROMPT_LENGTH

# Settings that may change between a run and its --resume (diagnostics never change a run; a
# recipe's values are compared one by one).
RESUMABLE_CHANGES = set(
    "resume allow_change steps log_every stop_after_step device out lr keep_checkpoints "
    "hash_weights recipe".split()
) | {f.name for f in fields(flags.TrainingFlags)}
PATHS = ("model", "data_dir", "prompt")  # compared as resolved paths


def parse_args(argv=None):
    """Command line -> Config, diagnostics' flags in its `diagnostics` field. A setting is the
    flag given, else the recipe's (`flags.recipe_path`), else the stage's default (STAGES; App.
    C.6's for a decoder-only checkpoint; stage 2's prompt length is stage 1's file's)."""
    p = flags.promot_parser(argv)
    args, given = vars(p.parse_args(argv)), cli.given_flags(p, argv)
    lab = not args["model"] and not args["data_dir"]
    if lab:  # the miniature lab (docs/lab.md), so a newcomer sees ProMoT run
        args.update({k: args[k] or v for k, v in flags.LAB.items()})
    missing = [
        f"--{n.replace('_', '-')}" for n in ("model", "data_dir", "task", "out") if not args[n]
    ]
    if missing:
        bundled = "--model lab/tiny-t5: the bundled model, with its recipe; "
        bundled = bundled if "--model" in missing else ""
        p.error(
            f"the following arguments are required: {', '.join(missing)} ({bundled}omit both "
            "--model and --data-dir to run the miniature lab)"
        )
    args["recipe"] = flags.recipe_path(args["recipe"], args["model"])
    values = recipe_values(args, given) if args["recipe"] else {}
    args.update(values)
    say_recipe(args, values, lab)
    probes = {f.name: args.pop(f.name) for f in fields(flags.TrainingFlags)}
    cfg = Config(**args, diagnostics=flags.TrainingFlags(**probes))
    if cfg.stage == "1" and cfg.stage1_module != "prompt" and cfg.lr is None:
        cfg.lr = 1e-3  # C.7 gives no rate for it; the prompt's 0.2 would swamp a rank-4 update
    decoder_only = evaluate.model_family(cfg.model) is causal_lm  # App. C.6: length 50, lr 0.3
    path, length = prompt_file_length(cfg) if "prompt_length" not in given else ("", None)
    if length:  # a prompt read from a file keeps its length
        cfg.prompt_length = length
        say(f"promot.py: --prompt-length {length}, the length of the prompt in {path}")
    if cfg.prompt_length is None:
        cfg.prompt_length = 50 if decoder_only else PROMPT_LENGTH
    if decoder_only and cfg.stage == "1" and cfg.lr is None:
        cfg.lr = 0.3
    for k in ("steps", "save_every", "lr", "label_smoothing", "weight_decay"):
        if getattr(cfg, k) is None:
            setattr(cfg, k, getattr(STAGES[cfg.stage], k))
    return cfg


def recipe_values(args, given):
    """The recipe's values for the flags not `given`: every stage's, then those of what the
    stage tunes (its section "prompt", "lora" or "model"), each checked as its flag would be."""
    tuned = "model" if STAGES[args["stage"]].trains_model else args["stage1_module"]
    settings = {f.name: f for c in (Config, flags.TrainingFlags) for f in fields(c)}
    settings.pop("diagnostics")
    sections = ("every stage", tuned)
    return cli.recipe(args["recipe"], sections, settings, given, flags.RECIPE_SECTIONS)


def say(line):
    """Print `line` once: under torchrun, on rank 0 (parse_args runs before the process group)."""
    if os.environ.get("RANK", "0") == "0":
        print(line, flush=True)


def say_recipe(args, values, lab):
    """The run's first line: the lab it falls back to, and the recipe in force with its values."""
    if not (lab or args["recipe"]):
        return
    said = ", ".join(
        f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in values.items()
    )
    line = f"the recipe {args['recipe']} for the flags not given: {said or 'none left'}"
    if not args["recipe"]:
        line = "no recipe (the defaults)"
    if lab:
        where = f"{args['model']}, {args['data_dir']}, --task {args['task']}, --out {args['out']}"
        line = f"no --model/--data-dir: the miniature lab ({where}); {line}"
    say(f"promot.py: {line}")


def prompt_file_length(cfg):
    """(path, length) of the prompt a run reads from a file (stage 2's stage-1 file: --prompt,
    else RUN/stage1/best/; --prompt-init file:PATH); (path, None) when there is none (yet)."""
    source = what_trains(cfg)[0]
    path = cfg.prompt or os.path.join(cfg.out, "stage1", "best", "prompt.safetensors")
    if source == "new" and cfg.prompt_init.startswith("file:"):
        path = cfg.prompt_init.partition(":")[2]
    elif source != "stage1" or not os.path.isfile(path):
        return path, None  # read_inputs says what is missing
    prompts = prompt_formats.read_prompts(path, tasks=names(cfg.task) or None)
    return path, next(iter(prompts.values())).shape[0]


def names(text):
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def settings(cfg, world):
    """cfg as RUN/config.json records it: one flat dict, the diagnostics flags included."""
    saved = asdict(cfg)
    return {**saved, **saved.pop("diagnostics"), "world_size": world}


def read_inputs(cfg, ctx):
    """What the stage reads, checked before anything is written (checks.py): the checkpoint's
    config and tokenizer, the tasks and their splits, stage 1's file, and that
    --out may hold this run."""
    checks.check_batch_split(cfg.batch_size, cfg.micro_batch_size, ctx.world)
    checks.check_model_and_data_dir(cfg.model, cfg.data_dir, cfg.out)
    trains, world, device = what_trains(cfg), ctx.world, ctx.device
    lm, config, tokenizer = evaluate.open_checkpoint(
        cfg.model, lambda c: checks.check_training_memory(cfg, c, trains, world, device)
    )
    tasks = data.register_tasks(names(cfg.task), cfg.data_dir)
    splits = {"train": [], "validation": []}
    for t in tasks:
        sample = dict(limit=cfg.train_examples, seed=cfg.seed)
        splits["train"].append(data.load_split(t, cfg.data_dir, "train", **sample))
        if cfg.eval:
            splits["validation"].append(data.load_split(t, cfg.data_dir, "validation"))
    for split, sets in splits.items():
        for t, x in zip(tasks, sets):
            checks.check_template(t, x, split)
    source = what_trains(cfg)[0]
    path = checks.stage1_file(cfg, source)  # stage 1's file, or --prompt-init's
    prompts, task_names = None, [t.name for t in tasks]
    module = lora.stage1_module(cfg.stage1_module, cfg.stage, path, config.d_model, cfg.lora_rank)
    if path and cfg.stage1_module == "prompt":  # its width, length and tasks are checked
        prompts = prompt_formats.read_prompts(path, config.d_model, task_names, cfg.prompt_length)
    if source == "new" and cfg.prompt_init.startswith("text"):
        for t in tasks:
            checks.check_prompt_words(prompt_words(cfg, t), t.name, cfg.prompt_length)
    weights = model_lib.checkpoint_files(cfg.model)[0]  # (a decoder's names the same files)
    seen = tasks, splits, data.fingerprint, cfg.model, weights, cfg.hash_weights
    recorded = run_checkpoints.inputs_record(*seen)  # for --resume to compare
    allowed = [g for g in recorded if g.split("_")[0] in names(cfg.allow_change)]
    run_checkpoints.check_run_folder(
        cfg.out,
        STAGES[cfg.stage].folder,
        cfg.resume,
        settings(cfg, ctx.world),
        RESUMABLE_CHANGES,
        PATHS,
        recorded,
        allowed,
    )
    return dict(
        lm=lm,
        config=config,
        tokenizer=tokenizer,
        tasks=tasks,
        train_sets=splits["train"],
        val_sets=splits["validation"] if cfg.eval else None,
        module=module,
        prompts=prompts,
        recorded=recorded,
    )


def main(argv=None):
    """Exit 0 when done; 2 on the user's error, 1 when the run diverged, one line each."""
    errors = {BadInput: 2, DamagedFile: 2, Diverged: 1}
    return fsdp.main("promot.py", lambda: train(parse_args(argv)), errors)


if __name__ == "__main__":
    fsdp.exit(main())  # under torchrun: without the interpreter's teardown (see support/fsdp.py)
