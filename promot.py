"""promot.py: the training program of ProMoT (both stages, every baseline).

Run it:
    python promot.py --stage 1 --model CKPT --data-dir DATA --task rte --out runs/rte
    python promot.py --stage 2 --model CKPT --data-dir DATA --task rte --out runs/rte
    torchrun --nproc_per_node 8 promot.py ...      # the same, sharded with FSDP2

This room holds what turns a pretrained T5 into a ProMoT model:
  * `Adafactor`, T5X's optimizer rule written out by hand (and correct on
    FSDP-sharded parameters),
  * the FSDP2 wrapper (`shard_model`, `load_sharded`),
  * the training loop for stage 1 (prompt tuning on the frozen model), stage 2
    (model tuning with the stage-1 prompt frozen and prepended) and the
    paper's baselines, with atomic checkpoints, exact resume, SIGTERM and NaN
    handling and best-checkpoint selection by the validation metric,
  * the command line (`Config` holds every setting; its defaults are the
    paper's App. B.4 recipe).
It leaves the network to model.py, tokenization/tasks/batching to data.py and
decoding/metrics to evaluate.py.
"""

import argparse
import contextlib
import itertools
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.distributed as dist

import data
import diagnostics
import evaluate
import model as model_lib

try:  # DTensor is what FSDP2 hands the optimizer; absent on very old torch.
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
except ImportError:  # pragma: no cover
    DTensor = Replicate = Shard = distribute_tensor = None


# ---------------------------------------------------------------------------
# Adafactor (T5X's rule)
# ---------------------------------------------------------------------------

class Adafactor(torch.optim.Optimizer):
    """Adafactor with the update rule of T5X (`t5x/adafactor.py`), by hand.

    For a parameter X with gradient G at step t (counted from 1, minus
    `step_offset`):
        decay   = 1 - t^(-decay_rate)                  (0 at t = 1)
        G2      = G*G + epsilon1
        V       = decay*V + (1-decay)*G2                (or its factored form)
        U       = G / sqrt(V)
        U       = U / max(1, RMS(U) / clipping_threshold)
        step    = lr * max(epsilon2, RMS(X))  if multiply_by_parameter_scale
                  lr                          otherwise
        M       = beta1*M + (1-beta1)*step*U            (only when beta1 is set)
        X       = (1 - weight_decay_rate)*X - step*U    (or - M)
    Weight decay is *not* multiplied by the learning rate, as in T5X
    (transformers' Adafactor multiplies it).

    Factoring (Shazeer & Stern 2018): when the second-largest dimension of X
    is at least `min_dim_size_to_factor`, V is kept as two vectors, a "row"
    statistic (mean of G2 over the largest dimension) and a "column" statistic
    (mean over the second largest), and V ~ row * col / mean(row). Dimensions
    are ranked with a stable sort, so for a square matrix the last dimension
    counts as the largest, like numpy.argsort in T5X. T5X's default rule
    refuses parameters of more than 2 dimensions; here they factor over their
    two largest dimensions (T5X's `_factored_dims`), and every RMS is over the
    whole tensor. Smaller tensors keep a full V.

    Learning rate: T5X's Adafactor has no schedule of its own; the trainer
    passes `learning_rate_fn(step)` (the paper uses a constant). Set
    `group["lr"]` between steps to schedule it.

    FSDP2: a parameter may be a DTensor sharded on one dimension of a 1-D
    device mesh (or replicated). Every mean and RMS above is then computed
    over the whole tensor (local sums + all_reduce), so N ranks take exactly
    the steps one process takes, and the state is a DTensor sharded like the
    parameter (row/column statistics that lose the sharded dimension are
    replicated).

    To reuse it elsewhere, copy the class and the four small helpers after it
    (`_is_dtensor`, `_local`, `_shard_info`, `_zeros_state`); it needs only torch.
    """

    def __init__(self, params, lr, decay_rate=0.8, clipping_threshold=1.0,
                 multiply_by_parameter_scale=True, beta1=None, weight_decay_rate=None,
                 min_dim_size_to_factor=128, epsilon1=1e-30, epsilon2=1e-3,
                 step_offset=0, factored=True):
        if lr is None or lr < 0:
            raise ValueError(f"Adafactor needs a learning rate >= 0, got {lr!r}")
        if clipping_threshold is not None and clipping_threshold <= 0:
            raise ValueError(f"clipping_threshold must be > 0 or None, got {clipping_threshold!r}")
        defaults = dict(lr=lr, decay_rate=decay_rate, clipping_threshold=clipping_threshold,
                        multiply_by_parameter_scale=multiply_by_parameter_scale, beta1=beta1,
                        weight_decay_rate=weight_decay_rate,
                        min_dim_size_to_factor=min_dim_size_to_factor, epsilon1=epsilon1,
                        epsilon2=epsilon2, step_offset=step_offset, factored=factored)
        super().__init__(params, defaults)

    @staticmethod
    def factored_dims(shape, min_dim_size_to_factor=128):
        """(row_dim, col_dim) to factor over, or None: T5X's `_factored_dims`.

        row_dim is the second-largest dimension, col_dim the largest; the row
        statistic averages over col_dim and the column statistic over row_dim.
        """
        if len(shape) < 2:
            return None
        order = sorted(range(len(shape)), key=lambda d: shape[d])  # stable, like argsort
        if shape[order[-2]] < min_dim_size_to_factor:
            return None
        return order[-2], order[-1]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def init_state(self):
        """Create the (zero) state of every parameter now rather than at its first step,
        e.g. as the template a checkpoint is loaded into."""
        for group in self.param_groups:
            for p in group["params"]:
                self._state_of(p, group)

    def _state_of(self, p, group):
        state = self.state[p]
        if len(state) == 0:
            x = p.to_local() if _is_dtensor(p) else p
            dims = (self.factored_dims(tuple(p.shape), group["min_dim_size_to_factor"])
                    if group["factored"] else None)
            state["step"] = torch.tensor(0, dtype=torch.int64)
            if dims is not None:
                row_dim, col_dim = dims
                state["v_row"] = _zeros_state(p, x, drop=col_dim)  # mean over the largest dim
                state["v_col"] = _zeros_state(p, x, drop=row_dim)
            else:
                state["v"] = _zeros_state(p, x, drop=None)
            if group["beta1"] is not None:
                state["m"] = _zeros_state(p, x, drop=None)
        return state

    def _update(self, p, group):
        # Local views: on a DTensor we work on this rank's shard and reduce
        # across ranks where a statistic spans the sharded dimension.
        shape = tuple(p.shape)  # the global shape, also for a DTensor
        shard_dim, pg = _shard_info(p)
        x = p.to_local() if _is_dtensor(p) else p
        g = p.grad.to_local() if _is_dtensor(p.grad) else p.grad
        if g.is_sparse:
            raise RuntimeError("Adafactor does not support sparse gradients")

        def mean(t, dims, full_shape, sharded):
            """Mean over `dims` (keepdim) of a tensor whose dim `sharded` is split across ranks."""
            s = t.sum(dim=dims, keepdim=True)
            if pg is not None and sharded is not None and sharded in dims:
                dist.all_reduce(s, group=pg)
            return s / math.prod(full_shape[d] for d in dims)

        def rms(t):
            all_dims = tuple(range(t.dim()))
            return mean(t * t, all_dims, shape, shard_dim).sqrt().reshape(())

        state = self._state_of(p, group)
        dims = (self.factored_dims(shape, group["min_dim_size_to_factor"])
                if group["factored"] else None)

        x32 = x.float()
        g32 = g.float()
        t = int(state["step"]) - group["step_offset"] + 1
        decay = 1.0 - t ** (-group["decay_rate"])
        mixing = 1.0 - decay

        update_scale = group["lr"]
        if group["multiply_by_parameter_scale"]:
            update_scale = update_scale * torch.clamp(rms(x32), min=group["epsilon2"])

        g2 = g32 * g32 + group["epsilon1"]
        if dims is not None:
            row_dim, col_dim = dims
            v_row, v_col = _local(state["v_row"]), _local(state["v_col"])
            v_row.mul_(decay).add_(mixing * mean(g2, (col_dim,), shape, shard_dim).squeeze(col_dim))
            v_col.mul_(decay).add_(mixing * mean(g2, (row_dim,), shape, shard_dim).squeeze(row_dim))
            # v_row lost col_dim: the dims after it shift down by one.
            row_shape = shape[:col_dim] + shape[col_dim + 1:]
            row_dim_in_row = row_dim - (1 if col_dim < row_dim else 0)
            row_sharded = None if shard_dim in (None, col_dim) else shard_dim - (1 if col_dim < shard_dim else 0)
            row_col_mean = mean(v_row, (row_dim_in_row,), row_shape, row_sharded)
            row_factor = (v_row / row_col_mean).rsqrt()
            col_factor = v_col.rsqrt()
            u = g32 * row_factor.unsqueeze(col_dim) * col_factor.unsqueeze(row_dim)
        else:
            v = _local(state["v"])
            v.mul_(decay).add_(mixing * g2)
            u = g32 * v.rsqrt()

        if group["clipping_threshold"] is not None:
            u = u / torch.clamp(rms(u) / group["clipping_threshold"], min=1.0)

        subtrahend = update_scale * u
        if group["beta1"] is not None:
            m = _local(state["m"])
            m.mul_(group["beta1"]).add_((1.0 - group["beta1"]) * subtrahend)
            subtrahend = m
        if group["weight_decay_rate"] is not None:
            new_x = (1.0 - group["weight_decay_rate"]) * x32 - subtrahend
        else:
            new_x = x32 - subtrahend
        x.copy_(new_x)
        state["step"] += 1


def _is_dtensor(t):
    return DTensor is not None and isinstance(t, DTensor)


def _local(t):
    return t.to_local() if _is_dtensor(t) else t


def _shard_info(p):
    """(sharded dim or None, process group or None) of a parameter."""
    if not _is_dtensor(p):
        return None, None
    if p.device_mesh.ndim != 1:
        raise NotImplementedError(
            "Adafactor handles DTensors on a 1-D device mesh (FSDP2 data parallel); "
            f"got a {p.device_mesh.ndim}-D mesh")
    placement = p.placements[0]
    if placement.is_replicate():
        return None, None
    if not placement.is_shard():
        raise NotImplementedError(f"Adafactor cannot update a parameter with placement {placement}")
    return placement.dim, p.device_mesh.get_group()


def _zeros_state(p, x_local, drop):
    """fp32 zeros shaped like parameter `p` without dimension `drop`, placed like `p`.

    On a DTensor the state is a DTensor too, so distributed checkpointing
    saves and restores it shard by shard with the parameter."""
    local_shape = list(x_local.shape)
    if drop is not None:
        del local_shape[drop]
    local = torch.zeros(local_shape, dtype=torch.float32, device=x_local.device)
    if not _is_dtensor(p):
        return local
    shard_dim, _ = _shard_info(p)
    global_shape = list(p.shape)
    if drop is not None:
        del global_shape[drop]
    if shard_dim is None or shard_dim == drop:
        # The statistic averaged over the sharded dimension: every rank holds all of it.
        return DTensor.from_local(torch.zeros(global_shape, dtype=torch.float32, device=x_local.device),
                                  p.device_mesh, [Replicate()], run_check=False)
    new_dim = shard_dim - (1 if drop is not None and drop < shard_dim else 0)
    stride = tuple(math.prod(global_shape[i + 1:]) for i in range(len(global_shape)))
    return DTensor.from_local(local, p.device_mesh, [Shard(new_dim)], run_check=False,
                              shape=torch.Size(global_shape), stride=stride)


# ---------------------------------------------------------------------------
# Configuration: every setting, defaults from the paper (App. B.4)
# ---------------------------------------------------------------------------

STAGES = ("1", "2", "finetune", "joint", "random-prompt")
STAGE_DIRS = {"1": "stage1", "2": "stage2", "finetune": "finetune", "joint": "joint",
              "random-prompt": "random-prompt"}


@dataclass
class Config:
    stage: str = field(default="1", metadata=dict(help=(
        "what to train. 1: ProMoT stage 1 = prompt tuning (model frozen, only the soft prompt "
        "learns; also the 'prompt tuning' baseline). 2: ProMoT stage 2 (stage-1 prompt frozen and "
        "prepended, model tuned). finetune: standard fine-tuning, no prompt. joint: prompt and "
        "model tuned together in one stage (Table 6). random-prompt: fine-tuning with a fixed "
        "random uniform prompt (Table 6)")))
    model: str = field(default="", metadata=dict(help="pretrained checkpoint directory (Hugging Face layout, with spiece.model) [without --model and --data-dir: the miniature lab, lab/tiny-t5 on lab/data]"))
    data_dir: str = field(default="", metadata=dict(help="data folder read by data.py (one sub-folder per task) [lab/data with the lab]"))
    task: str = field(default="", metadata=dict(help=(
        "task name, or several comma-separated for multi-task training (Table 5): stage 1 "
        "learns one prompt per task, stage 2 mixes the tasks, each example with its own task's prompt "
        "[lab_owns with the lab]")))
    out: str = field(default="", metadata=dict(help=(
        "run folder. Each stage writes RUN/<stage>/ (checkpoints, best/, final/); "
        "RUN/config.json and RUN/log.jsonl collect every stage [runs/lab with the lab]")))
    steps: int = field(default=None, metadata=dict(help="training steps [stage 1: 5000; others: 1000]"))
    batch_size: int = field(default=64, metadata=dict(help=(
        "global batch size in examples, across all ranks; gradients accumulate over "
        "micro-batches when --micro-batch-size is smaller than batch-size/ranks")))
    micro_batch_size: int = field(default=None, metadata=dict(help="examples per rank per forward pass [batch-size / ranks]"))
    seed: int = field(default=0, metadata=dict(help="seed of the data order, the prompt initialisation and dropout"))
    resume: bool = field(default=False, metadata=dict(help=(
        "continue from the latest checkpoint in RUN/<stage>/checkpoints (starts fresh if there is none); "
        "the settings must match the saved RUN/config.json")))
    lr: float = field(default=None, metadata=dict(help=(
        "learning rate, constant [stage 1: 0.2 on the prompt; others: 1e-3 (joint: 1e-3 for prompt and model)]")))
    save_every: int = field(default=None, metadata=dict(help="checkpoint (and score) every N steps [stage 1: 1000; others: 100]"))
    stage1_module: str = field(default="prompt", metadata=dict(help=(
        "what stage 1 trains and stage 2 keeps frozen and applied: the soft prompt (the paper), or "
        "LoRA adapters (App. C.7, Table 15); evaluate.py --lora applies them for same-format tasks only")))
    lora_rank: int = field(default=4, metadata=dict(help="LoRA rank r (Table 15: 2 and 4)"))
    lora_alpha: float = field(default=None, metadata=dict(help="LoRA scale numerator; the update is (alpha/r) B A [r]"))
    lora_targets: str = field(default="q,v", metadata=dict(help="attention projections that get adapters (q,k,v,o)"))
    lora: str = field(default="", metadata=dict(help=(
        "stage 2 with --stage1-module lora: the frozen adapter file [RUN/stage1/best/lora.safetensors]")))
    prompt_length: int = field(default=100, metadata=dict(help="soft prompt length p"))
    prompt_init: str = field(default="uniform", metadata=dict(help=(
        "stage 1 / joint / random-prompt initialisation: uniform (T5X prompt tuning's default, U[0, "
        "prompt-init-scale)), vocab (rows of the embedding table, sampled from the first 5000 ids), "
        "text (embeddings of --prompt-init-text, e.g. the class labels, one row per word, the rest "
        "sampled from the vocabulary), file (--prompt)")))
    prompt_init_scale: float = field(default=0.5, metadata=dict(help="upper bound of the uniform initialisation"))
    prompt_init_text: str = field(default="", metadata=dict(help=(
        "words for --prompt-init text, comma-separated [the task's label words]")))
    prompt: str = field(default="", metadata=dict(help=(
        "prompt file (prompt.safetensors or .npy): the frozen prompt of stage 2 [RUN/stage1/best/"
        "prompt.safetensors] or the initialisation for --prompt-init file")))
    dropout: float = field(default=0.1, metadata=dict(help="dropout rate (T5X fine-tuning default 0.1, paper App. B.4)"))
    label_smoothing: float = field(default=None, metadata=dict(help=(
        "label smoothing [stage 1: 0 (T5X prompt-tuning config); others: 0.1 (App. B.4)]")))
    z_loss: float = field(default=1e-4, metadata=dict(help=(
        "T5X's auxiliary loss z_loss * logsumexp(logits)^2 per target token, which keeps the "
        "softmax normaliser near 1 (Z_LOSS = 1e-4 in the T5X / prompt-tuning gin configs the paper ran); 0 turns it off")))
    weight_decay: float = field(default=None, metadata=dict(help=(
        "Adafactor weight decay, not scaled by lr [stage 1: 1e-5 (T5X prompt-tuning config); others: none]")))
    adafactor_step_offset: int = field(default=0, metadata=dict(help=(
        "Adafactor step_offset; T5X counts steps from the pretrained checkpoint's step, "
        "-1000000 reproduces that for a 1M-step checkpoint")))
    train_examples: int = field(default=None, metadata=dict(help=(
        "read only the first N training examples of each task (WMT14's 15.8M pairs need not all "
        "sit in memory for 1000 steps of 64) [all]")))
    shots: int = field(default=0, metadata=dict(help="k-shot demonstrations prepended to every training input (1 = the paper's '+1-shot')"))
    max_input_length: int = field(default=1024, metadata=dict(help="input tokens kept (EOS included), App. B.4"))
    max_target_length: int = field(default=256, metadata=dict(help="target tokens kept (EOS included)"))
    dtype: str = field(default="float32", metadata=dict(help=(
        "compute dtype: float32, or bfloat16 (bf16 forward/backward, fp32 master weights, "
        "fp32 gradient reduction)")))
    activation_checkpointing: bool = field(default=False, metadata=dict(help="recompute each encoder/decoder block in backward to save memory"))
    eval: bool = field(default=True, metadata=dict(help=(
        "score every checkpoint on the validation split (decode + metric) and keep the best "
        "(App. B.4); --no-eval keeps the last")))
    eval_split: str = field(default="validation", metadata=dict(help="split used to pick the best checkpoint"))
    eval_examples: int = field(default=None, metadata=dict(help="score only the first N validation examples [all]"))
    eval_batch_size: int = field(default=16, metadata=dict(help="examples per rank per decoding batch"))
    num_beams: int = field(default=4, metadata=dict(help="beam width when scoring (paper: 4)"))
    max_new_tokens: int = field(default=None, metadata=dict(help=(
        "longest decoded answer when scoring [evaluate.py's per-metric default]")))
    probe_every: int = field(default=0, metadata=dict(help=(
        "diagnostics (paper Fig. 1, 2): every N steps and at the start, score --probe-tasks k-shot "
        "without the prompt and record the share of answers in the fine-tuned task's label set, "
        "in RUN/diagnostics.jsonl [0: off]")))
    probe_tasks: str = field(default="", metadata=dict(help="comma-separated unseen tasks to probe, e.g. trivia_qa,wmt16_ende"))
    probe_shots: str = field(default="1", metadata=dict(help="comma-separated shot counts of the probes"))
    probe_limit: int = field(default=100, metadata=dict(help="examples per probe task (the first N of its evaluation split)"))
    align_steps: str = field(default="", metadata=dict(help=(
        "diagnostics (paper Fig. 3, 7): comma-separated steps at which to record cos(g, g_format), the "
        "gradient on a batch against the gradient on the same inputs with shuffled labels, e.g. 0,400")))
    align_every: int = field(default=0, metadata=dict(help="also record the gradient alignment every N steps [0: off]"))
    align_batch_size: int = field(default=32, metadata=dict(help="examples in the gradient-alignment batch"))
    diagnostics_strict: bool = field(default=False, metadata=dict(help=(
        "stop the run when a probe fails (by default it is logged and training continues)")))
    log_every: int = field(default=10, metadata=dict(help="print a progress line every N steps"))
    keep_checkpoints: int = field(default=1, metadata=dict(help="training checkpoints kept for --resume (best/ is kept apart)"))
    stop_after_step: int = field(default=None, metadata=dict(help=(
        "save and stop after this step, as if preempted (for time-limited jobs and tests)")))
    device: str = field(default="auto", metadata=dict(help="cpu, cuda or auto"))


CHOICES = {"stage": STAGES, "stage1_module": ("prompt", "lora"), "prompt_init": ("uniform", "vocab", "text", "file"), "dtype": ("float32", "bfloat16")}

# Settings that may change between a run and its --resume.
RESUMABLE_CHANGES = {"resume", "steps", "log_every", "stop_after_step", "eval_batch_size", "device",
                     "probe_every", "probe_tasks", "probe_shots", "probe_limit", "align_steps", "align_every",
                     "align_batch_size", "diagnostics_strict",
                     "keep_checkpoints"}


def stage_defaults(stage):
    if stage == "1":
        return dict(steps=5000, save_every=1000, lr=0.2, label_smoothing=0.0, weight_decay=1e-5)
    return dict(steps=1000, save_every=100, lr=1e-3, label_smoothing=0.1, weight_decay=None)


# The bundled tiny T5 and its synthetic suite (lab/): what runs when no model and data are given.
_LAB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lab")
LAB_DEFAULTS = {"model": os.path.join(_LAB, "tiny-t5"), "data_dir": os.path.join(_LAB, "data"),
                "task": "lab_owns", "out": os.path.join("runs", "lab")}


def parse_args(argv=None):
    """Command line -> Config. Every dataclass field is a flag; None defaults are stage-dependent."""
    p = argparse.ArgumentParser(
        prog="promot.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=("ProMoT training (Wang et al., ICLR 2024). Defaults reproduce App. B.4: "
                     "Adafactor, batch 64, inputs cut to 1024 tokens; stage 1: p=100 prompt, lr 0.2, "
                     "5000 steps, checkpoint every 1000; stage 2: lr 1e-3, dropout 0.1, label smoothing "
                     "0.1, 1000 steps, checkpoint every 100. Runs as one process or under torchrun "
                     "(FSDP2). Bracketed defaults depend on --stage."))
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        if f.type is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
            continue
        required = f.name == "stage"
        p.add_argument(flag, type=f.type, required=required, default=None if required else f.default,
                       choices=CHOICES.get(f.name), help=help_)
    args = p.parse_args(argv)
    if not args.model and not args.data_dir:
        # No model and no data: the miniature lab (lab/README), so a newcomer sees ProMoT run.
        for name, value in LAB_DEFAULTS.items():
            if not getattr(args, name):
                setattr(args, name, value)
        print(f"promot.py: no --model/--data-dir: the miniature lab ({args.model}, {args.data_dir}, "
              f"--task {args.task}, --out {args.out})", flush=True)
    missing = [f"--{n.replace('_', '-')}" for n in ("model", "data_dir", "task", "out") if not getattr(args, n)]
    if missing:
        p.error(f"the following arguments are required: {', '.join(missing)} "
                "(omit both --model and --data-dir to run the miniature lab)")
    cfg = Config(**vars(args))
    if cfg.stage == "1" and cfg.stage1_module == "lora" and cfg.lr is None:
        cfg.lr = 1e-3  # App. C.7 gives no LoRA rate; the prompt's 0.2 would swamp a rank-4 update
    for k, v in stage_defaults(cfg.stage).items():
        if getattr(cfg, k) is None:
            setattr(cfg, k, v)
    return cfg


class UsageError(Exception):
    """A setting or input the user can fix; printed as one line, nothing is overwritten."""


# ---------------------------------------------------------------------------
# Distributed setup and the FSDP2 wrapper
# ---------------------------------------------------------------------------

@dataclass
class Dist:
    """Where this process sits: rank, world size, device and (under torchrun) the device mesh."""
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    mesh: object = None

    @property
    def main(self):
        return self.rank == 0


def setup_distributed(device="auto"):
    """One process without torchrun; under torchrun, a process group and a 1-D mesh.

    gloo on CPU, nccl on GPUs. torchrun sets RANK/WORLD_SIZE/LOCAL_RANK (also
    across nodes: `torchrun --nnodes N --node_rank i --rdzv_endpoint host:port`).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dist(device=torch.device(device))
    from torch.distributed.device_mesh import init_device_mesh
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    mesh = init_device_mesh(dev.type, (dist.get_world_size(),))
    return Dist(dist.get_rank(), dist.get_world_size(), dev, mesh)


def shard_model(t5, mesh, bf16=False, activation_checkpointing=False):
    """FSDP2: shard every encoder/decoder block, then the root.

    The root unit holds what is left: the shared (tied) embedding with the
    lm_head when there is one, and the final norms, so the tied embedding is
    one unit and its gradient from both uses is summed before the
    reduce-scatter (torchtitan's lesson). bf16: parameters are cast to bf16
    for compute, gradients reduced in fp32, the sharded fp32 weights stay the
    master copy the optimizer updates.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # cast_forward_inputs=False: the model casts what it needs itself (the prompt to the
    # embedding dtype), and casting would copy the decoder's KV-cache dicts, so the
    # cache filled inside a block would be lost while decoding.
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32,
                              cast_forward_inputs=False)
    for block in list(t5.encoder.blocks) + list(t5.decoder.blocks):
        if activation_checkpointing:
            checkpoint_block(block)
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(t5, mesh=mesh, mp_policy=mp)
    return t5


def checkpoint_block(block):
    """Activation checkpointing: keep only the block input, recompute the rest in backward.

    The composable API hooks the module in place, so parameter names (and
    checkpoints) stay the same. Dropout masks are recomputed identically
    (the RNG state is saved with the input)."""
    from torch.distributed._composable import checkpoint
    checkpoint(block)


@torch.no_grad()
def load_sharded(t5, path, dtype=torch.float32, extra=None):
    """Fill an FSDP-sharded model from a checkpoint directory.

    Every rank streams the file one tensor at a time and keeps only its own
    shard (distribute_tensor with src_data_rank=None slices locally, no
    communication), so peak memory is one shard of the model plus one full
    tensor in flight.
    """
    expected = dict(t5.named_parameters())
    loaded, head, embedding = set(), None, None
    extra = ((name, tensor, "LoRA adapters") for name, tensor in (extra or {}).items())
    for name, tensor, file in itertools.chain(model_lib.checkpoint_tensors(path), extra):
        if name == "lm_head.weight" and t5.lm_head is None:
            head = tensor  # tied: an alias of the embedding, checked below
            continue
        if name == "shared.weight" and t5.lm_head is None:
            embedding = tensor
        if name not in expected:
            raise model_lib.CheckpointError(f"{file}: unexpected tensor {name!r} for this config")
        if name in loaded:
            continue
        param = expected[name]
        if tuple(tensor.shape) != tuple(param.shape):
            raise model_lib.CheckpointError(f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}; "
                                            f"config.json implies {tuple(param.shape)}")
        tensor = tensor.to(dtype=param.dtype)
        if _is_dtensor(param):
            shard = distribute_tensor(tensor, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(shard.to_local())
        else:
            param.data.copy_(tensor)
        loaded.add(name)
    missing = sorted(set(expected) - loaded)
    if missing:
        raise model_lib.CheckpointError(f"{path}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
    if head is not None and embedding is not None and not torch.equal(head, embedding):
        # transformers 5 writes tie_word_embeddings=true even for untied models;
        # model.load_pretrained follows the tensors, the sharded model is built from the config.
        raise model_lib.CheckpointError(
            f"{path}/config.json says tie_word_embeddings (or omits it) but lm_head.weight differs from the "
            "embedding; set \"tie_word_embeddings\": false in config.json")


def load_model(cfg, ctx, lora=None):
    """The pretrained model, on this device, sharded under torchrun, with the run's dropout.

    lora = (tensors or None, {"rank", "alpha", "targets"}) attaches LoRA adapters before
    sharding, so FSDP shards them with their layer; None tensors means fresh ones
    (seeded by --seed, the same on every rank)."""
    config = model_lib.T5Config.from_json(os.path.join(cfg.model, "config.json"))
    bf16 = cfg.dtype == "bfloat16"

    def attach_lora(t5):
        tensors, info = lora
        model_lib.add_lora(t5, info["rank"], info["alpha"], info["targets"])
        if tensors is None:
            tensors = model_lib.init_lora_tensors(t5, torch.Generator().manual_seed(cfg.seed))
        model_lib.check_lora_tensors(t5, tensors, cfg.lora or "the stage-1 adapters")
        return tensors

    if ctx.world == 1:
        t5 = model_lib.load_pretrained(cfg.model, dtype=torch.float32, device=ctx.device)
        if lora is not None:
            with torch.no_grad():
                for name, tensor in attach_lora(t5).items():
                    t5.get_parameter(name).copy_(tensor)
        if cfg.activation_checkpointing:
            for block in list(t5.encoder.blocks) + list(t5.decoder.blocks):
                checkpoint_block(block)
    else:
        t5 = model_lib.build(config, "meta")
        adapters = attach_lora(t5) if lora is not None else None
        shard_model(t5, ctx.mesh, bf16=bf16, activation_checkpointing=cfg.activation_checkpointing)
        t5.to_empty(device=ctx.device)
        load_sharded(t5, cfg.model, extra=adapters)
    set_dropout(t5, cfg.dropout)
    return t5


def set_dropout(t5, rate):
    """The run's dropout rate everywhere: nn.Dropout modules and the attention-probability
    dropout that model.Attention passes to scaled_dot_product_attention as a float."""
    for module in t5.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = rate
        elif isinstance(getattr(module, "dropout", None), float):
            module.dropout = rate


@contextlib.contextmanager
def unsharded(t5):
    """Inside: every rank holds the full weights and runs forward passes on its own.

    Decoding lengths differ between ranks (beam search stops when its beams
    finish), so the per-layer all-gathers of FSDP would not line up; gathering
    once and keeping the weights gathered avoids that. Costs the full model's
    memory on each rank for the duration (26 GB for mT5-XXL in bf16)."""
    fsdp_modules = [m for m in t5.modules() if hasattr(m, "unshard") and hasattr(m, "reshard")]
    if not fsdp_modules:
        yield
        return
    for m in fsdp_modules:
        m.unshard()
        m.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for m in fsdp_modules:
            m.set_reshard_after_forward(True, recurse=False)
            m.reshard()
        # FSDP records the order of forward calls to prefetch in backward; decoding
        # made a different number of calls on each rank, so forget it, or the next
        # backward's all-gathers and reduce-scatters would pair up wrongly (a hang).
        t5.reset_iter_state()


def full_state_dict(t5, ctx):
    """Full fp32 tensors on CPU (on rank 0 under FSDP; every rank gets {} but rank 0)."""
    if ctx.world == 1:
        return {n: t.detach().cpu() for n, t in t5.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(t5, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ---------------------------------------------------------------------------
# Soft prompts
# ---------------------------------------------------------------------------

def embedding_rows(model_dir):
    """The input embedding table, read from the checkpoint (independent of sharding)."""
    for name, tensor, _ in model_lib.checkpoint_tensors(model_dir):
        if name == "shared.weight":
            return tensor.float()
    raise model_lib.CheckpointError(f"{model_dir}: no shared (input embedding) tensor")


def init_prompt(cfg, d_model, tokenizer, task, generator):
    """A (p, d_model) fp32 prompt, initialised as the prompt-tuning code base does.

    uniform: flax `initializers.uniform(0.5)`, i.e. U[0, 0.5) (prompt-tuning's
    t5_1_1_prompt.gin); vocab: rows of the embedding table sampled from the
    5000 most frequent pieces (SentencePiece ids are frequency-ordered); text:
    one row per word of the text (the mean of its pieces' embeddings, like
    prompt-tuning's `from_class_labels`), the rest sampled from the vocabulary.
    """
    p = cfg.prompt_length
    if cfg.prompt_init == "uniform":
        return torch.rand(p, d_model, generator=generator) * cfg.prompt_init_scale
    if cfg.prompt_init == "file":
        return read_prompt_file(cfg.prompt, task.name, p, d_model)
    table = embedding_rows(cfg.model)
    population = min(5000, table.shape[0])
    rows = table[torch.randint(0, population, (p,), generator=generator)]
    if cfg.prompt_init == "text":
        words = [w.strip() for w in cfg.prompt_init_text.split(",") if w.strip()] if cfg.prompt_init_text \
            else list(task.label_words or ())
        if not words:
            raise UsageError(f"--prompt-init text: task {task.name!r} has no label words; pass --prompt-init-text")
        if len(words) > p:
            raise UsageError(f"--prompt-init-text has {len(words)} words, more than --prompt-length {p}")
        for i, w in enumerate(words):
            ids = [t for t in tokenizer.encode(w) if t != 1]  # without EOS
            rows[i] = table[ids].mean(0)
    return rows.clone()


def read_prompt_file(path, task_name, p=None, d_model=None):
    """A prompt from prompt.safetensors (key 'prompt' or 'prompt.<task>') or a .npy file (T5X's format)."""
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such prompt file")
    if path.endswith(".npy"):
        import numpy as np
        prompt = torch.from_numpy(np.load(path)).float()
    else:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as e:
            raise UsageError(f"{path}: cannot read as safetensors ({e})") from None
        key = f"prompt.{task_name}" if f"prompt.{task_name}" in tensors else "prompt"
        if key not in tensors:
            raise UsageError(f"{path}: no tensor 'prompt' or 'prompt.{task_name}'; found {sorted(tensors)}")
        prompt = tensors[key].float()
    if prompt.dim() != 2 or (d_model is not None and prompt.shape[1] != d_model):
        raise UsageError(f"{path}: prompt has shape {tuple(prompt.shape)}; the model needs (p, {d_model}) "
                         f"(d_model = {d_model})")
    if p is not None and prompt.shape[0] != p:
        raise UsageError(f"{path}: prompt has length {prompt.shape[0]}; --prompt-length is {p}")
    return prompt


def save_prompts(prompts, path):
    """prompt.safetensors: 'prompt' for one task, plus 'prompt.<task>' for each task."""
    from safetensors.torch import save_file
    tensors = {f"prompt.{name}": t.detach().float().cpu().contiguous() for name, t in prompts.items()}
    if len(prompts) == 1:
        tensors["prompt"] = next(iter(tensors.values())).clone()
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"tasks": ",".join(prompts)})
    os.replace(tmp, path)


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

def global_batch(mixture, tasks, train_sets, tokenizer, cfg, ctx, truncation):
    """This rank's (task index, input text, target text) rows of the next global batch.

    Every rank draws the whole global batch from the same data.Mixture (equal
    task shares, a seeded permutation per epoch) and keeps its slice, so one
    process and N ranks train on the same examples, and the mixture's
    state_dict is the data position a checkpoint stores.
    """
    drawn = mixture.take(cfg.batch_size)
    per_rank = cfg.batch_size // ctx.world
    mine = drawn[ctx.rank * per_rank:(ctx.rank + 1) * per_rank]
    index = {t.name: i for i, t in enumerate(tasks)}
    rows = []
    for name, example in mine:
        t = index[name]
        # "+1-shot" (paper 5.3): a demonstration from the training set, never the example itself.
        # Inputs longer than --max-input-length lose demonstrations first, then the end of the
        # query's longest field (App. B.4 cuts articles), so the template and the answer
        # sentinel stay, exactly as evaluate.score_task builds its inputs.
        (text, target), = data.training_pairs(tasks[t], [example], shots=cfg.shots, pool=train_sets[t],
                                              seed=cfg.seed, tokenizer=tokenizer,
                                              max_input_tokens=cfg.max_input_length, stats=truncation,
                                              warn=lambda message: None)
        rows.append((t, text, target))
    return rows


def truncate(ids, max_len, eos_id=1):
    """Cut to max_len tokens, keeping the final EOS (seqio's append_eos_after_trim).
    Inputs already fit (data.fit_input); this bounds the targets."""
    return ids if len(ids) <= max_len else ids[: max_len - 1] + [eos_id]


def make_batch(rows, tokenizer, cfg, device):
    """Tokenized tensors for (task, input, target) rows: ids, mask, labels (-100 = ignored), tasks."""
    inputs = [truncate(tokenizer.encode(x), cfg.max_input_length) for _, x, _ in rows]
    targets = [truncate(tokenizer.encode(y), cfg.max_target_length) for _, _, y in rows]
    ids, mask = data.pad_batch(inputs, pad_id=0)
    labels, _ = data.pad_batch(targets, pad_id=-100)
    return dict(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device),
                tasks=[t for t, _, _ in rows])


# ---------------------------------------------------------------------------
# Checking the inputs before anything is written
# ---------------------------------------------------------------------------

def check_inputs(cfg, ctx):
    """Everything a user can get wrong, checked up front: one clear message, nothing written."""
    for name in ("steps", "batch_size", "save_every", "prompt_length", "log_every", "keep_checkpoints"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if not os.path.isdir(cfg.model):
        raise UsageError(f"--model {cfg.model}: no such checkpoint directory")
    if not os.path.isfile(os.path.join(cfg.model, "config.json")):
        raise UsageError(f"--model {cfg.model}: no config.json; expected a Hugging Face T5/mT5 checkpoint directory")
    if not os.path.isfile(os.path.join(cfg.model, "spiece.model")):
        raise UsageError(f"--model {cfg.model}: no spiece.model (the SentencePiece vocabulary) beside the weights")
    if not os.path.isdir(cfg.data_dir):
        raise UsageError(f"--data-dir {cfg.data_dir}: no such directory")
    if cfg.batch_size % ctx.world:
        raise UsageError(f"--batch-size {cfg.batch_size} is not divisible by the {ctx.world} ranks")
    per_rank = cfg.batch_size // ctx.world
    micro = cfg.micro_batch_size or per_rank
    if micro < 1 or per_rank % micro:
        raise UsageError(f"--micro-batch-size {micro} does not divide the {per_rank} examples each rank "
                         f"gets per step (--batch-size {cfg.batch_size} / {ctx.world} ranks)")
    if cfg.prompt_init == "file" and not cfg.prompt and cfg.stage in ("1", "joint", "random-prompt"):
        raise UsageError("--prompt-init file needs --prompt FILE")
    config = model_lib.T5Config.from_json(os.path.join(cfg.model, "config.json"))
    tokenizer = data.Tokenizer(os.path.join(cfg.model, "spiece.model"))
    tokenizer.check_fits(config.vocab_size)
    names = [t.strip() for t in cfg.task.split(",") if t.strip()]
    if not names or len(set(names)) != len(names):
        raise UsageError(f"--task {cfg.task!r}: expected one task name or distinct comma-separated names")
    tasks = [data.get_task(n, cfg.data_dir) for n in names]
    train_sets = [data.load_split(t, cfg.data_dir, "train", limit=cfg.train_examples) for t in tasks]
    for t, s in zip(tasks, train_sets):
        if not s:
            raise UsageError(f"task {t.name}: the train split in {cfg.data_dir} is empty")
    val_sets = [data.load_split(t, cfg.data_dir, cfg.eval_split) for t in tasks] if cfg.eval else None

    lora = None
    if cfg.stage1_module == "lora":
        if cfg.stage not in ("1", "2"):
            raise UsageError(f"--stage1-module lora belongs to ProMoT's two stages (--stage 1 or 2), not --stage {cfg.stage}")
        if cfg.stage == "1":
            targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
            if cfg.lora_rank < 1:
                raise UsageError(f"--lora-rank must be a positive integer, got {cfg.lora_rank}")
            unknown = [t for t in targets if t not in model_lib.LORA_TARGETS]
            if unknown or not targets:
                raise UsageError(f"--lora-targets {cfg.lora_targets!r}: unknown {unknown or targets}; "
                                 f"choose from {','.join(model_lib.LORA_TARGETS)}")
            lora = (None, {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "targets": targets})
        else:
            path = cfg.lora or os.path.join(cfg.out, "stage1", "best", "lora.safetensors")
            if not os.path.isfile(path):
                raise UsageError(f"--stage 2 --stage1-module lora needs stage-1 adapters: none at {path}; run "
                                 "--stage 1 --stage1-module lora with the same --out first, or pass --lora FILE")
            lora = model_lib.read_lora(path, config.d_model)

    prompt_file = None
    if cfg.stage == "2" and cfg.stage1_module == "prompt":
        prompt_file = cfg.prompt or os.path.join(cfg.out, "stage1", "best", "prompt.safetensors")
        if not os.path.isfile(prompt_file):
            raise UsageError(f"--stage 2 needs a stage-1 prompt: none at {prompt_file}; run --stage 1 "
                             "with the same --out first, or pass --prompt FILE")
    if prompt_file or cfg.prompt_init == "file" and cfg.stage in ("1", "joint", "random-prompt"):
        for t in tasks:  # width and length
            read_prompt_file(prompt_file or cfg.prompt, t.name, cfg.prompt_length, config.d_model)

    stage_dir = os.path.join(cfg.out, STAGE_DIRS[cfg.stage])
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise UsageError(f"--out {cfg.out} exists and is not a directory")
    run_config = os.path.join(cfg.out, "config.json")
    if os.path.isdir(cfg.out) and os.listdir(cfg.out) and not os.path.isfile(run_config):
        raise UsageError(f"--out {cfg.out} is not empty and holds no promot run (no config.json); "
                         "choose a new folder")
    if os.path.isdir(stage_dir) and os.listdir(stage_dir) and not cfg.resume:
        raise UsageError(f"--out {cfg.out} already holds a {STAGE_DIRS[cfg.stage]} run ({stage_dir}); pass "
                         "--resume to continue it, or choose a new --out (nothing was overwritten)")
    if cfg.resume and os.path.isfile(run_config):
        with open(run_config, encoding="utf-8") as f:
            saved = json.load(f).get(STAGE_DIRS[cfg.stage])
        if saved is not None:
            now = asdict(cfg)
            diffs = [f"--{k.replace('_', '-')}: saved {saved.get(k)!r}, now {now[k]!r}"
                     for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]]
            if saved.get("world_size", ctx.world) != ctx.world:
                # each rank's RNG state (dropout) and data slice are saved per rank
                diffs.append(f"ranks: saved {saved.get('world_size')}, now {ctx.world}")
            if diffs:
                raise UsageError(f"--resume: {run_config} was written by another configuration: "
                                 + "; ".join(diffs))
    return dict(config=config, tokenizer=tokenizer, tasks=tasks, train_sets=train_sets,
                val_sets=val_sets, prompt_file=prompt_file, stage_dir=stage_dir, lora=lora)


# ---------------------------------------------------------------------------
# Checkpoints: atomic, with everything needed to continue bit for bit
# ---------------------------------------------------------------------------

def rng_state(ctx):
    state = {"cpu": torch.get_rng_state()}
    if ctx.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(ctx.device)
    return state


def set_rng_state(state, ctx):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], ctx.device)


def barrier(ctx):
    if ctx.world > 1:
        dist.barrier()


def training_state(t5, prompts, optimizer, model_trains):
    """What a checkpoint holds; tensors are the live ones, so loading fills them in place."""
    state = {"prompts": {n: p.detach() for n, p in prompts.items()}, "optimizer": optimizer.state_dict()}
    if model_trains:
        state["model"] = t5.state_dict()
    elif model_lib.lora_info(t5) is not None:  # stage 1 with LoRA: the adapters are what trains
        state["model"] = {n: t for n, t in t5.state_dict().items() if ".lora." in n}
    return state


def save_checkpoint(stage_dir, step, state, trainer, ctx, keep):
    """Write checkpoints/step_N.tmp, then rename it: a checkpoint exists whole or not at all.

    torch.distributed.checkpoint writes each rank's shards in parallel (and
    runs as one process without torchrun); rank r adds its RNG state; rank 0
    adds trainer.json (step, data position, best score so far)."""
    import torch.distributed.checkpoint as dcp
    root = os.path.join(stage_dir, "checkpoints")
    final = os.path.join(root, f"step_{step:07d}")
    tmp = final + ".tmp"
    if ctx.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier(ctx)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
        dcp.save(state, checkpoint_id=tmp)
    torch.save(rng_state(ctx), os.path.join(tmp, f"rng_rank{ctx.rank}.pt"))
    if ctx.main:
        with open(os.path.join(tmp, "trainer.json"), "w", encoding="utf-8") as f:
            json.dump(trainer, f, indent=2)
    barrier(ctx)
    if ctx.main:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp"))[:-keep]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    barrier(ctx)
    return final


def latest_checkpoint(stage_dir):
    root = os.path.join(stage_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    done = sorted(d for d in os.listdir(root)
                  if d.startswith("step_") and not d.endswith(".tmp")
                  and os.path.isfile(os.path.join(root, d, "trainer.json")))
    return os.path.join(root, done[-1]) if done else None


def load_checkpoint(path, state, optimizer, ctx):
    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(state, checkpoint_id=path)
    optimizer.load_state_dict(state["optimizer"])
    rng_file = os.path.join(path, f"rng_rank{ctx.rank}.pt")
    set_rng_state(torch.load(rng_file, weights_only=True), ctx)
    with open(os.path.join(path, "trainer.json"), encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------
# Scoring a checkpoint (App. B.4: keep the one with the best validation metric)
# ---------------------------------------------------------------------------

@torch.no_grad()
def validation_scores(t5, prompts, cfg, ctx, tasks, val_sets, train_sets, tokenizer):
    """{task: metric} on the validation split through evaluate.score_task: the paper's
    decoding (beam 4), post-processing (App. B.2) and metric. Under FSDP the weights
    are gathered for the duration and each rank decodes a share of the batches."""
    scores = {}
    autocast = torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16" and ctx.world == 1)
    with unsharded(t5), autocast:
        for task, examples, pool in zip(tasks, val_sets, train_sets):
            examples = examples[: cfg.eval_examples] if cfg.eval_examples else examples
            result = evaluate.score_task(
                t5, tokenizer, task, examples, pool=pool, shots=cfg.shots, prompt=prompts.get(task.name),
                num_beams=cfg.num_beams, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size,
                seed=cfg.seed, max_input_tokens=cfg.max_input_length, distributed=ctx.world > 1)
            scores[task.name] = float(result["score"])
    return scores


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------

class Diverged(RuntimeError):
    pass


_STOP = {"requested": False}


def _on_sigterm(signum, frame):
    _STOP["requested"] = True  # acted on at the end of the current step


def fmt_time(seconds):
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def export(dir_, t5, prompts, cfg, ctx, model_trains):
    """A directory evaluate.py and transformers read: model (public layout) + prompt + spiece."""
    sd = full_state_dict(t5, ctx) if model_trains else None
    lora = None
    if model_lib.lora_info(t5) is not None:  # full adapter tensors (a collective under FSDP)
        lora = {n: (p.full_tensor() if _is_dtensor(p) else p).detach().cpu()
                for n, p in t5.named_parameters() if ".lora." in n}
    if ctx.main:
        os.makedirs(os.path.dirname(os.path.abspath(dir_)), exist_ok=True)
        if model_trains:
            model_lib.save_pretrained(t5, dir_, state_dict=sd)
            shutil.copy2(os.path.join(cfg.model, "spiece.model"), os.path.join(dir_, "spiece.model"))
        else:
            os.makedirs(dir_, exist_ok=True)
        if prompts:
            save_prompts(prompts, os.path.join(dir_, "prompt.safetensors"))
        if lora is not None:
            model_lib.save_lora(t5, os.path.join(dir_, "lora.safetensors"), state_dict=lora)
    barrier(ctx)


def make_diagnostics(cfg, ctx, stage_name, tokenizer, tasks):
    """diagnostics.TrainingDiagnostics for the --probe-* / --align-* flags, or None."""
    def numbers(text, flag):
        try:
            return [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--{flag} {text!r}: expected comma-separated integers") from None
    probe_tasks = [t.strip() for t in cfg.probe_tasks.split(",") if t.strip()]
    align_steps = numbers(cfg.align_steps, "align-steps")
    if not ((cfg.probe_every and probe_tasks) or align_steps or cfg.align_every):
        if cfg.probe_every and not probe_tasks:
            raise UsageError("--probe-every needs --probe-tasks (comma-separated unseen tasks)")
        return None
    if (align_steps or cfg.align_every) and cfg.stage == "1":
        raise UsageError("--align-steps/--align-every measure the model's gradient; stage 1 trains only the prompt")
    if (align_steps or cfg.align_every) and len(tasks) > 1:
        raise UsageError("--align-steps/--align-every need a single --task (its labels are shuffled)")
    try:
        return diagnostics.TrainingDiagnostics(
            cfg.out, stage_name, tokenizer, cfg.data_dir, tasks[0].name, probe_tasks=probe_tasks,
            probe_every=cfg.probe_every, probe_shots=numbers(cfg.probe_shots, "probe-shots"),
            probe_limit=cfg.probe_limit, align_steps=align_steps, align_every=cfg.align_every,
            align_batch_size=cfg.align_batch_size, seed=cfg.seed, num_beams=cfg.num_beams,
            strict=cfg.diagnostics_strict)
    except diagnostics.DiagnosticsError as e:
        raise UsageError(str(e)) from None


def train_step(t5, batches, prompts, tasks, optimizer, cfg, ctx):
    """One optimizer step on this rank's micro-batches; returns (mean loss, tokens) of the global batch.

    The loss is the token cross-entropy (plus T5X's z-loss) summed over the
    global batch divided by its token count, so 1 process and N ranks (and any micro-batching) take the
    same step. A non-finite loss returns before the update, leaving the weights
    as they were.
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
            prompt = (prompts[tasks[0].name] if len(tasks) == 1
                      else torch.stack([prompts[tasks[t].name] for t in b["tasks"]]))
        # one process: autocast; under FSDP the MixedPrecisionPolicy casts instead
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16,
                            enabled=cfg.dtype == "bfloat16" and ctx.world == 1):
            logits = t5(b["input_ids"], b["attention_mask"], model_lib.shift_right(b["labels"]), prompt=prompt)
        loss, _ = model_lib.cross_entropy(logits, b["labels"], cfg.label_smoothing)
        if cfg.z_loss:
            log_z = torch.logsumexp(logits.float(), dim=-1)
            loss = loss + cfg.z_loss * (log_z.square() * (b["labels"] != -100)).sum()
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


@dataclass
class Run:
    """What `train` hands back (tests and notebooks inspect the live model and prompts)."""
    code: int
    step: int
    model: object
    prompts: dict
    best: dict


def train(cfg):
    """Run one stage as `cfg` says; returns a Run. The command line is `main`."""
    ctx = setup_distributed(cfg.device)
    inputs = check_inputs(cfg, ctx)
    tasks, train_sets, val_sets = inputs["tasks"], inputs["train_sets"], inputs["val_sets"]
    tokenizer, stage_dir, d_model = inputs["tokenizer"], inputs["stage_dir"], inputs["config"].d_model
    stage_name = STAGE_DIRS[cfg.stage]
    diag = make_diagnostics(cfg, ctx, stage_name, tokenizer, tasks)  # checked before anything is written
    barrier(ctx)  # every rank has checked --out before rank 0 writes into it

    # -- the run folder: config.json gathers every stage's settings
    if ctx.main:
        os.makedirs(stage_dir, exist_ok=True)
        run_config = os.path.join(cfg.out, "config.json")
        saved = json.load(open(run_config, encoding="utf-8")) if os.path.isfile(run_config) else {}
        saved[stage_name] = {**asdict(cfg), "world_size": ctx.world}
        with open(run_config + ".tmp", "w", encoding="utf-8") as f:
            json.dump(saved, f, indent=2)
        os.replace(run_config + ".tmp", run_config)
    log_path = os.path.join(cfg.out, "log.jsonl")

    def log(record, line=None):
        if ctx.main:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"stage": stage_name, **record}) + "\n")
            if line:
                print(line, flush=True)

    # -- model and prompts
    torch.manual_seed(cfg.seed + ctx.rank)  # dropout masks differ across ranks
    t5 = load_model(cfg, ctx, inputs["lora"])
    model_trains = cfg.stage != "1"
    lora_trains = cfg.stage == "1" and cfg.stage1_module == "lora"
    prompt_trains = cfg.stage in ("1", "joint") and not lora_trains
    if cfg.stage == "finetune" or cfg.stage1_module == "lora":
        prompts = {}
    elif cfg.stage == "2":
        prompts = {t.name: read_prompt_file(inputs["prompt_file"], t.name, cfg.prompt_length, d_model) for t in tasks}
    else:
        g = torch.Generator().manual_seed(cfg.seed)  # the same on every rank: prompts are replicated
        prompts = {t.name: init_prompt(cfg, d_model, tokenizer, t, g) for t in tasks}
    prompts = {n: torch.nn.Parameter(p.to(ctx.device), requires_grad=prompt_trains) for n, p in prompts.items()}
    for name, p in t5.named_parameters():
        p.requires_grad_(lora_trains if ".lora." in name else model_trains)  # stage-2 adapters stay frozen
    t5.train()

    groups = []
    if lora_trains:  # like the prompt: B starts at 0, so a parameter-scaled step would be ~0
        groups.append(dict(params=[p for p in t5.parameters() if p.requires_grad], multiply_by_parameter_scale=False))
    if prompt_trains:
        # prompt-tuning's config: no parameter-scale multiplier on the prompt
        groups.append(dict(params=list(prompts.values()), multiply_by_parameter_scale=False))
    if model_trains:
        groups.append(dict(params=[p for p in t5.parameters() if p.requires_grad], multiply_by_parameter_scale=True))
    optimizer = Adafactor(groups, lr=cfg.lr, weight_decay_rate=cfg.weight_decay or None,
                          step_offset=cfg.adafactor_step_offset)
    optimizer.init_state()

    # -- resume
    start_step, best = 0, {"step": None, "score": None, "scores": None, "evaluated": []}
    mixture = data.Mixture({t.name: s for t, s in zip(tasks, train_sets)}, seed=cfg.seed)
    best_path = os.path.join(stage_dir, "best.json")
    ckpt = latest_checkpoint(stage_dir) if cfg.resume else None
    if cfg.resume and ckpt is None and ctx.main:
        print(f"--resume: no checkpoint in {stage_dir}/checkpoints yet; starting from step 0", flush=True)
    if ckpt is not None:
        state = training_state(t5, prompts, optimizer, model_trains)
        trainer = load_checkpoint(ckpt, state, optimizer, ctx)
        start_step = trainer["step"]
        mixture.load_state_dict(trainer["data_position"])
        if os.path.isfile(best_path):
            best = json.load(open(best_path, encoding="utf-8"))
        log({"event": "resume", "step": start_step, "checkpoint": ckpt},
            f"resumed from {ckpt} (step {start_step})")

    def score_and_keep_best(step):
        if not cfg.eval or step in best["evaluated"]:
            return
        with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
            scores = validation_scores(t5, prompts, cfg, ctx, tasks, val_sets, train_sets, tokenizer)
        score = sum(scores.values()) / len(scores)
        improved = best["score"] is None or score > best["score"]
        if improved:
            export(os.path.join(stage_dir, "best"), t5, prompts, cfg, ctx, model_trains)
            best.update(step=step, score=score, scores=scores)
        best["evaluated"].append(step)
        if ctx.main:
            with open(best_path + ".tmp", "w", encoding="utf-8") as f:
                json.dump(best, f, indent=2)
            os.replace(best_path + ".tmp", best_path)
        log({"event": "eval", "step": step, "split": cfg.eval_split, "scores": scores, "score": score,
             "best_step": best["step"]},
            f"eval step {step}: {cfg.eval_split} " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items())
            + (" (best so far)" if improved else f" (best: step {best['step']}, {best['score']:.2f})"))

    if ckpt is not None and start_step % cfg.save_every == 0:
        score_and_keep_best(start_step)  # in case the run stopped between saving and scoring

    # -- the paper's §3 diagnostics (they never change the training trajectory)
    if diag is not None and start_step == 0:
        diag.run(0, t5, prompts, unsharded)

    # -- the loop
    truncation = data.TruncationStats()
    per_rank = cfg.batch_size // ctx.world
    micro = cfg.micro_batch_size or per_rank
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    window_time, window_tokens, run_start, train_time = 0.0, 0, time.time(), 0.0
    if ctx.main:
        n_train = sum(p.numel() for g in groups for p in g["params"])
        print(f"{stage_name}: {cfg.steps} steps of {cfg.batch_size} examples on {ctx.world} rank(s) "
              f"({ctx.device.type}), {n_train:,} trainable parameters, lr {cfg.lr}", flush=True)
    step = start_step
    try:
        while step < cfg.steps:
            step_start = time.time()
            rows = global_batch(mixture, tasks, train_sets, tokenizer, cfg, ctx, truncation)
            batches = [make_batch(rows[i:i + micro], tokenizer, cfg, ctx.device) for i in range(0, per_rank, micro)]
            loss, global_tokens = train_step(t5, batches, prompts, tasks, optimizer, cfg, ctx)
            if not math.isfinite(loss):
                last = latest_checkpoint(stage_dir)
                raise Diverged(f"loss is {loss} at step {step + 1}; stopped without updating. The last good "
                               f"checkpoint is {last or 'none (no checkpoint saved yet)'}; try a lower --lr or "
                               "--dtype float32, then continue with --resume")
            step += 1
            if diag is not None:
                diag.run(step, t5, prompts, unsharded)
            window_tokens += global_tokens
            elapsed = time.time() - step_start
            window_time += elapsed
            train_time += elapsed

            if step % cfg.log_every == 0 or step == cfg.steps:
                tps = window_tokens / max(window_time, 1e-9)
                eta = train_time / (step - start_step) * (cfg.steps - step)  # training time only
                log({"step": step, "loss": loss, "lr": cfg.lr, "tokens_per_s": tps,
                     "elapsed_s": time.time() - run_start},
                    f"{stage_name} step {step}/{cfg.steps} | loss {loss:.4f} | lr {cfg.lr:.2e} | "
                    f"{tps:,.0f} tok/s | ETA {fmt_time(eta)}")
                window_time, window_tokens = 0.0, 0

            stop = torch.tensor([1.0 if _STOP["requested"] else 0.0], device=ctx.device)
            if ctx.world > 1:
                dist.all_reduce(stop, op=dist.ReduceOp.MAX)
            stop = bool(stop.item()) or step == cfg.stop_after_step
            if step % cfg.save_every == 0 or step == cfg.steps or stop:
                path = save_checkpoint(stage_dir, step, training_state(t5, prompts, optimizer, model_trains),
                                       {"step": step, "examples_seen": step * cfg.batch_size, "world_size": ctx.world,
                                        "data_position": mixture.state_dict()},
                                       ctx, cfg.keep_checkpoints)
                log({"event": "checkpoint", "step": step, "path": path})
                if step % cfg.save_every == 0 or step == cfg.steps:
                    score_and_keep_best(step)
            if stop and step < cfg.steps:
                why = "SIGTERM" if _STOP["requested"] else f"--stop-after-step {cfg.stop_after_step}"
                log({"event": "stopped", "step": step, "reason": why},
                    f"stopped at step {step} ({why}); checkpoint saved. Continue with the same command plus --resume")
                return Run(0, step, t5, prompts, best)
    finally:
        signal.signal(signal.SIGTERM, previous)

    # -- the end: final weights/prompt in the public layout; best/ is the selected checkpoint
    export(os.path.join(stage_dir, "final"), t5, prompts, cfg, ctx, model_trains)
    if not cfg.eval:
        if ctx.main:
            shutil.rmtree(os.path.join(stage_dir, "best"), ignore_errors=True)
            shutil.copytree(os.path.join(stage_dir, "final"), os.path.join(stage_dir, "best"))
        barrier(ctx)
    summary = (f"done: {stage_dir}/final" + (f"; best checkpoint step {best['step']} ({best['score']:.2f}) in "
                                              f"{stage_dir}/best" if best["step"] is not None else ""))
    log({"event": "done", "step": step, "best_step": best["step"], "best_score": best["score"]}, summary)
    return Run(0, step, t5, prompts, best)


def main(argv=None):
    cfg = parse_args(argv)
    try:
        code = train(cfg).code
    except (UsageError, model_lib.CheckpointError, data.DataError) as e:
        if not dist.is_initialized() or dist.get_rank() == 0:  # every rank found the same problem
            print(f"promot.py: error: {e}", file=sys.stderr)
        code = 2
    except Diverged as e:
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"promot.py: {e}", file=sys.stderr)
        code = 1
    if dist.is_initialized():
        dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
