"""FSDP2 for an encoder-decoder: process setup, sharding, per-rank loading, gathering.

A leaf of promot (it imports only torch): copy it alone into another codebase.
The idea is PyTorch's FSDP2 example in three lines, build on the meta device,
`fully_shard` every block and then the root, materialize:

    model = build(config, "meta")
    shard_model(model, mesh, blocks)         # every block, then the root
    model.to_empty(device=device)            # then fill each shard, see copy_into_shard

The rest is what a trainer needs around it: where this process sits
(`setup_distributed`), filling shards from full tensors streamed off disk
(`copy_into_shard`), full weights on every rank while decoding (`unsharded`)
and full tensors for saving (`full_state_dict`, `full_tensor`).
"""

import contextlib
import datetime
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor


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


def dist_timeout_minutes():
    """$PROMOT_DIST_TIMEOUT_MINUTES (a number > 0), else 30; ValueError naming it."""
    text = os.environ.get("PROMOT_DIST_TIMEOUT_MINUTES", "30")
    try:
        minutes = float(text)
    except ValueError:
        minutes = math.nan
    if not 0 < minutes < math.inf:
        raise ValueError(f"PROMOT_DIST_TIMEOUT_MINUTES={text!r}: expected a number of minutes > 0")
    return minutes


def setup_distributed(device="auto", timeout_minutes=None):
    """One process without torchrun; under torchrun, a process group and a 1-D mesh.

    gloo on CPU, nccl on GPUs. torchrun sets RANK/WORLD_SIZE/LOCAL_RANK (also
    across nodes: `torchrun --nnodes N --node_rank i --rdzv_endpoint host:port`).
    A collective that waits `timeout_minutes` (None: $PROMOT_DIST_TIMEOUT_MINUTES, else 30) for
    a stuck or dead rank raises (see `main`), so one stopped rank ends the job in bounded time
    instead of hanging it.
    """
    if timeout_minutes is None:
        timeout_minutes = dist_timeout_minutes()
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
        timeout = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timeout)
    mesh = init_device_mesh(dev.type, (dist.get_world_size(),))
    return Dist(dist.get_rank(), dist.get_world_size(), dev, mesh)


def main(prog, work, errors):
    """Run `work()` as a command's main; returns its exit code. `errors` maps exception types
    to exit codes (the user's errors: 2): each becomes one line, printed once (rank 0, all ranks
    agree), and torchrun's report of the failed rank names that line (its error file) instead
    of pointing to a traceback. Ctrl-C is one line (exit 130); a collective that timed out
    (--dist-timeout-minutes: a rank stopped or died) one line naming this rank (exit 1)."""
    code, line, rank, timed_out = 0, "", int(os.environ.get("RANK", 0)), False
    try:
        work()
    except KeyboardInterrupt:
        code, line = 130, f"{prog}: interrupted (Ctrl-C); what was saved is intact"
    except Exception as e:
        known = [c for t, c in errors.items() if isinstance(e, t)]
        timed_out = isinstance(e, RuntimeError) and "timed out" in str(e).lower()
        if not known and not timed_out:
            raise
        code, line = (known or [1])[0], f"{prog}: {'error: ' if known == [2] else ''}{e}"
        if not known:  # a peer never reached the collective this rank waits in
            code, line = 1, f"{prog}: rank {rank}: {str(e).splitlines()[0][:300]}; a rank is stuck"
            line += " or died (--dist-timeout-minutes bounds the wait)"
    finally:  # on every exit, errors included, so no rank leaves the group behind
        if line and (rank == 0 or timed_out):  # a timeout is this rank's own story
            print(line, file=sys.stderr)
        if line and os.environ.get("TORCHELASTIC_ERROR_FILE"):
            info = {"py_callstack": line, "timestamp": str(int(time.time()))}
            with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w", encoding="utf-8") as f:
                json.dump({"message": {"message": line, "extraInfo": info}}, f)
        if dist.is_initialized():
            dist.destroy_process_group()
    return code


def exit(code):
    """Leave the program with `code`: sys.exit, but after a run under torchrun flush and os._exit.

    On CPU (gloo) a process whose work is done and whose process group is
    destroyed can still abort in the interpreter's teardown ("terminate called
    without an active exception", a thread left joinable), turning a good run
    into exit -6 now and then; skipping the teardown avoids it. Call it last."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def barrier():
    """Wait for every rank (nothing to wait for in one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shard_model(model, mesh, blocks, bf16=False, activation_checkpointing=False):
    """FSDP2: shard every block, then the root.

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
    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if bf16 else None,
        reduce_dtype=torch.float32,
        cast_forward_inputs=False,
    )
    for block in blocks:
        if activation_checkpointing:
            checkpoint_block(block)
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def checkpoint_block(block):
    """Activation checkpointing: keep only the block input, recompute the rest in backward.

    The composable API hooks the module in place, so parameter names (and
    checkpoints) stay the same. Dropout masks are recomputed identically
    (the RNG state is saved with the input)."""
    from torch.distributed._composable import checkpoint

    checkpoint(block)


@torch.no_grad()
def copy_into_shard(param, full):
    """Copy a full tensor into a (possibly sharded) parameter.

    Every rank reads the same full tensor from disk and keeps only its own
    slice (distribute_tensor with src_data_rank=None slices locally, no
    communication), so loading a checkpoint one tensor at a time peaks at one
    shard of the model plus one full tensor in flight."""
    full = full.to(dtype=param.dtype)
    if isinstance(param, DTensor):
        shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(full)


def all_finite(tensors):
    """Whether every tensor (this rank's shards) is free of NaN and inf on every rank."""
    ok = torch.tensor(
        [all(bool(torch.isfinite(local_tensor(t)).all()) for t in tensors)], dtype=torch.float32
    )
    if dist.is_initialized() and dist.get_world_size() > 1:
        ok = ok.to(next(iter(tensors)).device if tensors else ok.device)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def full_tensor(t):
    """The whole tensor of a DTensor (a collective: every rank must call it), else t itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_tensor(t):
    """This rank's shard of a DTensor, else t itself."""
    return t.to_local() if isinstance(t, DTensor) else t


@contextlib.contextmanager
def unsharded(model):
    """Inside: every rank holds the full weights and runs forward passes on its own.

    Decoding lengths differ between ranks (beam search stops when its beams
    finish), so the per-layer all-gathers of FSDP would not line up; gathering
    once and keeping the weights gathered avoids that. Costs the full model's
    memory on each rank for the duration (26 GB for mT5-XXL in bf16)."""
    fsdp_modules = [m for m in model.modules() if hasattr(m, "unshard") and hasattr(m, "reshard")]
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
        model.reset_iter_state()


def full_state_dict(model):
    """Full fp32 tensors on CPU: on rank 0 under FSDP (the other ranks get {}), else the model's own."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return {n: t.detach().cpu() for n, t in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
