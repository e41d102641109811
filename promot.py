"""promot.py: ProMoT's training program (both stages, every baseline of the paper).

Run it:
    python promot.py --stage 1 --model CKPT --data-dir DATA --task rte --out runs/rte
    python promot.py --stage 2 --model CKPT --data-dir DATA --task rte --out runs/rte
    torchrun --nproc_per_node 8 promot.py ...      # the same, sharded with FSDP2

Read it top to bottom: 1. the method (`STAGES`, `init_prompt`, `train_step`);
2. `train`, one stage from named steps; 3. the command line (`Config`: the
paper's App. B.4 defaults, the input checks, `main`). The network is in
model.py, tasks in data.py, decoding and metrics in evaluate.py; Adafactor,
FSDP2, run-folder checkpoints and LoRA are plumbing in support/.
"""

import argparse
import datetime
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.distributed as dist

import data
import diagnostics
import evaluate
import model as model_lib
from support import cli, fsdp, lora, prompt_formats, run_checkpoints
from support.adafactor import Adafactor  # noqa: F401  (promot.Adafactor: the public name)
from support.run_checkpoints import atomic_write

# ---------------------------------------------------------------------------
# 1. The method
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One way to train: what learns, where the soft prompt comes from, the paper's defaults."""
    folder: str            # RUN/<folder>/ holds its checkpoints, best/ and final/
    prompt: str            # "new": initialised by --prompt-init; "stage1": stage 1's best, read; "": none
    trains_prompt: bool
    trains_model: bool
    lr: float              # App. B.4: 0.2 for a prompt alone (prompt tuning's rate), 1e-3 for the model
    label_smoothing: float
    weight_decay: float    # None = none; stage 1 follows T5X's prompt-tuning config
    steps: int
    save_every: int


STAGES = {  # folder          prompt    trains: prompt  model   lr    smooth  decay  steps  save
    "1":             Stage("stage1",        "new",    True,  False, 0.2,  0.0,  1e-5, 5000, 1000),
    "2":             Stage("stage2",        "stage1", False, True,  1e-3, 0.1,  None, 1000, 100),
    "finetune":      Stage("finetune",      "",       False, True,  1e-3, 0.1,  None, 1000, 100),
    "joint":         Stage("joint",         "new",    True,  True,  1e-3, 0.1,  None, 1000, 100),
    "random-prompt": Stage("random-prompt", "new",    False, True,  1e-3, 0.1,  None, 1000, 100),
}
# 1 = ProMoT stage 1 and the "prompt tuning" baseline; 2 = ProMoT stage 2; finetune = standard
# fine-tuning; joint and random-prompt are Table 6's ablations. The other variants are flags on
# these rows: "+1-shot" (§5.3) is --shots 1, multi-task (Table 5) is --task a,b (one prompt per
# task), and --stage1-module lora (App. C.7) puts LoRA adapters where the prompt would be.


def what_trains(cfg):
    """(prompt source, trains prompt, trains model, trains adapters) for this run."""
    stage = STAGES[cfg.stage]
    if cfg.stage1_module == "lora":  # stage 1 trains the adapters, stage 2 keeps them frozen and applied
        return "", False, stage.trains_model, stage.trains_prompt
    return stage.prompt, stage.trains_prompt, stage.trains_model, False


def init_prompt(cfg, d_model, tokenizer, task, generator):
    """A (p, d_model) fp32 prompt, initialised as the prompt-tuning code base does.

    uniform: flax `initializers.uniform(0.5)`, i.e. U[0, 0.5) (prompt-tuning's
    t5_1_1_prompt.gin); vocab: rows of the embedding table sampled from the
    5000 most frequent pieces (SentencePiece ids are frequency-ordered); text:
    one row per word of the text (the mean of its pieces' embeddings, like
    prompt-tuning's `from_class_labels`), the rest sampled from the vocabulary;
    file: the prompt in --prompt.
    """
    p = cfg.prompt_length
    if cfg.prompt_init == "uniform":
        return torch.rand(p, d_model, generator=generator) * 0.5
    if cfg.prompt_init == "file":
        return model_lib.read_prompts(cfg.prompt, d_model, [task.name], p)[task.name]
    table = model_lib.read_embedding(cfg.model).float()
    rows = table[torch.randint(0, min(5000, table.shape[0]), (p,), generator=generator)]
    if cfg.prompt_init == "text":
        for i, word in enumerate(prompt_words(cfg, task)):
            ids = tokenizer.encode(word, add_eos=False)
            rows[i] = table[ids].mean(0)
    return rows.clone()


def train_step(t5, batches, prompts, optimizer, cfg, ctx):
    """One optimizer step on this rank's micro-batches; returns (mean loss, tokens) of the global batch.

    `prompts` maps task -> (p, d) prompt, prepended to each row of its task
    (empty: no prompt). The loss is the token cross-entropy (plus T5X's z-loss)
    summed over the global batch divided by its token count, so 1 process and
    N ranks (and any micro-batching) take the same step. A non-finite loss
    returns before the update, leaving the weights as they were.
    """
    targets = [int((b["labels"] != -100).sum()) for b in batches]
    prompt_tokens = cfg.prompt_length if prompts else 0
    counts = torch.tensor([sum(targets), sum(int(b["attention_mask"].sum()) + len(b["tasks"]) * prompt_tokens
                                             for b in batches) + sum(targets)],
                          dtype=torch.float64, device=ctx.device)  # NCCL reduces device tensors only
    if ctx.world > 1:
        dist.all_reduce(counts)
    global_targets, global_tokens = counts.tolist()
    model_trains = any(p.requires_grad for p in t5.parameters())
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    for i, b in enumerate(batches):
        if ctx.world > 1 and model_trains:
            t5.set_requires_gradient_sync(i == len(batches) - 1)  # reduce-scatter once, after the last
        prompt = None
        if prompts:  # one (p, d) prompt, or each row its own task's prompt (multi-task)
            prompt = (next(iter(prompts.values())) if len(prompts) == 1
                      else torch.stack([prompts[name] for name in b["tasks"]]))
        # one process: autocast; under FSDP the MixedPrecisionPolicy casts instead
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16,
                            enabled=cfg.dtype == "bfloat16" and ctx.world == 1):
            logits = t5(b["input_ids"], b["attention_mask"], model_lib.shift_right(b["labels"]), prompt=prompt)
        loss, _ = model_lib.cross_entropy(logits, b["labels"], cfg.label_smoothing, cfg.z_loss)
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


# ---------------------------------------------------------------------------
# 2. One stage, from named steps
# ---------------------------------------------------------------------------

class Diverged(RuntimeError):
    pass


def diverged(s, what):
    """Diverged, naming the last good checkpoint and what to try."""
    last = run_checkpoints.latest_checkpoint(os.path.join(s.stage_dir, "checkpoints"))
    return Diverged(f"{what}. The last good checkpoint is {last or 'none (no checkpoint saved yet)'}; try a lower "
                    "--lr or --dtype float32, then continue with --resume (--lr may change)")


def train(cfg):
    """Run one stage as `cfg` says; returns its Session (live model and prompts, best checkpoint)."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: this machine has no CUDA GPU; use --device cpu")
    ctx = fsdp.setup_distributed(cfg.device)
    inputs = check_inputs(cfg, ctx)
    apart = cfg.stage == "1" and cfg.stage1_module == "prompt" and len(inputs["tasks"]) > 1  # a run per prompt
    diag = diagnostics.from_flags(cfg, inputs["tasks"], inputs["tokenizer"], STAGES[cfg.stage].folder)
    fsdp.barrier()  # every rank has checked --out before rank 0 writes into it
    lock = run_checkpoints.lock_run_folder(cfg.out)  # one run per folder; rank 0 holds it
    try:
        s = open_run(cfg, ctx, inputs, diag)
        return tune_prompts_apart(s) if apart else run_stage(s)
    finally:
        if lock:
            run_checkpoints.unlock_run_folder(lock)


def run_stage(s):
    """Load, build, resume, train, export: the stage's steps in order."""
    cfg, ctx, diag = s.cfg, s.ctx, s.diag
    torch.manual_seed(cfg.seed + ctx.rank)  # dropout masks differ across ranks
    s.model = load_model(cfg, ctx, s.inputs)
    s.prompts = make_prompts(s)
    build_optimizer(s)
    resume(s)
    if diag is not None and s.step == 0:
        diag.run(0, s.model, s.prompts, fsdp.unsharded)
    if not loop(s):
        return s  # stopped early (SIGTERM, --stop-after-step)
    for name in ("final",) if cfg.eval else ("final", "best"):  # no scores to choose by: best/ is the last
        export(os.path.join(s.stage_dir, name), s)
    best = s.best
    summary = (f"done: {s.stage_dir}/final" + (f"; best checkpoint step {best['step']} ({best['score']:.2f}) in "
                                                f"{s.stage_dir}/best" if best["step"] is not None else ""))
    s.log({"event": "done", "step": s.step, "best_step": best["step"], "best_score": best["score"]}, summary)
    return s


def tune_prompts_apart(s):
    """Multi-task stage 1 (§5.4, "a soft prompt for each task"): each task's prompt is tuned on its own
    data and keeps its own best checkpoint, in a run folder of its own (RUN/stage1/tasks/<task>/); then
    RUN/stage1/best/ and final/ hold all of them, in the one prompt file stage 2 reads."""
    runs = {}
    s.log(line=f"stage1: one prompt-tuning run per task (§5.4), each in {s.stage_dir}/tasks/<task>/")
    for task in s.inputs["tasks"]:
        runs[task.name] = train(replace(s.cfg, task=task.name, out=os.path.join(s.stage_dir, "tasks", task.name)))
        if runs[task.name].step < s.cfg.steps:
            return runs[task.name]  # stopped early: the same command with --resume goes on from here
    for name in ("best", "final"):
        s.prompts = {t: model_lib.read_prompts(os.path.join(r.stage_dir, name, "prompt.safetensors"))[t]
                     for t, r in runs.items()}
        export(os.path.join(s.stage_dir, name), s)
    s.step, s.best = s.cfg.steps, {t: r.best for t, r in runs.items()}
    s.log({"event": "done", "best": s.best}, f"done: one prompt per task in {s.stage_dir}/best (each task's best "
          "checkpoint: " + ", ".join(f"{t} step {b['step']}" for t, b in s.best.items()) + f") and {s.stage_dir}/final")
    return s


@dataclass
class Session:
    """Everything the steps of one stage share; `train` returns it."""
    cfg: object
    ctx: fsdp.Dist
    inputs: dict
    diag: object
    stage_dir: str
    prompt_source: str
    trains_prompt: bool
    trains_model: bool
    trains_adapters: bool
    model: object = None
    prompts: dict = None
    optimizer: object = None
    mixture: object = None
    step: int = 0
    best: dict = field(default_factory=lambda: {"step": None, "score": None, "scores": None, "evaluated": []})

    def log(self, record=None, line=None):
        """A record in RUN/log.jsonl and/or a progress line (rank 0 only)."""
        if self.ctx.main and record:
            with open(os.path.join(self.cfg.out, "log.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps({"stage": STAGES[self.cfg.stage].folder, **record}) + "\n")
        if self.ctx.main and line:
            print(line, flush=True)


def open_run(cfg, ctx, inputs, diag):
    """The stage's folder, after its settings in RUN/config.json (a kill leaves a run --resume knows)."""
    stage_dir = os.path.join(cfg.out, STAGES[cfg.stage].folder)
    if ctx.main:
        path = os.path.join(cfg.out, "config.json")
        saved = json.load(open(path, encoding="utf-8")) if os.path.isfile(path) else {}
        saved[STAGES[cfg.stage].folder] = {**asdict(cfg), "world_size": ctx.world, "data": inputs["data"]}
        run_checkpoints.write_json(path, saved)
        os.makedirs(stage_dir, exist_ok=True)
        run_checkpoints.remove_partial_writes(stage_dir)
    return Session(cfg, ctx, inputs, diag, stage_dir, *what_trains(cfg))


def load_model(cfg, ctx, inputs):
    """The pretrained model on this device (sharded under torchrun), adapters attached, the run's dropout.

    One process loads the checkpoint directly. Under torchrun the model is
    built on the meta device, sharded, and each rank copies only its slice of
    every tensor as the file streams by (support/fsdp.py)."""
    if ctx.world == 1:
        t5 = model_lib.load_pretrained(cfg.model, dtype=torch.float32, device=ctx.device)
    else:
        t5 = model_lib.build(model_lib.read_config(cfg.model), "meta")
    adapters = attach_adapters(t5, cfg, inputs["adapters"])  # before sharding: FSDP shards them with their block
    blocks = list(t5.encoder.blocks) + list(t5.decoder.blocks)
    copy = (lambda name, tensor: fsdp.copy_into_shard(t5.get_parameter(name), tensor))
    if ctx.world > 1:
        fsdp.shard_model(t5, ctx.mesh, blocks, bf16=cfg.dtype == "bfloat16",
                         activation_checkpointing=cfg.activation_checkpointing)
        t5.to_empty(device=ctx.device)
        model_lib.load_weights(t5, cfg.model, copy=copy)
    elif cfg.activation_checkpointing:
        for block in blocks:
            fsdp.checkpoint_block(block)
    for name, tensor in (adapters or {}).items():
        copy(name, tensor)
    model_lib.set_dropout(t5, cfg.dropout)
    return t5


def attach_adapters(t5, cfg, adapters):
    """LoRA for --stage1-module lora: fresh ones in stage 1 (seeded, the same on every rank),
    stage 1's in stage 2. Returns the adapter tensors to copy in, or None."""
    if cfg.stage1_module != "lora":
        return None
    tensors, info = adapters
    lora.add_lora(t5, info["rank"], info["alpha"], info["targets"])
    if tensors is None:
        tensors = lora.init_lora_tensors(t5, torch.Generator().manual_seed(cfg.seed))
    lora.check_lora_tensors(t5, tensors, cfg.lora or "the stage-1 adapters")
    return tensors


def make_prompts(s):
    """{task: prompt}: none, stage 1's (frozen), or new ones (one per task, replicated on every rank)."""
    cfg, tasks, d_model = s.cfg, s.inputs["tasks"], s.inputs["config"].d_model
    if s.prompt_source == "":
        prompts = {}
    elif s.prompt_source == "stage1":
        prompts = model_lib.read_prompts(s.inputs["prompt_file"], d_model, [t.name for t in tasks], cfg.prompt_length)
    else:
        g = torch.Generator().manual_seed(cfg.seed)  # the same on every rank
        prompts = {t.name: init_prompt(cfg, d_model, s.inputs["tokenizer"], t, g) for t in tasks}
    return {n: torch.nn.Parameter(p.to(s.ctx.device), requires_grad=s.trains_prompt) for n, p in prompts.items()}


def build_optimizer(s):
    """Freeze what this stage keeps fixed; Adafactor (T5X's rule) on the rest."""
    for name, p in s.model.named_parameters():
        p.requires_grad_(s.trains_adapters if ".lora." in name else s.trains_model)  # stage-2 adapters stay frozen
    s.model.train()
    groups = []
    if s.trains_adapters:  # like the prompt: B starts at 0, so a parameter-scaled step would be ~0
        groups.append(dict(params=[p for p in s.model.parameters() if p.requires_grad],
                           multiply_by_parameter_scale=False))
    if s.trains_prompt:  # prompt-tuning's config: no parameter-scale multiplier on the prompt
        groups.append(dict(params=list(s.prompts.values()), multiply_by_parameter_scale=False))
    if s.trains_model:
        groups.append(dict(params=[p for p in s.model.parameters() if p.requires_grad],
                           multiply_by_parameter_scale=True))
    s.optimizer = Adafactor(groups, lr=s.cfg.lr, weight_decay_rate=s.cfg.weight_decay or None,
                            step_offset=s.cfg.adafactor_step_offset)
    s.optimizer.init_state()


def training_state(s):
    """What a checkpoint holds; tensors are the live ones, so loading fills them in place."""
    state = {"prompts": {n: p.detach() for n, p in s.prompts.items()}, "optimizer": s.optimizer.state_dict()}
    if s.trains_model:
        state["model"] = s.model.state_dict()
    elif s.trains_adapters:
        state["model"] = {n: t for n, t in s.model.state_dict().items() if ".lora." in n}
    return state


def resume(s):
    """The data stream, and with --resume the latest checkpoint's weights, optimizer, RNG and position."""
    tasks, train_sets = s.inputs["tasks"], s.inputs["train_sets"]
    s.mixture = data.Mixture({t.name: x for t, x in zip(tasks, train_sets)}, seed=s.cfg.seed)
    if not s.cfg.resume:
        return
    state, folder = training_state(s), os.path.join(s.stage_dir, "checkpoints")
    ckpt, trainer = run_checkpoints.load_latest(folder, state, s.ctx.device, lambda m: s.log(line=m))
    if ckpt is None:
        return s.log(line=f"--resume: no checkpoint in {folder} yet; starting from step 0")
    s.optimizer.load_state_dict(state["optimizer"])
    for group in s.optimizer.param_groups:
        group["lr"] = s.cfg.lr  # --lr may change on --resume (after a NaN, say); config.json records it
    s.step = trainer["step"]
    s.mixture.load_state_dict(trainer["data_position"])
    best_path = os.path.join(s.stage_dir, "best.json")
    if os.path.isfile(best_path):
        s.best = json.load(open(best_path, encoding="utf-8"))
    s.log({"event": "resume", "step": s.step, "checkpoint": ckpt}, f"resumed from {ckpt} (step {s.step})")
    if s.step % s.cfg.save_every == 0:
        score_and_keep_best(s)  # in case the run stopped between saving and scoring


_STOP = {"requested": False}


def _on_sigterm(signum, frame):
    _STOP["requested"] = True  # acted on at the end of the current step


def loop(s):
    """Train until --steps; checkpoint and score every --save-every steps. False when stopped early."""
    cfg, ctx = s.cfg, s.ctx
    truncation, start = data.TruncationStats(), s.step
    per_rank = cfg.batch_size // ctx.world
    micro = cfg.micro_batch_size or per_rank
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    window_time, window_tokens, run_start, train_time = 0.0, 0, time.time(), 0.0
    trainable = sum(p.numel() for g in s.optimizer.param_groups for p in g["params"])
    if ctx.main:
        print(f"{STAGES[cfg.stage].folder}: {cfg.steps} steps of {cfg.batch_size} examples on {ctx.world} "
              f"rank(s) ({ctx.device.type}), {trainable:,} trainable parameters, lr {cfg.lr}", flush=True)
    try:
        while s.step < cfg.steps:
            step_start = time.time()
            rows = data.rank_batch(s.mixture, s.inputs["tasks"], s.inputs["train_sets"], cfg.batch_size, ctx.rank,
                                   ctx.world, cfg.shots, cfg.seed, s.inputs["tokenizer"], cfg.max_input_tokens,
                                   truncation)
            batches = [data.encode_batch(s.inputs["tokenizer"], [(x, y) for _, x, y in rows[i:i + micro]],
                                         cfg.max_input_tokens, cfg.max_target_tokens,
                                         tasks=[t for t, _, _ in rows[i:i + micro]], device=ctx.device)
                       for i in range(0, per_rank, micro)]
            loss, global_tokens = train_step(s.model, batches, s.prompts, s.optimizer, cfg, ctx)
            if not math.isfinite(loss):
                raise diverged(s, f"loss is {loss} at step {s.step + 1}; stopped without updating")
            s.step += 1
            if s.diag is not None:
                s.diag.run(s.step, s.model, s.prompts, fsdp.unsharded)
            elapsed = time.time() - step_start
            window_tokens, window_time, train_time = window_tokens + global_tokens, window_time + elapsed, \
                train_time + elapsed
            if s.step % cfg.log_every == 0 or s.step == cfg.steps:
                tps = window_tokens / max(window_time, 1e-9)
                eta = train_time / (s.step - start) * (cfg.steps - s.step)  # training time only
                s.log({"step": s.step, "loss": loss, "lr": cfg.lr, "tokens_per_s": tps,
                       "elapsed_s": time.time() - run_start},
                      f"{STAGES[cfg.stage].folder} step {s.step}/{cfg.steps} | loss {loss:.4f} | lr {cfg.lr:.2e} | "
                      f"{tps:,.0f} tok/s | ETA {datetime.timedelta(seconds=round(eta))}")
                window_time, window_tokens = 0.0, 0
            if not checkpoint_if_due(s):
                return False
    finally:
        signal.signal(signal.SIGTERM, previous)
    return True


def checkpoint_if_due(s):
    """Save (and score) at --save-every, at the end, and when asked to stop; False = stop now."""
    cfg, ctx = s.cfg, s.ctx
    stop = torch.tensor([1.0 if _STOP["requested"] else 0.0], device=ctx.device)
    if ctx.world > 1:
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
    stop = bool(stop.item()) or s.step == cfg.stop_after_step
    scheduled = s.step % cfg.save_every == 0 or s.step == cfg.steps
    if (scheduled or stop) and not fsdp.all_finite([p for g in s.optimizer.param_groups for p in g["params"]]):
        raise diverged(s, f"the weights hold NaN or inf after step {s.step}; not saved")
    if scheduled or stop:
        trainer = {"step": s.step, "examples_seen": s.step * cfg.batch_size, "world_size": ctx.world,
                   "data_position": s.mixture.state_dict()}
        path = run_checkpoints.save_checkpoint(os.path.join(s.stage_dir, "checkpoints"), s.step,
                                               training_state(s), trainer, ctx.device, keep=cfg.keep_checkpoints)
        s.log({"event": "checkpoint", "step": s.step, "path": path})
        if scheduled:
            score_and_keep_best(s)
    if stop and s.step < cfg.steps:
        why = "SIGTERM" if _STOP["requested"] else f"--stop-after-step {cfg.stop_after_step}"
        s.log({"event": "stopped", "step": s.step, "reason": why},
              f"stopped at step {s.step} ({why}); checkpoint saved. Continue with the same command plus --resume")
        return False
    return True


@torch.no_grad()
def score_and_keep_best(s):
    """Score this checkpoint on the validation split with evaluate.score_task (the paper's decoding,
    App. B.2 post-processing, metric); export it to best/ when it is the best so far (App. B.4).
    Under FSDP the weights are gathered for the duration and each rank decodes a share of the batches."""
    cfg, ctx, inputs, best, scores = s.cfg, s.ctx, s.inputs, s.best, {}
    if not cfg.eval or s.step in best["evaluated"]:
        return
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16" and ctx.world == 1)
    with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []), \
            fsdp.unsharded(s.model), autocast:
        for task, examples, pool in zip(inputs["tasks"], inputs["val_sets"], inputs["train_sets"]):
            scores[task.name] = float(evaluate.score_task(
                s.model, inputs["tokenizer"], task, examples[: cfg.eval_examples], pool=pool, shots=cfg.shots,
                prompt=s.prompts.get(task.name), num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens,
                batch_size=cfg.eval_batch_size, seed=cfg.seed, max_input_tokens=cfg.max_input_tokens,
                distributed=ctx.world > 1, brevity_penalty="t5x", length_penalty=0.6)["score"])  # the paper's T5X
    score = sum(scores.values()) / len(scores)
    improved = best["score"] is None or score > best["score"]
    if improved:
        export(os.path.join(s.stage_dir, "best"), s)
        best.update(step=s.step, score=score, scores=scores)
    best["evaluated"].append(s.step)
    if ctx.main:
        run_checkpoints.write_json(os.path.join(s.stage_dir, "best.json"), best)
    s.log({"event": "eval", "step": s.step, "split": "validation", "scores": scores, "score": score,
           "best_step": best["step"]},
          f"eval step {s.step}: validation " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items())
          + (" (best so far)" if improved else f" (best: step {best['step']}, {best['score']:.2f})"))


def export(folder, s):
    """A directory evaluate.py, transformers and PEFT read: the model in the public layout (when it
    trained) with spiece.model, prompt.safetensors (+ peft_<task>/ adapters), lora.safetensors."""
    state = fsdp.full_state_dict(s.model) if s.trains_model else None
    adapters = ({n: fsdp.full_tensor(p).detach().cpu() for n, p in s.model.named_parameters() if ".lora." in n}
                if s.model is not None and lora.lora_info(s.model) else None)  # full tensors (a collective under FSDP)
    if s.ctx.main:
        if s.trains_model:
            model_lib.save_pretrained(s.model, folder, state_dict=state)
            shutil.copy2(os.path.join(s.cfg.model, "spiece.model"), os.path.join(folder, "spiece.model"))
        os.makedirs(folder, exist_ok=True)
        if s.prompts:
            with atomic_write(os.path.join(folder, "prompt.safetensors")) as tmp:
                model_lib.save_prompts(s.prompts, tmp)
        for task, p in s.prompts.items():  # the same prompt as a PEFT prompt-tuning adapter
            prompt_formats.write_peft_adapter(os.path.join(folder, f"peft_{task}"), p.detach(),
                                              folder if s.trains_model else s.cfg.model)
        if adapters is not None:
            with atomic_write(os.path.join(folder, "lora.safetensors")) as tmp:
                lora.save_lora(s.model, tmp, state_dict=adapters)
        chosen = f"validation score at {s.cfg.shots}-shot" if os.path.basename(folder) == "best" and s.cfg.eval \
            else "the last step"  # what evaluate.py's table says of the fine-tuned task's rows
        run_checkpoints.write_json(os.path.join(folder, "training.json"), {"stage": s.cfg.stage, "task": s.cfg.task,
                                   "shots": s.cfg.shots, "step": s.step, "chosen_by": chosen})
    fsdp.barrier()


# ---------------------------------------------------------------------------
# 3. The command line: settings (defaults = App. B.4), input checks, main
# ---------------------------------------------------------------------------

flag, AT_LEAST_0, AT_LEAST_1, RATE = cli.flag, cli.AT_LEAST_0, cli.AT_LEAST_1, cli.RATE  # a flag, what it accepts


@dataclass
class Config:
    """Every setting; the README's "Training" section explains each one. None = the stage's default."""
    stage: str = flag("1", "1: ProMoT stage 1 (prompt tuning); 2: stage 2 (model tuning); or a baseline (STAGES)",
                      choices=tuple(STAGES))
    model: str = flag("", "pretrained checkpoint folder (Hugging Face layout, with spiece.model) [lab: lab/tiny-t5]")
    data_dir: str = flag("", "folder with one sub-folder per task [lab: lab/data]")
    task: str = flag("", "fine-tuned task, or several comma-separated (multi-task) [lab: lab_owns]")
    out: str = flag("", "run folder; each stage writes RUN/<stage>/ [lab: runs/lab]")
    steps: int = flag(None, "training steps [stage 1: 5000; others: 1000]", valid=AT_LEAST_1)
    batch_size: int = flag(64, "global batch size in examples, across all ranks", valid=AT_LEAST_1)
    micro_batch_size: int = flag(None, "examples per rank per forward pass [batch-size / ranks]", valid=AT_LEAST_1)
    seed: int = flag(0, "seed of the data order, prompt initialisation, dropout and demonstrations")
    resume: bool = flag(False, "continue from the latest checkpoint of RUN/<stage>/ (same settings and data)")
    allow_data_change: bool = flag(False, "with --resume: continue although the data files changed")
    lr: float = flag(None, "constant learning rate [stage 1: 0.2 (LoRA: 1e-3); others: 1e-3]", valid=AT_LEAST_0)
    save_every: int = flag(None, "checkpoint and score every N steps [stage 1: 1000; others: 100]", valid=AT_LEAST_1)
    stage1_module: str = flag("prompt", "what stage 1 trains and stage 2 keeps: the soft prompt or LoRA (App. C.7)",
                              choices=("prompt", "lora"))
    lora_rank: int = flag(4, "LoRA rank r (Table 15: 2 and 4)")
    lora_alpha: float = flag(None, "LoRA scale numerator: the update is (alpha/r) B A [r]")
    lora_targets: str = flag("q,v", "attention projections that get adapters (q,k,v,o)")
    lora: str = flag("", "stage 2 with LoRA: the frozen adapter file [RUN/stage1/best/lora.safetensors]")
    prompt_length: int = flag(100, "soft prompt length p", valid=AT_LEAST_1)
    prompt_init: str = flag("uniform", "prompt initialisation: U[0, 0.5), vocabulary rows, label words, or --prompt",
                            choices=("uniform", "vocab", "text", "file"))
    prompt_init_text: str = flag("", "words for --prompt-init text, comma-separated [the task's label words]")
    prompt: str = flag("", "stage 2's frozen prompt file [RUN/stage1/best/prompt.safetensors], or --prompt-init file's")
    dropout: float = flag(0.1, "dropout rate (App. B.4)", valid=RATE)
    label_smoothing: float = flag(None, "label smoothing [stage 1: 0; others: 0.1]", valid=RATE)
    z_loss: float = flag(1e-4, "T5X's z-loss: z_loss * logsumexp(logits)^2 per target token; 0: off", valid=AT_LEAST_0)
    weight_decay: float = flag(None, "Adafactor weight decay, unscaled by lr [stage 1: 1e-5; others: none]", valid=RATE)
    adafactor_step_offset: int = flag(0, "Adafactor step_offset (-1000000 continues a 1M-step checkpoint's decay)",
                                      valid=(lambda v: v <= 0, "<= 0"))
    train_examples: int = flag(None, "train on a --seed sample of N examples of each task [all]", valid=AT_LEAST_1)
    shots: int = flag(0, "demonstrations before each training and validation input (1: '+1-shot')", valid=AT_LEAST_0)
    max_input_tokens: int = flag(1024, "input tokens kept, EOS included (App. B.4)", valid=AT_LEAST_1)
    max_target_tokens: int = flag(256, "target tokens kept, EOS included",
                                  valid=(lambda v: v >= 4, ">= 4 (two sentinels, an answer, EOS)"))
    dtype: str = flag("float32", "compute dtype; bfloat16 keeps fp32 master weights", choices=("float32", "bfloat16"))
    activation_checkpointing: bool = flag(False, "recompute each block in backward to save memory")
    eval: bool = flag(True, "score every checkpoint on the validation split and keep the best (--no-eval: the last)")
    eval_examples: int = flag(None, "score only the first N examples of each task [all]", valid=AT_LEAST_1)
    eval_batch_size: int = flag(16, "examples per rank per decoding batch", valid=AT_LEAST_1)
    num_beams: int = flag(4, "beam width when scoring (App. B.4: 4)", valid=AT_LEAST_1)
    max_new_tokens: int = flag(None, "longest decoded answer [per metric, see evaluate.py]", valid=AT_LEAST_1)
    probe_every: int = flag(0, "score --probe-tasks every N steps and at step 0 (Fig. 1, 2) [0: off]", valid=AT_LEAST_0)
    probe_tasks: str = flag("", "comma-separated unseen tasks to probe, e.g. trivia_qa,wmt16_ende")
    probe_shots: str = flag("1", "comma-separated shot counts of the probes")
    probe_limit: int = flag(100, "examples per probe task", valid=AT_LEAST_1)
    align_steps: str = flag("", "steps at which to record the gradient alignment cos(g, g_format) (Fig. 3, 7)")
    align_every: int = flag(0, "also record the gradient alignment every N steps [0: off]", valid=AT_LEAST_0)
    align_batch_size: int = flag(32, "examples in the gradient-alignment batch", valid=AT_LEAST_1)
    diagnostics_strict: bool = flag(False, "stop the run when a probe fails (default: log it and go on)")
    log_every: int = flag(10, "print a progress line every N steps", valid=AT_LEAST_1)
    keep_checkpoints: int = flag(1, "training checkpoints kept (2+: a damaged one falls back to the one before)",
                                 valid=AT_LEAST_1)
    stop_after_step: int = flag(None, "save and stop after this step, as if preempted", valid=AT_LEAST_1)
    device: str = flag("auto", "cpu, cuda or auto")


# Settings that may change between a run and its --resume.
RESUMABLE_CHANGES = {"resume", "allow_data_change", "steps", "log_every", "stop_after_step", "eval_batch_size",
                     "device", "out", "lr", "keep_checkpoints", "probe_every", "probe_tasks", "probe_shots",
                     "probe_limit", "align_steps", "align_every", "align_batch_size", "diagnostics_strict"}
# Old flag -> new flag (the old one still works, with a note).
RENAMED = {"--max-input-length": "--max-input-tokens", "--max-target-length": "--max-target-tokens"}

# The bundled tiny T5 and its synthetic suite (lab/): what runs when no model and data are given.
_LAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lab")
LAB_DEFAULTS = {"model": os.path.join(_LAB, "tiny-t5"), "data_dir": os.path.join(_LAB, "data"),
                "task": "lab_owns", "out": os.path.join("runs", "lab")}


class UsageError(Exception):
    """A setting or input the user can fix; printed as one line, nothing is overwritten."""


def parse_args(argv=None):
    """Command line -> Config. Every field is a flag; None defaults come from the stage's row of STAGES."""
    p = argparse.ArgumentParser(
        prog="promot.py", formatter_class=cli.HelpFormatter,
        description=("ProMoT training (Wang et al., ICLR 2024), one stage per call; defaults reproduce the "
                     "paper's App. B.4. Runs as one process or under torchrun (FSDP2). Bracketed defaults "
                     "depend on --stage. Without --model and --data-dir: the miniature lab."))
    cli.add_flags(p, Config, required=("stage",))
    args = p.parse_args(cli.renamed_flags(sys.argv[1:] if argv is None else argv, RENAMED, "promot.py"))
    if not args.model and not args.data_dir:
        # No model and no data: the miniature lab (README), so a newcomer sees ProMoT run.
        for name, value in LAB_DEFAULTS.items():
            setattr(args, name, getattr(args, name) or value)
        print(f"promot.py: no --model/--data-dir: the miniature lab ({args.model}, {args.data_dir}, "
              f"--task {args.task}, --out {args.out})", flush=True)
    missing = [f"--{n.replace('_', '-')}" for n in ("model", "data_dir", "task", "out") if not getattr(args, n)]
    if missing:
        p.error(f"the following arguments are required: {', '.join(missing)} "
                "(omit both --model and --data-dir to run the miniature lab)")
    cfg = Config(**vars(args))
    if cfg.stage == "1" and cfg.stage1_module == "lora" and cfg.lr is None:
        cfg.lr = 1e-3  # App. C.7 gives no LoRA rate; the prompt's 0.2 would swamp a rank-4 update
    for k in ("steps", "save_every", "lr", "label_smoothing", "weight_decay"):
        if getattr(cfg, k) is None:
            setattr(cfg, k, getattr(STAGES[cfg.stage], k))
    return cfg


def names(text):
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def prompt_words(cfg, task):
    """The words of --prompt-init text: --prompt-init-text, else the task's label words."""
    words = names(cfg.prompt_init_text) or list(task.label_words or ())
    if not words:
        raise UsageError(f"--prompt-init text: task {task.name!r} has no label words; pass --prompt-init-text")
    if len(words) > cfg.prompt_length:
        raise UsageError(f"--prompt-init-text has {len(words)} words, more than --prompt-length {cfg.prompt_length}")
    return words


def check_inputs(cfg, ctx):
    """Everything a user can get wrong, checked up front: one clear message, nothing written."""
    if problem := cli.out_of_range(cfg):  # each flag's `valid` range
        raise UsageError(problem)
    per_rank, rest = divmod(cfg.batch_size, ctx.world)
    if rest or per_rank % (cfg.micro_batch_size or per_rank):
        raise UsageError(f"--batch-size {cfg.batch_size} must split evenly over {ctx.world} rank(s) and then into "
                         f"micro-batches of --micro-batch-size {cfg.micro_batch_size or per_rank} examples")
    inputs = check_model_and_data(cfg)
    inputs.update(check_stage_inputs(cfg, inputs["config"], inputs["tasks"]))
    inputs["data"] = {f"{t.name} {split}": data.fingerprint(x) for split in ("train", "validation")  # for --resume
                      for t, x in zip(inputs["tasks"], inputs["train_sets" if split == "train" else "val_sets"] or ())}
    run_checkpoints.check_run_folder(cfg.out, STAGES[cfg.stage].folder, cfg.resume, {**asdict(cfg), "world_size":
                                     ctx.world}, RESUMABLE_CHANGES, ("model", "data_dir", "prompt", "lora"),
                                     inputs["data"], cfg.allow_data_change)
    return inputs


def check_model_and_data(cfg):
    """The checkpoint folder, its tokenizer and config, the tasks and their splits."""
    if not os.path.isdir(cfg.model):
        raise UsageError(f"--model {cfg.model}: no such checkpoint directory")
    for name in ("config.json", "spiece.model"):
        if not os.path.isfile(os.path.join(cfg.model, name)):
            raise UsageError(f"--model {cfg.model}: no {name}; expected a Hugging Face T5/mT5 checkpoint "
                             "directory with its SentencePiece vocabulary (spiece.model)")
    if not os.path.isdir(cfg.data_dir):
        raise UsageError(f"--data-dir {cfg.data_dir}: no such directory")
    config = model_lib.read_config(cfg.model)
    tokenizer = data.Tokenizer(os.path.join(cfg.model, "spiece.model"))
    tokenizer.check_fits(config.vocab_size)
    task_names = names(cfg.task)
    if not task_names or len(set(task_names)) != len(task_names):
        raise UsageError(f"--task {cfg.task!r}: expected one task name or distinct comma-separated names")
    tasks = [data.get_task(n, cfg.data_dir) for n in task_names]
    train_sets = [data.load_split(t, cfg.data_dir, "train", limit=cfg.train_examples, seed=cfg.seed) for t in tasks]
    val_sets = [data.load_split(t, cfg.data_dir, "validation") for t in tasks] if cfg.eval else None
    for split, sets in (("train", train_sets), ("validation", val_sets or ())):
        for t, x in zip(tasks, sets):
            data.check_template(t, x, split)
    return dict(config=config, tokenizer=tokenizer, tasks=tasks, train_sets=train_sets, val_sets=val_sets)


def check_stage_inputs(cfg, config, tasks):
    """What the stage reads besides the model: stage 1's prompt or adapters, an initial prompt."""
    adapters = None
    if cfg.stage1_module == "lora":
        if cfg.stage not in ("1", "2"):
            raise UsageError(f"--stage1-module lora belongs to ProMoT's two stages (--stage 1 or 2), "
                             f"not --stage {cfg.stage}")
        if cfg.stage == "1":
            lora.check_settings(cfg.lora_rank, names(cfg.lora_targets), "--lora-rank", "--lora-targets")
            adapters = (None, {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "targets": names(cfg.lora_targets)})
        else:
            path = stage1_file(cfg, cfg.lora, "lora.safetensors", "adapters", "--lora")
            adapters = lora.read_lora(path, config.d_model)
    source, prompt_file = what_trains(cfg)[0], None
    if source == "stage1":
        prompt_file = stage1_file(cfg, cfg.prompt, "prompt.safetensors", "prompt", "--prompt")
    elif source == "new" and cfg.prompt_init == "file":
        if not cfg.prompt:
            raise UsageError("--prompt-init file needs --prompt FILE")
        prompt_file = cfg.prompt
    elif source == "new" and cfg.prompt_init == "text":
        for t in tasks:
            prompt_words(cfg, t)
    if prompt_file:  # its width, length and tasks
        model_lib.read_prompts(prompt_file, config.d_model, [t.name for t in tasks], cfg.prompt_length)
    return dict(adapters=adapters, prompt_file=prompt_file)


def stage1_file(cfg, given, name, what, flag):
    """The stage-1 file stage 2 reads: `given`, else RUN/stage1/best/<name>."""
    path = given or os.path.join(cfg.out, "stage1", "best", name)
    if not os.path.isfile(path):
        raise UsageError(f"--stage {cfg.stage} --stage1-module {cfg.stage1_module} needs stage-1 {what}: none at "
                         f"{path}; run --stage 1 with the same --out first, or pass {flag} FILE")
    return path


def main(argv=None):
    cfg = parse_args(argv)
    code, message = 0, ""
    try:
        train(cfg)
    except (UsageError, model_lib.CheckpointError, data.DataError, lora.LoRAError, diagnostics.DiagnosticsError,
            run_checkpoints.CheckpointFileError, prompt_formats.PromptFormatError) as e:
        code, message = 2, f"promot.py: error: {e}"
    except Diverged as e:
        code, message = 1, f"promot.py: {e}"
    finally:  # on every exit, errors included, so no rank leaves the group behind
        if message and (not dist.is_initialized() or dist.get_rank() == 0):  # every rank found the same problem
            print(message, file=sys.stderr)
        if dist.is_initialized():
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    fsdp.exit(main())  # under torchrun: without the interpreter's teardown (see support/fsdp.py)
