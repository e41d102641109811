"""model.py: the T5 encoder-decoder, written out by hand.

One file holds everything a reader needs to understand T5 (v1.0), T5.1.1,
mT5 and UMT5 and to run them on the public checkpoints:

- `T5Config`, read from a checkpoint's `config.json`;
- the network: RMS norm, relative position buckets, attention (with a KV cache
  for incremental decoding), the ReLU / gated-GELU feed-forward, the stacks;
- soft-prompt prepending (`prompt=`), the only change ProMoT needs;
- `start_decoding`, a T5 as decode.py's search takes a model (a step and a reorder function);
- `shift_right`, the decoder input of teacher forcing;
- `load_pretrained` / `save_pretrained` in the Hugging Face layout, so a fine-tuned model
  goes back to the tools that made the checkpoint: the translation between their parameter
  names and ours, the tied-head rule, and the safetensors files (one, or indexed shards).

The file works copied alone, needing only torch and safetensors. Beside promot it raises
promot's two error types, and support/hf_files.py reads pytorch_model.bin (without running
pickled code) and replaces a saved folder whole. LoRA adapters attach from outside
(support/lora.py); the prompt file is support/prompt_formats.py's, the training loss (T5X's)
support/t5x_loss.py's.

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
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

try:
    from support.errors import BadInput, DamagedFile
except ImportError:  # model.py copied alone
    BadInput = DamagedFile = ValueError


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

        Public T5.1.1/mT5 configs say `tie_word_embeddings: false`; configs without the key
        (t5-small ... t5-11b) are tied. transformers 4.x rescaled the decoder output exactly
        when the embeddings were tied; transformers 5.x writes that choice in
        `scale_decoder_outputs`. A config the network cannot be built from is one BadInput.
        """
        if not isinstance(d, dict):
            raise BadInput(f"{source}: expected a JSON object, got {type(d).__name__}")
        needed = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
        missing = [k for k in needed if k not in d]
        if missing:
            raise BadInput(f"{source}: missing key(s) {missing}; expected a T5/mT5 config.json")
        known = {f.name: f.type for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        # a string "128" or a float layer count would fail deep inside the network
        for key, value in kwargs.items():
            if not _config_value_ok(key, known[key], value):
                expected = _EXPECTED.get(key) or _EXPECTED[known[key]]
                raise BadInput(f"{source}: {key} is {value!r}; expected {expected}")
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
            raise BadInput(
                f"{path}: no such file; a checkpoint directory needs a config.json"
            ) from None
        except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, nested too deeply
            raise DamagedFile(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=path)

    def to_dict(self):
        """The config.json that transformers (4.x and 5.x) reads back as this model."""
        gated = self.feed_forward_proj == "gated-gelu"
        arch = {"t5": "T5", "mt5": "MT5", "umt5": "UMT5"}[self.model_type]
        return asdict(self) | dict(
            architectures=[arch + "ForConditionalGeneration"],
            is_encoder_decoder=True,
            dense_act_fn="gelu_new" if gated else "relu",
            is_gated_act=gated,
        )


_EXPECTED = {
    int: "a non-negative integer",
    float: "a non-negative number",
    bool: "true or false",
    "feed_forward_proj": "'relu' (T5 v1.0) or 'gated-gelu' (T5.1.1, mT5)",
    "model_type": "'t5', 'mt5' or 'umt5'",
}


def _config_value_ok(key, kind, value):
    if key == "feed_forward_proj":
        return value in ("relu", "gated-gelu")
    if key == "model_type":
        return value in ("t5", "mt5", "umt5")
    if kind is float:
        return type(value) in (int, float) and 0 <= value < float("inf")
    return type(value) is kind and (kind is not int or value >= 0)


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

    Half the buckets hold exact small distances, the other half grow logarithmically up to
    `max_distance`; farther distances share the last bucket. The encoder distinguishes left
    from right (half the buckets each); the causal decoder only ever looks left.
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
    log_ratio = torch.log(distance.float().clamp(min=1) / max_exact)
    log_ratio = log_ratio / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < max_exact, distance, large)


class Attention(nn.Module):
    """Multi-head attention without the 1/sqrt(d_kv) logit scale.

    T5 folds that scale into the initialisation of q, so the checkpoints expect raw dot
    products. Positions enter as a learned bias (per head and distance bucket) on the logits.
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
        self.relative_attention_bias = (
            nn.Embedding(self.num_buckets, cfg.num_heads) if has_position_bias else None
        )

    def position_bias(self, query_len, key_len, offset=0):
        """(1, heads, query_len, key_len) bias; queries sit at offset, offset+1, ..."""
        device = self.relative_attention_bias.weight.device
        query_pos = torch.arange(offset, offset + query_len, device=device)[:, None]
        key_pos = torch.arange(key_len, device=device)[None, :]
        buckets = relative_position_bucket(
            key_pos - query_pos, self.bidirectional, self.num_buckets, self.max_distance
        )
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def split_heads(self, x):
        return x.view(x.shape[0], -1, self.num_heads, self.d_kv).transpose(1, 2)

    def forward(self, x, bias, source=None, cache=None):
        """x: (B, T, d). source: encoder states for cross-attention, None for self-attention.

        `bias` holds position bias plus the mask (large negative where a key is
        hidden). `cache` is this layer's dict in a KVCache: self-attention
        appends the new keys/values, cross-attention computes them once.
        """
        q = self.split_heads(self.q(x))
        if source is None:
            k, v = self.split_heads(self.k(x)), self.split_heads(self.v(x))
            if cache is not None:
                if "k" in cache:
                    k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        elif cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            k, v = self.split_heads(self.k(source)), self.split_heads(self.v(source))
            if cache is not None:  # contiguous once: each later step's matmul reads it uncopied
                k, v = k.contiguous(), v.contiguous()
                cache["k"], cache["v"] = k, v
        if q.shape[2] == 1 and not self.training:
            # One query per row (a decoding step): plain matmuls beat the fused kernel's setup cost.
            weights = torch.softmax((q @ k.transpose(2, 3) + bias).float(), dim=-1).to(v.dtype)
            out = weights @ v
        else:
            mask, drop = bias.to(q.dtype), self.dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, scale=1.0)
        return self.o(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


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
        """Returns (x, the bias this block computed or None). A block that owns a position-bias
        table computes the bias inside its own forward (so FSDP has gathered the table) and
        hands it to the blocks after it, which reuse it (T5 shares one table per stack).
        Passing `bias` through unchanged would return an alias of an input (FSDP warns)."""
        computed = None
        if self.self_attn.relative_attention_bias is not None:
            bias = computed = (
                self.self_attn.position_bias(x.shape[1], self_mask.shape[-1], offset) + self_mask
            )
        cache = cache if cache is not None else {}
        h = self.self_attn(self.self_norm(x), bias, cache=cache.get("self"))
        x = x + self.dropout(h)
        if source is not None:
            h = self.cross_attn(
                self.cross_norm(x), source_mask, source=source, cache=cache.get("cross")
            )
            x = x + self.dropout(h)
        x = x + self.dropout(self.ff(self.ff_norm(x)))
        return x, computed


class Stack(nn.Module):
    """The encoder (bidirectional) or the decoder (causal, with cross-attention)."""

    def __init__(self, cfg, is_decoder):
        super().__init__()
        n = cfg.num_decoder_layers if is_decoder else cfg.num_layers
        self.blocks = nn.ModuleList(
            Block(cfg, is_decoder, has_position_bias=(i == 0 or cfg.per_layer_position_bias))
            for i in range(n)
        )
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
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(
        ~keep.bool(), torch.finfo(dtype).min
    )


class KVCache:
    """Keys and values of past decoder positions, one dict per decoder layer.

    Self-attention entries grow by the new positions at every `decode` call; cross-attention
    entries are computed from the encoder output on the first call and reused. This makes
    decoding O(T) per sequence instead of re-running the decoder over the whole prefix.
    """

    def __init__(self):
        self.layers = []
        self.source_mask = None  # additive mask of the encoder positions, built on first use

    @property
    def length(self):
        entry = self.layers[0]["self"] if self.layers else {}
        return entry["k"].shape[2] if "k" in entry else 0

    def reorder(self, rows, moved=False):
        """Keeps the batch rows given by `rows`, in that order (decode.py's `reorder`).

        The self-attention entries move at every call. The cross-attention keys and the
        source mask move only with `moved=True`: the beams of one source share them, so they
        stay put while beams trade places (`moved` as decode.py defines it).
        """
        for layer in self.layers:
            for entry in (layer["self"], layer["cross"]) if moved else (layer["self"],):
                for key in list(entry):
                    entry[key] = entry[key].index_select(0, rows)
        if moved and self.source_mask is not None:
            self.source_mask = self.source_mask.index_select(0, rows)


# ----------------------------------------------------------------------------
# The model


class T5(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Stack(config, is_decoder=False)
        self.decoder = Stack(config, is_decoder=True)
        self.lm_head = None  # tied: the logits use the input embedding
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

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
            raise ValueError(
                f"prompt has shape {tuple(prompt.shape)}; expected (p, {embeds.shape[2]}) "
                f"or ({batch}, p, {embeds.shape[2]})"
            )
        ones = attention_mask.new_ones(batch, prompt.shape[1])
        return torch.cat([prompt, embeds], dim=1), torch.cat([ones, attention_mask], dim=1)

    def encode(self, input_ids, attention_mask, prompt=None):
        """Returns (encoder states, their mask); both include the prompt positions."""
        x = self.shared(input_ids)
        if prompt is not None:
            x, attention_mask = self.prepend_prompt(x, attention_mask, prompt)
        mask = additive_mask(attention_mask[:, None, None, :], x.dtype)
        return self.encoder(x, mask), attention_mask

    def decode(
        self,
        decoder_input_ids,
        encoder_hidden,
        encoder_mask,
        cache=None,
        decoder_attention_mask=None,
    ):
        """Logits for decoder_input_ids. With a KVCache, pass only the new positions."""
        offset = 0
        if cache is not None:
            offset = cache.length
            if not cache.layers:
                cache.layers = [{"self": {}, "cross": {}} for _ in self.decoder.blocks]
        x = self.shared(decoder_input_ids)
        t, total = x.shape[1], offset + x.shape[1]
        # causal: the query at position offset+i sees keys 0 .. offset+i
        keep = torch.ones(1, 1, t, total, dtype=torch.bool, device=x.device).tril(diagonal=offset)
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
            h = h * self.config.d_model**-0.5  # Mesh TF rescale before a tied softmax
        weight = self.shared.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, weight)

    def forward(
        self, input_ids, attention_mask, decoder_input_ids, prompt=None, decoder_attention_mask=None
    ):
        encoded, encoded_mask = self.encode(input_ids, attention_mask, prompt)
        return self.decode(decoder_input_ids, encoded, encoded_mask, None, decoder_attention_mask)


def start_decoding(model, input_ids, attention_mask, prompt=None):
    """(step, reorder, state, start tokens): what decode.py's greedy and beam search take, with
    `prompt` prepended. The encoder runs once, here; each step feeds one token per row to the
    decoder, whose keys and values wait in the state's KV cache:

        step, reorder, state, start = model.start_decoding(t5, input_ids, attention_mask)
        ids = decode.generate(step, reorder, state, start, max_new_tokens, eos_id, pad_id)
    """
    hidden, mask = model.encode(input_ids, attention_mask, prompt)

    def step(tokens, state):  # the next token's logits, the cache grown by one position
        cache, hidden, mask = state
        return model.decode(tokens, hidden, mask, cache)[:, -1], state

    def reorder(state, rows, moved):  # an example's beams share its encoder output
        cache, hidden, mask = state
        cache.reorder(rows, moved)
        return (cache, hidden[rows], mask[rows]) if moved else state

    start = input_ids.new_full((input_ids.shape[0],), model.config.decoder_start_token_id)
    return step, reorder, (KVCache(), hidden, mask), start


def shift_right(labels, decoder_start_token_id=0, pad_token_id=0):
    """Teacher forcing input: [start, y_1, ..., y_{T-1}], ignored (-100) labels become pad."""
    shifted = labels.new_full(labels.shape, pad_token_id)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id)


def set_dropout(model, rate):
    """One dropout rate everywhere: the nn.Dropout modules and the attention-probability
    dropout that Attention passes to scaled_dot_product_attention as a float."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = rate
        elif isinstance(module, Attention):
            module.dropout = rate


# ----------------------------------------------------------------------------
# Checkpoints in the Hugging Face layout
#
# Our parameter names are readable (encoder.blocks.0.self_attn.q.weight); the
# public checkpoints use transformers' (encoder.block.0.layer.0.SelfAttention.q.weight).
# The two tables below are the whole translation.

_HF_SUBLAYERS = {
    "encoder": {
        "layer.0.SelfAttention": "self_attn",
        "layer.0.layer_norm": "self_norm",
        "layer.1.DenseReluDense": "ff",
        "layer.1.layer_norm": "ff_norm",
    },
    "decoder": {
        "layer.0.SelfAttention": "self_attn",
        "layer.0.layer_norm": "self_norm",
        "layer.1.EncDecAttention": "cross_attn",
        "layer.1.layer_norm": "cross_norm",
        "layer.2.DenseReluDense": "ff",
        "layer.2.layer_norm": "ff_norm",
    },
}
_HF_NAME = re.compile(r"(encoder|decoder)\.block\.(\d+)\.(layer\.\d\.\w+)\.(.+)")
_OUR_NAME = re.compile(r"(encoder|decoder)\.blocks\.(\d+)\.(\w+)\.(.+)")
# copies of shared.weight that some checkpoints also store
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


# A checkpoint folder holds config.json and its weights: model.safetensors, or the shards
# that model.safetensors.index.json maps each tensor name to (pytorch_model.bin and its
# index likewise). safetensors files are read one named tensor at a time, never whole.

WEIGHT_FILES = [
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
]


def checkpoint_files(path):
    """(weight files in reading order, {tensor name: file} from a sharded checkpoint's index
    or None for a single file) of a checkpoint folder; safetensors preferred."""
    if not os.path.isdir(path):
        raise BadInput(f"{path}: no such checkpoint directory")
    for single, index in WEIGHT_FILES:
        if os.path.exists(os.path.join(path, single)):
            return [os.path.join(path, single)], None
        index = os.path.join(path, index)
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = {
                        n: os.path.join(path, s) for n, s in json.load(f)["weight_map"].items()
                    }
            except (ValueError, KeyError, AttributeError, TypeError, RecursionError) as e:
                raise DamagedFile(f"{index}: expected JSON with a 'weight_map' ({e!r})") from None
            for file in weight_map.values():  # a shard is a file of this folder, not '../x' or '/x'
                if os.path.dirname(os.path.relpath(file, path)) or file == path:
                    raise DamagedFile(
                        f"{index}: weight_map names {os.path.relpath(file, path)!r}, "
                        "not a file of this folder"
                    )
            return list(dict.fromkeys(weight_map.values())), weight_map
    raise BadInput(
        f"{path}: found no weights; expected model.safetensors, model.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json"
    )


def read_file(file, names=None):
    """Yields (name, tensor) from one weights file, one tensor at a time (only `names` if given)."""
    if not os.path.exists(file):
        raise DamagedFile(f"{file}: listed in the checkpoint index but missing")
    if not file.endswith(".safetensors"):
        try:  # pytorch_model.bin: a pickle, read by promot's loader that never runs pickled code
            from support.hf_files import read_bin
        except ImportError:
            need = "needs promot's support/hf_files.py beside model.py"
            raise BadInput(f"{file}: reading pytorch_model.bin {need}") from None
        yield from read_bin(file, names)
        return
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if names is None or name in names:
                    yield name, f.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise DamagedFile(
            f"{file}: cannot read as safetensors ({e}); the file may be truncated or corrupted, "
            "download it again"
        ) from None


def read_tensors(path, names):
    """{name: tensor} for those of `names` the checkpoint holds; reads nothing else (a sharded
    checkpoint's index says which file holds each name, so only those files are opened)."""
    files, weight_map = checkpoint_files(path)
    wanted = {}
    for name in names:
        file = files[0] if weight_map is None else weight_map.get(name)
        if file is not None:
            wanted.setdefault(file, set()).add(name)
    return {name: t for file, these in wanted.items() for name, t in read_file(file, these)}


def build(config, device="meta"):
    """The model with uninitialised (meta) or default-initialised tensors on `device`."""
    with torch.device(device):
        return T5(config)


def read_embedding(path):
    """The input embedding table of a checkpoint directory, as stored, read without the rest."""
    for name in ("shared.weight", *_EMBED_ALIASES):
        found = read_tensors(path, [name])
        if found:
            return found[name]
    raise DamagedFile(f"{path}: no shared (input embedding) tensor")


def read_config(path):
    """The T5Config of a checkpoint directory, with the head untied when the tensors say so.

    transformers 5 writes tie_word_embeddings=true for every model but keeps a separate
    lm_head.weight when its values differ from the embedding; follow the tensors, not the
    flag. Only those two tensors are read.
    """
    config = T5Config.from_json(os.path.join(path, "config.json"))
    if config.tie_word_embeddings:
        head = read_tensors(path, ["lm_head.weight"]).get("lm_head.weight")
        if head is not None:
            embedding = read_embedding(path)
            if head.shape != embedding.shape or not torch.equal(head, embedding.to(head.dtype)):
                config.tie_word_embeddings = False
    return config


def _set_tensor(model, name, tensor):
    """Replaces a (meta) parameter by `tensor`, so loading allocates each tensor once."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    requires_grad = module._parameters[leaf].requires_grad
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=requires_grad)


@torch.no_grad()
def load_weights(model, path, copy=None, dtype=None, device=None):
    """Fills `model` (built from read_config(path)) from a checkpoint folder, tensor by tensor.

    Every parameter but the adapters (".lora.") must appear once with its shape; the tied
    head and the embed_tokens copies of the embedding are aliases. `copy(name, tensor)` puts
    each full tensor in place; the default swaps the meta parameter for the tensor cast to
    dtype/device, so peak memory is the model plus about one tensor in flight. (A sharded
    model passes a copy that keeps only its own slice.)
    """
    if copy is None:

        def copy(name, tensor):
            _set_tensor(model, name, tensor.to(device=device, dtype=dtype))

    config = model.config
    expected = {n: p.shape for n, p in model.named_parameters() if ".lora." not in n}
    loaded = set()
    files = checkpoint_files(path)[0]
    for hf_name, tensor, file in ((n, t, f) for f in files for n, t in read_file(f)):
        if hf_name == "lm_head.weight" and model.lm_head is None:
            continue  # tied: read_config found it equal to the embedding
        name = "shared.weight" if hf_name in _EMBED_ALIASES else hf_to_ours(hf_name)
        if name is None:
            raise DamagedFile(f"{file}: unexpected tensor {hf_name!r}; not a T5/mT5 weight")
        if name not in expected:
            raise DamagedFile(
                f"{file}: unexpected tensor {ours_to_hf(name)!r} for this config "
                f"(model_type={config.model_type}, layers={config.num_layers}/"
                f"{config.num_decoder_layers})"
            )
        if name in loaded:
            continue  # an embedding alias after shared.weight
        if tuple(tensor.shape) != tuple(expected[name]):
            raise DamagedFile(
                f"{file}: tensor {ours_to_hf(name)!r} has shape {tuple(tensor.shape)}; "
                f"config.json implies {tuple(expected[name])}"
            )
        copy(name, tensor)
        loaded.add(name)
    missing = [ours_to_hf(n) for n in expected if n not in loaded]
    if missing:
        raise DamagedFile(
            f"{path}: checkpoint lacks {len(missing)} tensor(s) the config needs, "
            f"e.g. {missing[:3]}"
        )
    return model


def load_pretrained(path, dtype=torch.float32, device="cpu"):
    """Reads a Hugging Face T5/mT5/UMT5 checkpoint directory into our model.

    The model is built on the meta device (no memory) and filled one tensor at
    a time, so peak memory is the model plus about one tensor in flight.
    """
    return load_weights(build(read_config(path), "meta"), path, dtype=dtype, device=device)


def save_pretrained(model, path, state_dict=None, max_shard_bytes=5 * 10**9):
    """Writes config.json + safetensors in the Hugging Face layout (sharded with an index above
    max_shard_bytes), replacing `path` only once complete and keeping its other files
    (spiece.model, a prompt); copied alone, into a new folder only. Pass `state_dict` (our
    names, full tensors) when the model is sharded. Adapters are not part of the model
    (support/lora.py saves them).
    """
    from safetensors.torch import save_file

    state = state_dict if state_dict is not None else model.state_dict()
    shards, size = [{}], 0  # fill each shard up to max_shard_bytes
    for name, t in ((ours_to_hf(n), t) for n, t in state.items() if ".lora." not in n):
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards, size = shards + [{}], 0
        shards[-1][name] = t.detach().cpu().contiguous()
        size += t.nbytes
    n = len(shards)
    files = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    weight_map = {name: file for file, shard in zip(files, shards) for name in shard}
    total = sum(t.nbytes for shard in shards for t in shard.values())

    def write(folder):
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
            json.dump(model.config.to_dict(), f, indent=2)
        for file, shard in zip(files if n > 1 else ["model.safetensors"], shards):
            save_file(shard, os.path.join(folder, file), metadata={"format": "pt"})
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2)

    try:  # swapped in for `path` once complete, keeping its other files
        from support.hf_files import replace_folder
    except ImportError:  # model.py copied alone
        replace_folder = write_new_folder
    replace_folder(path, write)


def write_new_folder(path, write):
    """Copied alone, model.py saves into a new folder only: replacing one, whole or not at all,
    is support/hf_files.py's `replace_folder`."""
    if os.path.exists(path):
        need = "needs promot's support/hf_files.py beside model.py"
        raise BadInput(f"{path}: exists; saving over a checkpoint folder {need}")
    os.makedirs(path)
    write(path)
