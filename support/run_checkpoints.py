"""A run folder's files: atomic writes and exactly-resumable training checkpoints.

A leaf of promot (it imports only torch and the standard library): copy it
alone into another codebase.

- `atomic_write(path)`: the one way promot writes a file. A reader (or a rerun
  after a kill, a full disk, a Ctrl-C) sees the old file or the new one, never
  a half-written one that looks complete.
- `save_checkpoint` / `latest_checkpoint` / `load_checkpoint`: a directory per
  step with the sharded training state (torch.distributed.checkpoint, each
  rank writes its own shards), every rank's RNG state and the trainer's
  bookkeeping (step, data position, best score), so a resumed run continues
  bit for bit.
"""

import contextlib
import json
import os
import shutil
import warnings

import torch
import torch.distributed as dist


@contextlib.contextmanager
def atomic_write(path):
    """Yields a temporary path beside `path`; write the file there. On success it is
    flushed to disk and renamed over `path`; on any failure it is removed."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj, indent=2):
    """`obj` as JSON at `path`, atomically."""
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)


def _barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _rank():
    return dist.get_rank() if dist.is_initialized() else 0


def rng_state(device):
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(folder, step, state, trainer, device, keep=1):
    """Write folder/step_N.tmp, then rename it: a checkpoint exists whole or not at all.

    torch.distributed.checkpoint writes each rank's shards in parallel (and
    runs as one process without torchrun); rank r adds its RNG state; rank 0
    adds trainer.json (step, data position, best score so far). Only the
    newest `keep` checkpoints are kept. Returns the checkpoint's path."""
    import torch.distributed.checkpoint as dcp
    final = os.path.join(folder, f"step_{step:07d}")
    tmp = final + ".tmp"
    main = _rank() == 0
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
        dcp.save(state, checkpoint_id=tmp)
    torch.save(rng_state(device), os.path.join(tmp, f"rng_rank{_rank()}.pt"))
    if main:
        with open(os.path.join(tmp, "trainer.json"), "w", encoding="utf-8") as f:
            json.dump(trainer, f, indent=2)
    _barrier()
    if main:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in sorted(d for d in os.listdir(folder) if d.startswith("step_") and not d.endswith(".tmp"))[:-keep]:
            shutil.rmtree(os.path.join(folder, old), ignore_errors=True)
    _barrier()
    return final


def latest_checkpoint(folder):
    """The newest complete checkpoint in `folder`, or None."""
    if not os.path.isdir(folder):
        return None
    done = sorted(d for d in os.listdir(folder)
                  if d.startswith("step_") and not d.endswith(".tmp")
                  and os.path.isfile(os.path.join(folder, d, "trainer.json")))
    return os.path.join(folder, done[-1]) if done else None


def load_checkpoint(path, state, device):
    """Fill `state` (the live tensors, in place) and this rank's RNG from checkpoint `path`;
    returns the trainer's bookkeeping (trainer.json)."""
    import torch.distributed.checkpoint as dcp
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp.load(state, checkpoint_id=path)
    set_rng_state(torch.load(os.path.join(path, f"rng_rank{_rank()}.pt"), weights_only=True), device)
    with open(os.path.join(path, "trainer.json"), encoding="utf-8") as f:
        return json.load(f)
