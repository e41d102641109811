"""The 13B plan: memory per device for ProMoT on mT5-XXL under FSDP2, from the meta-built model.

    python bench/memory_plan.py                       # 8 and 64 devices of 80 GB, batch 64, 1024-token inputs
    python bench/memory_plan.py --devices 16 --target-length 128

Nothing is allocated: the model is built on the meta device (model.build), and
  * parameters, gradients and Adafactor state are counted from its tensor
    shapes, sharded over dim 0 the way fully_shard shards them, with
    support/adafactor.py's own factoring rule (a factored statistic that loses the
    sharded dimension is replicated on every rank);
  * activations are measured by running forward on meta tensors of the
    per-device micro-batch (bf16, as under --dtype bfloat16) with a
    saved-tensors hook that adds up what autograd keeps for backward, so
    stage 1 (frozen weights, only the prompt needs a gradient) and stage 2
    (every weight) are each counted as they really run. With
    --activation-checkpointing only block inputs are kept, plus one block's
    activations while it is recomputed;
  * FSDP2's gathered bf16 copies: the root unit (embedding + lm_head) stays
    gathered for the whole step, plus two blocks in flight (current +
    prefetched); in stage 2 one unit's unsharded bf16 gradient too.
Allocator fragmentation, communication buffers and the CUDA context (~1-3 GB)
are not included; keep ~10% headroom.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as model_lib  # noqa: E402
from support import t5x_loss  # noqa: E402
from support.adafactor import Adafactor  # noqa: E402

MT5_XXL = dict(
    vocab_size=250112,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_decoder_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.1,
    layer_norm_epsilon=1e-6,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    scale_decoder_outputs=False,
    model_type="mt5",
)
GB = 1e9


def shard_numel(shape, n):
    """Elements of the largest dim-0 shard (fully_shard pads dim 0 to a multiple of n)."""
    rows = -(-shape[0] // n) if shape else 1
    rest = 1
    for s in shape[1:]:
        rest *= s
    return rows * rest


def adafactor_state_numel(shape, n):
    """fp32 elements per device of support/adafactor.py's second-moment state (no momentum)."""
    dims = Adafactor.factored_dims(tuple(shape))
    if dims is None:
        return shard_numel(shape, n)
    row_dim, col_dim = dims
    total = 0
    for drop in (col_dim, row_dim):
        kept = [s for i, s in enumerate(shape) if i != drop]
        total += torch.Size(kept).numel() if drop == 0 else shard_numel(kept, n)
    return total


def measure_activations(t5, batch, src_len, tgt_len, prompt_len, stage):
    """Bytes autograd saves for backward, per block and outside blocks, on meta tensors."""
    cfg = t5.config
    blocks = {
        id(b): f"{name}.{i}"
        for name in ("encoder", "decoder")
        for i, b in enumerate(getattr(t5, name).blocks)
    }
    current, per_block, outside, seen = [None], {}, [0], set()

    weights = {id(p) for p in t5.parameters()}

    def pack(t):
        base = t._base if t._base is not None else t
        if id(base) in weights:
            return t  # a weight kept for backward is FSDP's gathered copy, counted apart
        key = (id(t.untyped_storage()) if t.device.type != "meta" else id(t), t.shape, t.dtype)
        if key not in seen:
            seen.add(key)
            nbytes = t.numel() * t.element_size()
            if current[0] is None:
                outside[0] += nbytes
            else:
                per_block[current[0]] = per_block.get(current[0], 0) + nbytes
        return t

    # Attention on meta (and on CPU) runs the math kernel, which keeps the
    # (heads x query x key) probabilities and dropout mask; the GPU
    # memory-efficient kernel keeps only q, k, v, the bias, the output and a
    # logsumexp. Count the math kernel's extras apart so both can be reported.
    sdpa_inputs, sdpa_extra = [None], [0]
    real_sdpa = model_lib.F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, **kw):
        sdpa_inputs[0] = {id(q), id(k), id(v), id(attn_mask)}
        out = real_sdpa(q, k, v, attn_mask=attn_mask, **kw)
        sdpa_inputs[0] = None
        # what the efficient kernel keeps besides its inputs: output + fp32 logsumexp
        sdpa_extra[0] -= out.numel() * out.element_size() + q.shape[0] * q.shape[1] * q.shape[2] * 4
        return out

    def pack_counting_sdpa(t):
        if sdpa_inputs[0] is not None and id(t) not in sdpa_inputs[0]:
            sdpa_extra[0] += t.numel() * t.element_size()
        return pack(t)

    hooks = []
    for m in list(t5.encoder.blocks) + list(t5.decoder.blocks):
        hooks.append(
            m.register_forward_pre_hook(lambda mod, args: current.__setitem__(0, blocks[id(mod)]))
        )
        hooks.append(m.register_forward_hook(lambda mod, args, out: current.__setitem__(0, None)))
    for p in t5.parameters():
        p.requires_grad_(stage == 2)
    prompt = torch.zeros(
        prompt_len, cfg.d_model, device="meta", dtype=torch.bfloat16, requires_grad=stage == 1
    )
    ids = torch.zeros(batch, src_len, dtype=torch.long, device="meta")
    mask = torch.ones(batch, src_len, dtype=torch.long, device="meta")
    labels = torch.zeros(batch, tgt_len, dtype=torch.long, device="meta")
    t5.train()
    model_lib.F.scaled_dot_product_attention = sdpa
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack_counting_sdpa, lambda t: t):
            logits = t5(ids, mask, model_lib.shift_right(labels), prompt=prompt)
            t5x_loss.cross_entropy(logits, labels, label_smoothing=0.1)
    finally:
        model_lib.F.scaled_dot_product_attention = real_sdpa
        for h in hooks:
            h.remove()
    return per_block, outside[0], sdpa_extra[0]


def activation_bytes(t5_bf16, batch, src_len, tgt_len, prompt_len, stage):
    """(activations, activations with checkpointing) in bytes, with the GPU memory-efficient
    attention kernel, and the math kernel's extra; see measure_activations."""
    config = t5_bf16.config
    per_block, outside, math_extra = measure_activations(
        t5_bf16, batch, src_len, tgt_len, prompt_len, stage
    )
    n_blocks = len(per_block)
    act = outside + sum(per_block.values()) - math_extra  # with the GPU memory-efficient kernel
    per_block = {k: v - math_extra / n_blocks for k, v in per_block.items()}
    block_inputs = (
        batch * (src_len + prompt_len) * config.d_model * 2 * config.num_layers
        + batch * tgt_len * config.d_model * 2 * config.num_decoder_layers
    )
    return act, outside + block_inputs + max(per_block.values()), math_extra


def single_device(config, batch, src_len, tgt_len, prompt_len):
    """Bytes of stage 2 on one device, fp32 weights under bf16 autocast (promot's one-process
    rule): weights, gradients and Adafactor state in fp32, autocast's bf16 copy of every weight
    (kept for backward), activations. (Adafactor's two scratch buffers, the largest tensor
    twice, live only during its step, when the activations are gone.)"""
    t5 = model_lib.build(model_lib.T5Config(**config), "meta")
    sizes = [p.numel() for p in t5.parameters()]
    state = sum(adafactor_state_numel(p.shape, 1) for p in t5.parameters())
    act, act_ckpt, _ = activation_bytes(
        t5.to(torch.bfloat16), batch, src_len, tgt_len, prompt_len, 2
    )
    fixed = 4 * sum(sizes) * 2 + 4 * state + 2 * sum(sizes)
    return dict(
        fixed=fixed, act=act, act_ckpt=act_ckpt, total=fixed + act, total_ckpt=fixed + act_ckpt
    )


def plan(n_devices, global_batch, src_len, tgt_len, prompt_len, hbm_gb):
    config = model_lib.T5Config(**MT5_XXL)
    t5 = model_lib.build(config, "meta")
    params = dict(t5.named_parameters())
    total = sum(p.numel() for p in params.values())
    param_shard = sum(shard_numel(p.shape, n_devices) for p in params.values())
    state = sum(adafactor_state_numel(p.shape, n_devices) for p in params.values())
    root = t5.shared.weight.numel() + t5.lm_head.weight.numel()
    block = max(
        sum(p.numel() for p in b.parameters())
        for b in list(t5.encoder.blocks) + list(t5.decoder.blocks)
    )
    per_device = global_batch // n_devices
    t5_bf16 = t5.to(torch.bfloat16)
    rows = []
    for stage in (1, 2):
        act, act_ckpt, math_extra = activation_bytes(
            t5_bf16, per_device, src_len, tgt_len, prompt_len, stage
        )
        gathered = 2 * root + 2 * 2 * block  # bf16: root unit + current and prefetched block
        m = dict(
            stage=stage,
            params=4 * param_shard,
            grads=(4 * param_shard + 2 * root) if stage == 2 else 4 * prompt_len * config.d_model,
            optimizer=(4 * state) if stage == 2 else 4 * prompt_len * config.d_model,
            gathered=gathered,
            act=act,
            act_ckpt=act_ckpt,
            act_math=act + math_extra,
        )
        m["total"] = m["params"] + m["grads"] + m["optimizer"] + m["gathered"] + m["act"]
        m["total_ckpt"] = m["total"] - m["act"] + m["act_ckpt"]
        rows.append(m)
    return total, per_device, rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, nargs="+", default=[8, 64])
    p.add_argument("--batch-size", type=int, default=64, help="global batch (paper: 64)")
    p.add_argument(
        "--input-length", type=int, default=1024, help="input tokens (paper: cut to 1024)"
    )
    p.add_argument(
        "--target-length",
        type=int,
        default=256,
        help="target tokens (an assumption: the paper's targets are short answers, translations and one-sentence summaries)",
    )
    p.add_argument("--prompt-length", type=int, default=100)
    p.add_argument("--hbm", type=float, default=80, help="GB per device")
    a = p.parse_args()
    print(
        f"mT5-XXL, global batch {a.batch_size}, inputs {a.input_length} (+{a.prompt_length} prompt), "
        f"targets {a.target_length}, bf16 compute with fp32 master weights; GB per device"
    )
    print(
        "| devices | stage | batch/device | params (fp32 shard) | grads | Adafactor | gathered bf16 | "
        "activations | total | activations (ckpt) | total (ckpt) | fits 80 GB | activations, math attention |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in a.devices:
        total, per_device, rows = plan(
            n, a.batch_size, a.input_length, a.target_length, a.prompt_length, a.hbm
        )
        for r in rows:
            fits = (
                "yes"
                if r["total"] <= 0.9 * a.hbm * GB
                else (
                    "with --activation-checkpointing"
                    if r["total_ckpt"] <= 0.9 * a.hbm * GB
                    else "no"
                )
            )
            print(
                f"| {n} | {r['stage']} | {per_device} | {r['params'] / GB:.1f} | {r['grads'] / GB:.2f} | "
                f"{r['optimizer'] / GB:.3f} | {r['gathered'] / GB:.1f} | {r['act'] / GB:.1f} | "
                f"{r['total'] / GB:.1f} | {r['act_ckpt'] / GB:.1f} | {r['total_ckpt'] / GB:.1f} | {fits} | {r['act_math'] / GB:.0f} |"
            )
    print(f"parameters: {total / 1e9:.2f} B")


if __name__ == "__main__":
    main()
