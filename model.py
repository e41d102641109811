"""model.py: the T5 encoder-decoder, written out by hand.

One file holds everything a reader needs to understand T5 (v1.0), T5.1.1,
mT5 and UMT5 and to run them on the public checkpoints:

- `T5Config`, read from a checkpoint's `config.json`;
- the network: RMS norm, relative position buckets, attention (with a KV cache
  for incremental decoding), the ReLU / gated-GELU feed-forward, the stacks;
- soft-prompt prepending (`prompt=`), the only change ProMoT needs, and
  removable LoRA adapters, the paper's alternative stage-1 module (App. C.7);
- `cross_entropy` with T5X's label smoothing, and `shift_right`;
- `load_pretrained` / `save_pretrained` in the Hugging Face layout, so a
  fine-tuned model goes back to the tools that made the checkpoint.

Training loops, data and decoding live in promot.py, data.py and evaluate.py.

The four variants differ only in config values:
  T5 v1.0  feed_forward_proj="relu", tied embeddings, logits rescaled by d_model**-0.5
  T5.1.1   "gated-gelu", separate lm_head, no rescale
  mT5      as T5.1.1 with a 250k vocabulary
  UMT5     as mT5, but every layer has its own relative position bias
"""

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint directory, file or tensor is not what the loader expects."""


# ----------------------------------------------------------------------------
# Configuration


@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64  # per-head width; num_heads * d_kv need not equal d_model
    d_ff: int = 2048
    num_layers: int = 6  # encoder depth
    num_decoder_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # "relu" (T5 v1.0) or "gated-gelu" (T5.1.1, mT5)
    tie_word_embeddings: bool = True  # lm_head shares the input embedding
    scale_decoder_outputs: bool = True  # multiply by d_model**-0.5 before lm_head
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    model_type: str = "t5"  # "t5", "mt5" or "umt5" (per-layer position bias)

    @property
    def per_layer_position_bias(self):
        return self.model_type == "umt5"

    @classmethod
    def from_dict(cls, d, source="config"):
        """Builds a config from the dictionary of a Hugging Face config.json.

        Public T5.1.1/mT5 configs say `tie_word_embeddings: false`; configs
        without the key (t5-small ... t5-11b) are tied. transformers 4.x
        rescaled the decoder output exactly when the embeddings were tied;
        transformers 5.x writes that choice in `scale_decoder_outputs`.
        """
        missing = [k for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads") if k not in d]
        if missing:
            raise CheckpointError(f"{source}: missing key(s) {missing}; expected a T5/mT5 config.json")
        proj = d.get("feed_forward_proj", "relu")
        if proj not in ("relu", "gated-gelu"):
            raise CheckpointError(
                f"{source}: feed_forward_proj is {proj!r}; expected 'relu' (T5 v1.0) or 'gated-gelu' (T5.1.1, mT5)")
        model_type = d.get("model_type", "t5")
        if model_type not in ("t5", "mt5", "umt5"):
            raise CheckpointError(f"{source}: model_type is {model_type!r}; expected 't5', 'mt5' or 'umt5'")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        kwargs["feed_forward_proj"] = proj
        kwargs.setdefault("num_decoder_layers", d["num_layers"])
        tied = d.get("tie_word_embeddings", True) is not False
        kwargs["tie_word_embeddings"] = tied
        kwargs["scale_decoder_outputs"] = d.get("scale_decoder_outputs", tied)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path):
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such file; a checkpoint directory needs a config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=path)

    def to_dict(self):
        """The config.json that transformers (4.x and 5.x) reads back as this model."""
        d = asdict(self)
        arch = {"t5": "T5ForConditionalGeneration", "mt5": "MT5ForConditionalGeneration",
                "umt5": "UMT5ForConditionalGeneration"}[self.model_type]
        d.update(architectures=[arch], is_encoder_decoder=True,
                 dense_act_fn="gelu_new" if self.feed_forward_proj == "gated-gelu" else "relu",
                 is_gated_act=self.feed_forward_proj == "gated-gelu")
        return d


# ----------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean subtraction, no bias, statistics in fp32."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(self.weight.dtype)


def relative_position_bucket(relative_position, bidirectional, num_buckets=32, max_distance=128):
    """Maps key_position - query_position to one of `num_buckets` buckets (T5 paper, 2.1).

    Half the buckets hold exact small distances, the other half grow
    logarithmically up to `max_distance`; farther distances share the last
    bucket. The encoder distinguishes left from right (half the buckets each);
    the causal decoder only ever looks left.
    """
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    # log-spaced buckets for max_exact <= distance < max_distance; float math as in Mesh TensorFlow
    log_ratio = torch.log(distance.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < max_exact, distance, large)


class Attention(nn.Module):
    """Multi-head attention without the 1/sqrt(d_kv) logit scale.

    T5 folds that scale into the initialisation of q, so the checkpoints
    expect raw dot products. Positions enter as a learned bias per head and
    relative-distance bucket, added to the logits.
    """

    def __init__(self, cfg, has_position_bias, bidirectional):
        super().__init__()
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        inner = cfg.num_heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        self.dropout = cfg.dropout_rate
        self.bidirectional = bidirectional
        self.num_buckets = cfg.relative_attention_num_buckets
        self.max_distance = cfg.relative_attention_max_distance
        self.relative_attention_bias = nn.Embedding(self.num_buckets, cfg.num_heads) if has_position_bias else None
        self.lora = nn.ModuleDict()  # optional low-rank adapters on q/k/v/o (see add_lora)
        self.use_lora = True

    def position_bias(self, query_len, key_len, offset=0):
        """(1, heads, query_len, key_len) bias; queries sit at offset, offset+1, ..."""
        device = self.relative_attention_bias.weight.device
        query_pos = torch.arange(offset, offset + query_len, device=device)[:, None]
        key_pos = torch.arange(key_len, device=device)[None, :]
        buckets = relative_position_bucket(key_pos - query_pos, self.bidirectional, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def project(self, name, x):
        """x @ W_name, plus the low-rank update when an adapter is attached and switched on."""
        out = getattr(self, name)(x)
        if self.use_lora and name in self.lora:
            out = out + self.lora[name](x)
        return out

    def split_heads(self, x):
        return x.view(x.shape[0], -1, self.num_heads, self.d_kv).transpose(1, 2)

    def forward(self, x, bias, source=None, cache=None):
        """x: (B, T, d). source: encoder states for cross-attention, None for self-attention.

        `bias` holds position bias plus the mask (large negative where a key is
        hidden). `cache` is this layer's dict in a KVCache: self-attention
        appends the new keys/values, cross-attention computes them once.
        """
        q = self.split_heads(self.project("q", x))
        if source is None:
            k, v = self.split_heads(self.project("k", x)), self.split_heads(self.project("v", x))
            if cache is not None:
                if "k" in cache:
                    k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        elif cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            k, v = self.split_heads(self.project("k", source)), self.split_heads(self.project("v", source))
            if cache is not None:  # contiguous once, so every later step's matmul reads it without a copy
                k, v = k.contiguous(), v.contiguous()
                cache["k"], cache["v"] = k, v
        if q.shape[2] == 1 and not self.training:
            # One query per row (a decoding step): plain matmuls beat the fused kernel's setup cost.
            weights = torch.softmax((q @ k.transpose(2, 3) + bias).float(), dim=-1).to(v.dtype)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.dropout if self.training else 0.0, scale=1.0)
        return self.project("o", out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class FeedForward(nn.Module):
    """ReLU MLP (T5 v1.0) or gated GELU, tanh approximation (T5.1.1, mT5)."""

    def __init__(self, cfg):
        super().__init__()
        self.gated = cfg.feed_forward_proj == "gated-gelu"
        if self.gated:
            self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x):
        if self.gated:
            h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        else:
            h = F.relu(self.wi(x))
        return self.wo(self.dropout(h))


class Block(nn.Module):
    """Pre-norm residual block: self-attention, (decoder) cross-attention, feed-forward."""

    def __init__(self, cfg, is_decoder, has_position_bias):
        super().__init__()
        self.self_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.self_attn = Attention(cfg, has_position_bias, bidirectional=not is_decoder)
        if is_decoder:
            self.cross_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
            self.cross_attn = Attention(cfg, has_position_bias=False, bidirectional=True)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.ff = FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x, self_mask, bias=None, offset=0, source=None, source_mask=None, cache=None):
        """Returns (x, the bias this block computed or None). A block that owns a
        position-bias table computes the bias inside its own forward (so FSDP has
        gathered the table) and hands it to the blocks after it, which reuse it
        (T5 shares one table per stack). Passing `bias` through unchanged would
        return an alias of an input, which FSDP warns about."""
        computed = None
        if self.self_attn.relative_attention_bias is not None:
            bias = computed = self.self_attn.position_bias(x.shape[1], self_mask.shape[-1], offset) + self_mask
        cache = cache if cache is not None else {}
        h = self.self_attn(self.self_norm(x), bias, cache=cache.get("self"))
        x = x + self.dropout(h)
        if source is not None:
            h = self.cross_attn(self.cross_norm(x), source_mask, source=source, cache=cache.get("cross"))
            x = x + self.dropout(h)
        x = x + self.dropout(self.ff(self.ff_norm(x)))
        return x, computed


class Stack(nn.Module):
    """The encoder (bidirectional) or the decoder (causal, with cross-attention)."""

    def __init__(self, cfg, is_decoder):
        super().__init__()
        n = cfg.num_decoder_layers if is_decoder else cfg.num_layers
        self.blocks = nn.ModuleList(
            Block(cfg, is_decoder, has_position_bias=(i == 0 or cfg.per_layer_position_bias)) for i in range(n))
        self.final_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x, self_mask, offset=0, source=None, source_mask=None, cache=None):
        x = self.dropout(x)
        bias = None
        for i, block in enumerate(self.blocks):
            layer_cache = cache.layers[i] if cache is not None else None
            x, computed = block(x, self_mask, bias, offset, source, source_mask, layer_cache)
            bias = computed if computed is not None else bias
        return self.dropout(self.final_norm(x))


def additive_mask(keep, dtype):
    """Bool/0-1 mask of visible keys -> 0 where visible, a large negative number where hidden."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep.bool(), torch.finfo(dtype).min)


class KVCache:
    """Keys and values of past decoder positions, one dict per decoder layer.

    Self-attention entries grow by the new positions at every `decode` call;
    cross-attention entries are computed from the encoder output on the first
    call and reused. This makes decoding O(T) per sequence instead of
    re-running the decoder over the whole prefix at each step.
    """

    def __init__(self):
        self.layers = []
        self.source_mask = None  # additive mask of the encoder positions, built on first use

    @property
    def length(self):
        return self.layers[0]["self"]["k"].shape[2] if self.layers and "k" in self.layers[0]["self"] else 0

    def reorder(self, index):
        """Keeps the batch rows given by `index`, in that order (beam search).

        Only the self-attention entries move: beam search picks rows among the
        beams of the same source, whose cross-attention keys are identical.
        """
        for layer in self.layers:
            layer["self"]["k"] = layer["self"]["k"].index_select(0, index)
            layer["self"]["v"] = layer["self"]["v"].index_select(0, index)


# ----------------------------------------------------------------------------
# The model


class T5(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Stack(config, is_decoder=False)
        self.decoder = Stack(config, is_decoder=True)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)

    def prepend_prompt(self, embeds, attention_mask, prompt):
        """[P; embed(x)] with the mask extended by ones: prompt tuning (Lester et al., 2021).

        The prompt goes in before the embedding dropout, exactly where a real
        token's embedding would be, and only into the encoder.
        """
        batch = embeds.shape[0]
        prompt = prompt.to(embeds.dtype)
        if prompt.dim() == 2:
            prompt = prompt.unsqueeze(0).expand(batch, -1, -1)
        if prompt.shape[0] != batch or prompt.shape[2] != embeds.shape[2]:
            raise ValueError(f"prompt has shape {tuple(prompt.shape)}; expected (p, {embeds.shape[2]}) "
                             f"or ({batch}, p, {embeds.shape[2]})")
        ones = attention_mask.new_ones(batch, prompt.shape[1])
        return torch.cat([prompt, embeds], dim=1), torch.cat([ones, attention_mask], dim=1)

    def encode(self, input_ids, attention_mask, prompt=None):
        """Returns (encoder states, their mask); both include the prompt positions."""
        x = self.shared(input_ids)
        if prompt is not None:
            x, attention_mask = self.prepend_prompt(x, attention_mask, prompt)
        mask = additive_mask(attention_mask[:, None, None, :], x.dtype)
        return self.encoder(x, mask), attention_mask

    def decode(self, decoder_input_ids, encoder_hidden, encoder_mask, cache=None, decoder_attention_mask=None):
        """Logits for decoder_input_ids. With a KVCache, pass only the new positions."""
        offset = 0
        if cache is not None:
            offset = cache.length
            if not cache.layers:
                cache.layers = [{"self": {}, "cross": {}} for _ in self.decoder.blocks]
        x = self.shared(decoder_input_ids)
        t, total = x.shape[1], offset + x.shape[1]
        # causal: the query at position offset+i sees keys 0 .. offset+i
        keep = torch.ones(t, total, dtype=torch.bool, device=x.device).tril(diagonal=offset)[None, None]
        if decoder_attention_mask is not None:
            keep = keep & decoder_attention_mask.bool()[:, None, None, :]
        self_mask = additive_mask(keep, x.dtype)
        if cache is not None and cache.source_mask is not None:
            source_mask = cache.source_mask  # the source is fixed for a cache's lifetime
        else:
            source_mask = additive_mask(encoder_mask[:, None, None, :], x.dtype)
            if cache is not None:
                cache.source_mask = source_mask
        h = self.decoder(x, self_mask, offset, encoder_hidden, source_mask, cache)
        if self.config.scale_decoder_outputs:
            h = h * self.config.d_model ** -0.5  # Mesh TF rescale before a tied softmax
        weight = self.shared.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, weight)

    def forward(self, input_ids, attention_mask, decoder_input_ids, prompt=None, decoder_attention_mask=None):
        encoder_hidden, encoder_mask = self.encode(input_ids, attention_mask, prompt)
        return self.decode(decoder_input_ids, encoder_hidden, encoder_mask,
                           decoder_attention_mask=decoder_attention_mask)


def shift_right(labels, decoder_start_token_id=0, pad_token_id=0):
    """Teacher forcing input: [start, y_1, ..., y_{T-1}], ignored (-100) labels become pad."""
    shifted = labels.new_full(labels.shape, pad_token_id)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id)


def cross_entropy(logits, labels, label_smoothing=0.0):
    """Token cross-entropy as T5X computes it; returns (sum over tokens, token count).

    Label smoothing follows T5X (`compute_weighted_cross_entropy`): the target
    gets 1 - s, every other token s / (V - 1), and the entropy of that target
    distribution is subtracted so a perfect prediction scores 0. (PyTorch's
    built-in smoothing spreads s over all V tokens, the target included.)
    Labels equal to -100 are ignored. Returning the sum lets a trainer divide
    by the token count of the whole global batch.
    """
    keep = labels != -100
    logp = torch.log_softmax(logits.float(), dim=-1)
    target = labels.masked_fill(~keep, 0)
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    if label_smoothing > 0:
        vocab = logits.shape[-1]
        on, off = 1.0 - label_smoothing, label_smoothing / (vocab - 1)
        entropy = -(on * math.log(on) + (vocab - 1) * off * math.log(off + 1e-20))
        loss = on * nll + off * (-logp.sum(-1) - nll) - entropy
    else:
        loss = nll
    return (loss * keep).sum(), keep.sum()


# ----------------------------------------------------------------------------
# LoRA: a removable low-rank adapter, the other stage-1 module of the paper (App. C.7)

LORA_TARGETS = ("q", "k", "v", "o")


class LoRA(nn.Module):
    """The update (alpha / r) * B @ A added to one frozen projection W (Hu et al., 2021).

    B starts at zero, so a fresh adapter leaves the model exactly as it was;
    A starts like a default nn.Linear, as in the LoRA reference code.
    """

    def __init__(self, d_in, d_out, rank, alpha, device=None, dtype=None):
        super().__init__()
        self.a = nn.Parameter(torch.empty(rank, d_in, device=device, dtype=dtype))
        self.b = nn.Parameter(torch.zeros(d_out, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))
        self.scale = alpha / rank

    def forward(self, x):
        return F.linear(F.linear(x, self.a), self.b) * self.scale


def _attentions(model):
    return [m for m in model.modules() if isinstance(m, Attention)]


def add_lora(model, rank, alpha=None, targets=("q", "v")):
    """Attaches a LoRA adapter to the chosen projections of every attention layer.

    The paper's choice (and LoRA's) is Q and V. alpha defaults to rank (scale 1).
    Returns the new adapter parameters; nothing else changes.
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown or not targets:
        raise ValueError(f"unknown LoRA target(s) {unknown or list(targets)}; choose from {list(LORA_TARGETS)}")
    alpha = float(rank if alpha is None else alpha)
    params = []
    for attn in _attentions(model):
        for name in targets:
            w = getattr(attn, name).weight
            attn.lora[name] = LoRA(w.shape[1], w.shape[0], rank, alpha, device=w.device, dtype=w.dtype)
            params += list(attn.lora[name].parameters())
    return params


def set_lora_enabled(model, enabled):
    """Applies (True) or removes (False) every attached adapter without deleting it.

    This is the adapter's version of prepending or not prepending the prompt:
    adapters on for tasks in the fine-tuned task's format, off for the others.
    """
    for attn in _attentions(model):
        attn.use_lora = enabled


def lora_info(model):
    """{"rank", "alpha", "targets"} of the attached adapters, or None."""
    for attn in _attentions(model):
        if len(attn.lora):
            first = next(iter(attn.lora.values()))
            return {"rank": first.a.shape[0], "alpha": first.scale * first.a.shape[0], "targets": list(attn.lora)}
    return None


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
    """Writes only the adapter tensors, with rank/alpha/targets/d_model in the metadata.
    Pass `state_dict` (full tensors) when the model is sharded."""
    from safetensors.torch import save_file
    info = lora_info(model)
    if info is None:
        raise ValueError("the model has no LoRA adapter to save")
    state = state_dict if state_dict is not None else model.state_dict()
    tensors = {n: p.detach().cpu().contiguous() for n, p in state.items() if ".lora." in n}
    meta = {"rank": str(info["rank"]), "alpha": repr(info["alpha"]), "targets": ",".join(info["targets"]),
            "d_model": str(model.config.d_model), "format": "promot-lora"}
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)  # atomic: readers see the old file or the new one
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_lora(path, d_model):
    """(tensors, {"rank", "alpha", "targets"}) of an adapter file written by save_lora."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework="pt") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read a LoRA adapter file ({e})") from None
    if meta.get("format") != "promot-lora":
        raise CheckpointError(f"{path}: not a promot LoRA file (metadata lacks format=promot-lora)")
    if int(meta["d_model"]) != d_model:
        raise CheckpointError(f"{path}: adapter made for d_model={meta['d_model']}, "
                              f"this model has d_model={d_model}")
    return tensors, {"rank": int(meta["rank"]), "alpha": float(meta["alpha"]), "targets": meta["targets"].split(",")}


def check_lora_tensors(model, tensors, source):
    """Raises unless `tensors` are exactly the adapters attached to `model`, shape for shape."""
    expected = {n: p for n, p in model.named_parameters() if ".lora." in n}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{source}: adapter tensors do not fit this model (missing {missing[:2]}, "
                              f"unexpected {unexpected[:2]}); was it made for another depth or targets?")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise CheckpointError(f"{source}: {name} has shape {tuple(tensor.shape)}, the model's adapter "
                                  f"has {tuple(expected[name].shape)}")
    return expected


def load_lora(model, path):
    """Attaches the adapters saved in `path` (rank and targets from the file) to `model`."""
    tensors, info = read_lora(path, model.config.d_model)
    rank = info["rank"]
    if lora_info(model) is None:
        add_lora(model, rank, info["alpha"], info["targets"])
    expected = check_lora_tensors(model, tensors, f"{path} (rank {rank} in the file)")
    with torch.no_grad():
        for name, tensor in tensors.items():
            expected[name].copy_(tensor)
    return model


# ----------------------------------------------------------------------------
# Checkpoints in the Hugging Face layout
#
# Our parameter names are readable (encoder.blocks.0.self_attn.q.weight); the
# public checkpoints use transformers' (encoder.block.0.layer.0.SelfAttention.q.weight).
# The two tables below are the whole translation.

_HF_SUBLAYERS = {
    "encoder": {"layer.0.SelfAttention": "self_attn", "layer.0.layer_norm": "self_norm",
                "layer.1.DenseReluDense": "ff", "layer.1.layer_norm": "ff_norm"},
    "decoder": {"layer.0.SelfAttention": "self_attn", "layer.0.layer_norm": "self_norm",
                "layer.1.EncDecAttention": "cross_attn", "layer.1.layer_norm": "cross_norm",
                "layer.2.DenseReluDense": "ff", "layer.2.layer_norm": "ff_norm"},
}
_HF_NAME = re.compile(r"(encoder|decoder)\.block\.(\d+)\.(layer\.\d\.\w+)\.(.+)")
_OUR_NAME = re.compile(r"(encoder|decoder)\.blocks\.(\d+)\.(\w+)\.(.+)")
_EMBED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def hf_to_ours(name):
    """transformers parameter name -> ours (None when the name is not a T5 weight)."""
    m = _HF_NAME.fullmatch(name)
    if m:
        stack, i, sub, rest = m.groups()
        ours = _HF_SUBLAYERS[stack].get(sub)
        return f"{stack}.blocks.{i}.{ours}.{rest}" if ours else None
    if name in ("encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"):
        return name.replace("final_layer_norm", "final_norm")
    if name in ("shared.weight", "lm_head.weight"):
        return name
    return None


def ours_to_hf(name):
    m = _OUR_NAME.fullmatch(name)
    if m:
        stack, i, sub, rest = m.groups()
        hf = {v: k for k, v in _HF_SUBLAYERS[stack].items()}[sub]
        return f"{stack}.block.{i}.{hf}.{rest}"
    return name.replace("final_norm", "final_layer_norm")


def build(config, device="meta"):
    """The model with uninitialised (meta) or default-initialised tensors on `device`."""
    with torch.device(device):
        return T5(config)


def _checkpoint_files(path):
    """[(file, [names] or None)] of a checkpoint directory, safetensors preferred."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if os.path.exists(os.path.join(path, single)):
            return [os.path.join(path, single)]
        index_path = os.path.join(path, index)
        if os.path.exists(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{index_path}: expected JSON with a 'weight_map' ({e!r})") from None
            return [os.path.join(path, f) for f in dict.fromkeys(weight_map.values())]
    raise CheckpointError(f"{path}: found no weights; expected model.safetensors, model.safetensors.index.json, "
                          "pytorch_model.bin or pytorch_model.bin.index.json")


def _read_file(file):
    """Yields (transformers name, tensor) from one weights file, one tensor at a time."""
    if not os.path.exists(file):
        raise CheckpointError(f"{file}: listed in the checkpoint index but missing")
    if file.endswith(".safetensors"):
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: cannot read as safetensors ({e}); the file may be truncated or "
                                  "corrupted, download it again") from None
        return
    try:  # weights_only: never run code stored in the pickle
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise CheckpointError(f"{file}: cannot read ({e})") from None
        state = torch.load(file, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:
        raise CheckpointError(f"{file}: refused to load; it is not a plain tensor file that loads without "
                              f"executing pickled code ({type(e).__name__}: {str(e)[:200]})") from None
    for name, tensor in state.items():
        yield name, tensor


def checkpoint_tensors(path):
    """Yields (our parameter name, tensor, file) for every weight of a checkpoint directory.

    Embedding aliases are reported under shared.weight; unknown names raise.
    """
    for file in _checkpoint_files(path):
        for name, tensor in _read_file(file):
            ours = "shared.weight" if name in _EMBED_ALIASES else hf_to_ours(name)
            if ours is None:
                raise CheckpointError(f"{file}: unexpected tensor {name!r}; not a T5/mT5 weight")
            yield ours, tensor, file


def _set_tensor(model, name, tensor):
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=module._parameters[leaf].requires_grad)


def load_pretrained(path, dtype=torch.float32, device="cpu"):
    """Reads a Hugging Face T5/mT5/UMT5 checkpoint directory into our model.

    The model is built on the meta device (no memory) and filled one tensor at
    a time, so peak memory is the model plus about one tensor in flight.
    Every expected tensor must appear once with the expected shape.
    """
    config = T5Config.from_json(os.path.join(path, "config.json"))
    model = build(config, "meta")
    expected = {n: p.shape for n, p in model.named_parameters()}
    loaded, head = set(), None
    for name, tensor, file in checkpoint_tensors(path):
        if name == "lm_head.weight" and config.tie_word_embeddings:
            head = (tensor, file)  # an alias of shared.weight, unless its values differ (see below)
            continue
        if name not in expected:
            raise CheckpointError(f"{file}: unexpected tensor {ours_to_hf(name)!r} for this config "
                                  f"(model_type={config.model_type}, layers={config.num_layers}/"
                                  f"{config.num_decoder_layers})")
        if name in loaded:
            continue  # embedding aliases repeat shared.weight
        if tensor.shape != expected[name]:
            raise CheckpointError(f"{file}: tensor {ours_to_hf(name)!r} has shape {tuple(tensor.shape)}; "
                                  f"config.json implies {tuple(expected[name])}")
        _set_tensor(model, name, tensor.to(device=device, dtype=dtype))
        loaded.add(name)
    if head is not None and "shared.weight" in loaded and not torch.equal(
            head[0].to(device=device, dtype=dtype), model.shared.weight.data):
        # transformers 5 writes tie_word_embeddings=true for every model but keeps a
        # separate head when the values differ; follow the tensors, not the flag.
        model.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False, device="meta")
        _set_tensor(model, "lm_head.weight", head[0].to(device=device, dtype=dtype))
        config.tie_word_embeddings = False
        loaded.add("lm_head.weight")
    missing = [ours_to_hf(n) for n in expected if n not in loaded]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {len(missing)} tensor(s) the config needs, "
                              f"e.g. {missing[:3]}")
    return model


def save_pretrained(model, path, state_dict=None, max_shard_bytes=5 * 10**9):
    """Writes config.json + safetensors (sharded with an index above max_shard_bytes).

    The directory is written under a temporary name and swapped in at the end,
    so a failed save leaves the previous checkpoint untouched. Files in an
    existing directory that are not weights (spiece.model, a prompt) are kept.
    Pass `state_dict` (our names, full tensors) when the model is sharded.
    """
    from safetensors.torch import save_file
    state = state_dict if state_dict is not None else model.state_dict()
    state = {n: t for n, t in state.items() if ".lora." not in n}  # adapters are saved by save_lora
    tensors = {ours_to_hf(n): t.detach().to("cpu").contiguous() for n, t in state.items()}
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
    try:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(model.config.to_dict(), f, indent=2)
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, file), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, file))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        umask = os.umask(0)
        os.umask(umask)  # mkdtemp and safetensors create private (0700/0600) files; use the usual modes
        os.chmod(tmp, 0o777 & ~umask)
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        if os.path.isdir(path):
            weights = re.compile(r"config\.json|model.*\.safetensors(\.index\.json)?|pytorch_model.*\.bin(\.index\.json)?")
            for name in os.listdir(path):
                if not weights.fullmatch(name):
                    src = os.path.join(path, name)
                    (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(tmp, name))
            old = tmp + ".old"
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
