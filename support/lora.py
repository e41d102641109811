"""support/lora.py: LoRA adapters (Hu et al., 2021) attached to attention layers by forward hooks.

ProMoT's stage 1 can train a removable low-rank adapter instead of a soft
prompt (paper App. C.7). This module adds one to the chosen projections of
every attention layer without changing the layer's code: any module with
nn.Linear children named q, k, v and o (T5) or q_proj ... o_proj (Llama, Mistral,
Qwen) counts as attention. The adapters live
in `module.lora` (a ModuleDict), so their parameters are named
`<attention>.lora.<target>.a` / `.b` and a `fully_shard(block)` shards them
with their block; a forward hook on each target Linear adds the adapter's
output, inside the Linear's call, where FSDP has gathered the block.

Also here: switching the adapters on and off, and their file
(`lora.safetensors`: the adapter tensors, with rank/alpha/targets/d_model and
format=promot-lora in the metadata), and `Adapters`: LoRA as ProMoT's stage-1
module, the one object a trainer asks to attach, freeze or train, checkpoint and
export the adapters. Imports only torch, safetensors and support/errors.py.
"""

import functools
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from support.errors import BadInput, DamagedFile

LORA_TARGETS = ("q", "k", "v", "o")


class LoRA(nn.Module):
    """The update (alpha / r) * B @ A added to one frozen projection W.

    B starts at zero, so a fresh adapter leaves the model exactly as it was;
    A starts like a default nn.Linear, as in the LoRA reference code.
    """

    def __init__(self, d_in, d_out, rank, alpha, device=None, dtype=None):
        super().__init__()
        self.a = nn.Parameter(torch.empty(rank, d_in, device=device, dtype=dtype))
        self.b = nn.Parameter(torch.zeros(d_out, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
        self.scale = alpha / rank
        self.enabled = True  # read by the hook; see set_lora_enabled

    def forward(self, x):
        return F.linear(F.linear(x, self.a), self.b) * self.scale


def projection(attention, target):
    """The nn.Linear of `target` ("q", "k", "v" or "o"): T5's `q`, or a Llama-family `q_proj`."""
    for name in (target, f"{target}_proj"):
        if isinstance(getattr(attention, name, None), nn.Linear):
            return getattr(attention, name)
    return None


def attention_modules(model):
    """Every module of `model` with nn.Linear children named q, k, v and o (or q_proj, ...)."""
    return [
        m for m in model.modules() if all(projection(m, name) is not None for name in LORA_TARGETS)
    ]


def _add_adapter_output(attention, target, linear, args, out):
    """Forward hook of a target Linear: W x, plus the adapter's update when it is on."""
    adapter = attention.lora[target]
    return out + adapter(args[0]) if adapter.enabled else out


def check_settings(rank, targets, rank_name="LoRA rank", targets_name="LoRA targets"):
    """Raises BadInput unless rank is a positive integer and targets a non-empty subset of
    q, k, v, o; the message calls them `rank_name` and `targets_name` (e.g. a command's flags)."""
    if not isinstance(rank, int) or rank < 1:
        raise BadInput(f"{rank_name} must be a positive integer, got {rank!r}")
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise BadInput(
            f"{targets_name} {','.join(targets)!r}: unknown LoRA target(s) "
            f"{unknown or list(targets)}; "
            f"choose from {','.join(LORA_TARGETS)}"
        )


def add_lora(model, rank, alpha=None, targets=("q", "v")):
    """Attaches a LoRA adapter to the chosen projections of every attention layer.

    The paper's choice (and LoRA's) is Q and V. alpha defaults to rank (scale 1).
    Returns the new adapter parameters; nothing else changes. Calling it again
    replaces the adapters (the hooks stay, one per projection).
    """
    check_settings(rank, targets)
    alpha = float(rank if alpha is None else alpha)
    params = []
    for attention in attention_modules(model):
        if not hasattr(attention, "lora"):
            attention.lora = nn.ModuleDict()
        for name in targets:
            linear = projection(attention, name)
            w = linear.weight
            if name not in attention.lora:  # the hook finds whichever adapter is attached now
                linear.register_forward_hook(
                    functools.partial(_add_adapter_output, attention, name)
                )
            attention.lora[name] = LoRA(
                w.shape[1], w.shape[0], rank, alpha, device=w.device, dtype=w.dtype
            )
            params += list(attention.lora[name].parameters())
    return params


def set_lora_enabled(model, enabled):
    """Applies (True) or removes (False) every attached adapter without deleting it.

    This is the adapter's version of prepending or not prepending the prompt:
    adapters on for tasks in the fine-tuned task's format, off for the others.
    """
    for module in model.modules():
        if isinstance(module, LoRA):
            module.enabled = enabled


def lora_info(model):
    """{"rank", "alpha", "targets"} of the attached adapters, or None."""
    for attention in attention_modules(model):
        adapters = getattr(attention, "lora", None)
        if adapters is not None and len(adapters):
            first = next(iter(adapters.values()))
            return {
                "rank": first.a.shape[0],
                "alpha": first.scale * first.a.shape[0],
                "targets": list(adapters),
            }
    return None


def _d_model(model):
    """The width the adapters read: the input width of the first attention's q."""
    attentions = attention_modules(model)
    return projection(attentions[0], "q").in_features if attentions else None


def init_lora_tensors(model, generator=None):
    """Fresh adapter values for the adapters attached to `model` (which may sit on the meta
    device): A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) like nn.Linear's default, B = 0."""
    tensors = {}
    for name, p in model.named_parameters():
        if ".lora." in name:
            if name.endswith(".a"):
                bound = 1.0 / math.sqrt(p.shape[1])
                tensors[name] = (torch.rand(p.shape, generator=generator) * 2 - 1) * bound
            else:
                tensors[name] = torch.zeros(p.shape)
    return tensors


def save_lora(model, path, state_dict=None):
    """Writes only the adapter tensors, with rank/alpha/targets/d_model in the metadata,
    directly at `path` (the caller makes the write atomic).
    Pass `state_dict` (full tensors) when the model is sharded."""
    from safetensors.torch import save_file

    info = lora_info(model)
    if info is None:
        raise BadInput("the model has no LoRA adapter to save")
    state = state_dict if state_dict is not None else model.state_dict()
    tensors = {n: p.detach().cpu().contiguous() for n, p in state.items() if ".lora." in n}
    meta = {
        "rank": str(info["rank"]),
        "alpha": repr(info["alpha"]),
        "targets": ",".join(info["targets"]),
        "d_model": str(_d_model(model)),
        "format": "promot-lora",
    }
    save_file(tensors, path, metadata=meta)


def read_lora(path, d_model):
    """(tensors, {"rank", "alpha", "targets"}) of an adapter file written by save_lora."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise DamagedFile(f"{path}: cannot read a LoRA adapter file ({e})") from None
    if meta.get("format") != "promot-lora":
        raise BadInput(f"{path}: not a promot LoRA file (metadata lacks format=promot-lora)")
    if int(meta["d_model"]) != d_model:
        raise BadInput(
            f"{path}: adapter made for d_model={meta['d_model']}, this model has d_model={d_model}"
        )
    return tensors, {
        "rank": int(meta["rank"]),
        "alpha": float(meta["alpha"]),
        "targets": meta["targets"].split(","),
    }


def check_lora_tensors(model, tensors, source):
    """Raises unless `tensors` are exactly the adapters attached to `model`, shape for shape."""
    expected = {n: p for n, p in model.named_parameters() if ".lora." in n}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise BadInput(
            f"{source}: adapter tensors do not fit this model (missing {missing[:2]}, "
            f"unexpected {unexpected[:2]}); was it made for another depth or targets?"
        )
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise BadInput(
                f"{source}: {name} has shape {tuple(tensor.shape)}, the model's adapter "
                f"has {tuple(expected[name].shape)}"
            )
    return expected


def load_lora(model, path):
    """Attaches the adapters saved in `path` (rank and targets from the file) to `model`."""
    tensors, info = read_lora(path, _d_model(model))
    rank = info["rank"]
    if lora_info(model) is None:
        add_lora(model, rank, info["alpha"], info["targets"])
    expected = check_lora_tensors(model, tensors, f"{path} (rank {rank} in the file)")
    with torch.no_grad():
        for name, tensor in tensors.items():
            expected[name].copy_(tensor)
    return model


class Adapters:
    """LoRA as ProMoT's stage-1 module (paper App. C.7), as a trainer uses it.

    Stage 1 trains fresh adapters (`tensors` None: seeded, the same on every rank); stage 2
    keeps stage 1's (`tensors` read by read_lora) frozen and applied. `settings` is
    {"rank", "alpha", "targets"}; None (the default) means no adapters, and then every
    method below does nothing, so a trainer calls them without asking which module it has.
    """

    def __init__(self, settings=None, tensors=None, trains=False, seed=0, source="the adapters"):
        self.settings, self.values, self.trains = settings, tensors, trains
        self.seed, self.source = seed, source

    def attach(self, model):
        """Adds the adapters to `model` (call it before sharding: FSDP then shards them with their
        block) and returns {name: tensor} to copy into them."""
        if self.settings is None:
            return {}
        add_lora(model, self.settings["rank"], self.settings["alpha"], self.settings["targets"])
        values = self.values
        if values is None:
            values = init_lora_tensors(model, torch.Generator().manual_seed(self.seed))
        check_lora_tensors(model, values, self.source)
        return values

    def trainable(self, model):
        """Sets requires_grad of the adapters; returns those that train (none when frozen)."""
        params = list(self.tensors(model).values())
        for p in params:
            p.requires_grad_(self.trains)
        return params if self.trains else []

    def state(self, model):
        """The adapters' entries of model.state_dict() when they train (a checkpoint holds them)."""
        if not self.trains:
            return {}
        return {n: t for n, t in model.state_dict().items() if ".lora." in n}

    def tensors(self, model):
        """{name: parameter} of the attached adapters."""
        if self.settings is None or model is None:
            return {}
        return {n: p for n, p in model.named_parameters() if ".lora." in n}

    def save(self, model, folder, full_tensor=lambda p: p, main=True):
        """lora.safetensors in `folder`, atomically (a temporary file, then renamed).
        `full_tensor` gathers a sharded parameter (a collective: call it on every rank);
        only `main` writes."""
        tensors = {n: full_tensor(p).detach().cpu() for n, p in self.tensors(model).items()}
        if tensors and main:
            path = os.path.join(folder, "lora.safetensors")
            save_lora(model, path + ".tmp", state_dict=tensors)
            os.replace(path + ".tmp", path)


def stage1_module(stage1_module, stage, path, d_model, rank=4, seed=0):
    """What ProMoT's stage 1 trains in the prompt's place (App. C.7), as a trainer uses it:
    with `stage1_module` "lora", adapters of `rank` on q and v, fresh in stage 1 (`path` None),
    stage 1's read from `path` and frozen in stage 2. With "prompt", an Adapters that does
    nothing, so the trainer calls it without asking which module it has."""
    if stage1_module != "lora":
        return Adapters()
    fresh = None, dict(rank=rank, alpha=None, targets=["q", "v"])
    tensors, settings = read_lora(path, d_model) if path else fresh
    return Adapters(settings, tensors, stage == "1", seed, path or "the adapters")
