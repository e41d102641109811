"""model.py: the T5 encoder-decoder, written out by hand.

One file holds everything a reader needs to understand T5 (v1.0), T5.1.1,
mT5 and UMT5 and to run them on the public checkpoints:

- `T5Config`, read from a checkpoint's `config.json`;
- the network: RMS norm, relative position buckets, attention (with a KV cache
  for incremental decoding), the ReLU / gated-GELU feed-forward, the stacks;
- soft-prompt prepending (`prompt=`), the only change ProMoT needs, and the
  prompt file (`read_prompts` / `save_prompts`);
- `cross_entropy` with T5X's label smoothing and z-loss, and `shift_right`;
- `load_pretrained` / `save_pretrained` in the Hugging Face layout, so a
  fine-tuned model goes back to the tools that made the checkpoint: the
  translation between their parameter names and ours, and the tied-head rule.

Plumbing lives in support/: LoRA adapters, the paper's alternative stage-1
module (App. C.7), attach to the attention layers from outside
(support/lora.py); finding, streaming and writing checkpoint files is
support/hf_files.py. Training loops, data and decoding live in promot.py,
data.py and evaluate.py.

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

from support import hf_files
from support.hf_files import CheckpointError  # what every loading error here raises


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
        if not isinstance(d, dict):
            raise CheckpointError(f"{source}: expected a JSON object, got {type(d).__name__}")
        known = {f.name: f.type for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known and v is not None}
        for key, value in kwargs.items():  # a string "128" or a float layer count would fail deep inside
            kind = known[key]
            ok = type(value) is kind if kind is not float else type(value) in (int, float)
            if not ok or (kind is int and value < 0) or (kind is float and not 0 <= value < float("inf")):
                expected = {int: "a non-negative integer", float: "a non-negative number", bool: "true or false",
                            str: "a string"}[kind]
                raise CheckpointError(f"{source}: {key} is {value!r}; expected {expected}")
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

    def position_bias(self, query_len, key_len, offset=0):
        """(1, heads, query_len, key_len) bias; queries sit at offset, offset+1, ..."""
        device = self.relative_attention_bias.weight.device
        query_pos = torch.arange(offset, offset + query_len, device=device)[:, None]
        key_pos = torch.arange(key_len, device=device)[None, :]
        buckets = relative_position_bucket(key_pos - query_pos, self.bidirectional, self.num_buckets, self.max_distance)
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

    def reorder(self, index, sources=False):
        """Keeps the batch rows given by `index`, in that order (beam search).

        The self-attention entries move at every call. The cross-attention keys
        and the source mask move only with `sources=True`: beam search picks rows
        among the beams of the same source, which share them, except when it
        drops the rows of finished examples.
        """
        for layer in self.layers:
            for entry in (layer["self"], layer["cross"]) if sources else (layer["self"],):
                for key in list(entry):
                    entry[key] = entry[key].index_select(0, index)
        if sources and self.source_mask is not None:
            self.source_mask = self.source_mask.index_select(0, index)


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


def set_dropout(model, rate):
    """One dropout rate everywhere: the nn.Dropout modules and the attention-probability
    dropout that Attention passes to scaled_dot_product_attention as a float."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = rate
        elif isinstance(module, Attention):
            module.dropout = rate


# ----------------------------------------------------------------------------
# Soft-prompt files: the prompt is model state, saved next to the checkpoint


def read_prompts(path, d_model=None, tasks=None, length=None):
    """{task: (p, d_model) fp32 prompt} from a prompt file.

    Reads what save_prompts writes (prompt.safetensors: `prompt.<task>` per task,
    plus `prompt` when it holds one task) or a T5X `.npy` array, which counts as
    the key `prompt`. `tasks` defaults to the tasks the `prompt.<task>` keys
    name; a requested task without its own key gets `prompt`. `d_model` and
    `length`, when given, are checked against each prompt's shape.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such prompt file")
    try:
        if str(path).endswith(".npy"):
            import numpy
            tensors = {"prompt": torch.from_numpy(numpy.load(path, allow_pickle=False))}
        else:
            from safetensors.torch import load_file
            tensors = load_file(path)
    except Exception as e:  # safetensors and numpy raise several types for a bad file
        raise CheckpointError(f"{path}: cannot read a prompt ({e})") from None
    if tasks is None:
        tasks = [key[len("prompt."):] for key in tensors if key.startswith("prompt.")]
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    if not tasks:
        raise CheckpointError(f"{path}: the file does not say which task its prompt was trained on "
                              "(no 'prompt.<task>' key); pass --task")
    prompts = {}
    for task in tasks:
        key = f"prompt.{task}" if f"prompt.{task}" in tensors else "prompt"
        if key not in tensors:
            raise CheckpointError(f"{path}: no tensor 'prompt.{task}' or 'prompt'; found {sorted(tensors)}")
        prompt = tensors[key].float()
        if prompt.dim() != 2 or (d_model is not None and prompt.shape[1] != d_model):
            need = f"(p, {d_model}) (d_model = {d_model})" if d_model is not None else "a 2-D (p, d_model) array"
            raise CheckpointError(f"{path}: prompt {key!r} has shape {tuple(prompt.shape)}; the model needs {need}")
        if not torch.isfinite(prompt).all():
            raise CheckpointError(f"{path}: prompt {key!r} holds NaN or inf values")
        if length is not None and prompt.shape[0] != length:
            raise CheckpointError(f"{path}: prompt {key!r} has length {prompt.shape[0]}; --prompt-length is {length}")
        prompts[task] = prompt
    return prompts


def save_prompts(prompts, path):
    """Writes {task: prompt} as `prompt.<task>` (plus `prompt` for a single task) at `path`;
    the metadata lists the tasks. The caller makes the write atomic."""
    from safetensors.torch import save_file
    tensors = {f"prompt.{task}": t.detach().float().cpu().contiguous() for task, t in prompts.items()}
    if len(prompts) == 1:
        tensors["prompt"] = next(iter(tensors.values())).clone()
    save_file(tensors, path, metadata={"tasks": ",".join(prompts)})


# ----------------------------------------------------------------------------
# The training loss


def shift_right(labels, decoder_start_token_id=0, pad_token_id=0):
    """Teacher forcing input: [start, y_1, ..., y_{T-1}], ignored (-100) labels become pad."""
    shifted = labels.new_full(labels.shape, pad_token_id)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = decoder_start_token_id
    return shifted.masked_fill(shifted == -100, pad_token_id)


def cross_entropy(logits, labels, label_smoothing=0.0, z_loss=0.0):
    """Token cross-entropy as T5X computes it, plus its z-loss; returns (sum over tokens, token count).

    Label smoothing follows T5X (`compute_weighted_cross_entropy`): the target
    gets 1 - s, every other token s / (V - 1), and the entropy of that target
    distribution is subtracted so a perfect prediction scores 0. (PyTorch's
    built-in smoothing spreads s over all V tokens, the target included.)
    T5X's z-loss adds z_loss * logsumexp(logits)^2 per token, pulling the
    softmax normaliser towards 1. Labels equal to -100 are ignored. Returning
    the sum lets a trainer divide by the token count of the whole global batch.
    """
    keep = labels != -100
    return T5XCrossEntropy.apply(logits, labels.masked_fill(~keep, 0), keep, label_smoothing, z_loss), keep.sum()


class T5XCrossEntropy(torch.autograd.Function):
    """The loss of `cross_entropy` and its gradient written out, as T5X's
    `cross_entropy_with_logits` does, so the (B, T, V) logits see one exp pass in all.

    With lse = logsumexp(logits), on = 1 - s and off = s / (V - 1) (so on + (V-1)*off = 1),
    per kept token:
        loss            = lse - (on - off) * logits[target] - off * sum(logits) - entropy + z_loss * lse^2
        d loss/d logits = softmax(logits) * (1 + 2 * z_loss * lse) - off - (on - off) * onehot(target)
    log_softmax, a second logsumexp for the z-loss and their autograd took several
    passes over the logits for the same numbers (this form is also closer to float64).
    """

    @staticmethod
    def forward(ctx, logits, target, keep, label_smoothing, z_loss):
        vocab = logits.shape[-1]
        on, off = 1.0 - label_smoothing, label_smoothing / (vocab - 1)
        x = logits.float()
        top = x.amax(-1, keepdim=True)
        e = torch.sub(x, top).exp_()  # softmax = e / total, kept for backward
        total = e.sum(-1)
        lse = total.log() + top.squeeze(-1)
        loss = lse - (on - off) * x.gather(-1, target[..., None]).squeeze(-1) + z_loss * lse.square()
        if label_smoothing > 0:
            entropy = -(on * math.log(on) + (vocab - 1) * off * math.log(off + 1e-20))
            loss = loss - off * x.sum(-1) - entropy
        ctx.save_for_backward(e, total, lse, target, keep)
        ctx.constants = on, off, z_loss, logits.dtype
        return (loss * keep).sum()

    @staticmethod
    def backward(ctx, grad):
        e, total, lse, target, keep = ctx.saved_tensors
        on, off, z_loss, dtype = ctx.constants
        weight = keep * grad  # d(sum)/d(token loss)
        g = e * (weight * (1 + 2 * z_loss * lse) / total)[..., None]
        if off:
            g.sub_((off * weight)[..., None])
        g.scatter_add_(-1, target[..., None], (-(on - off) * weight)[..., None])
        return g.to(dtype), None, None, None, None


# ----------------------------------------------------------------------------
# Checkpoints in the Hugging Face layout
#
# Our parameter names are readable (encoder.blocks.0.self_attn.q.weight); the
# public checkpoints use transformers' (encoder.block.0.layer.0.SelfAttention.q.weight).
# The two tables below are the whole translation. Finding, reading and writing
# the files is support/hf_files.py's job.

_HF_SUBLAYERS = {
    "encoder": {"layer.0.SelfAttention": "self_attn", "layer.0.layer_norm": "self_norm",
                "layer.1.DenseReluDense": "ff", "layer.1.layer_norm": "ff_norm"},
    "decoder": {"layer.0.SelfAttention": "self_attn", "layer.0.layer_norm": "self_norm",
                "layer.1.EncDecAttention": "cross_attn", "layer.1.layer_norm": "cross_norm",
                "layer.2.DenseReluDense": "ff", "layer.2.layer_norm": "ff_norm"},
}
_HF_NAME = re.compile(r"(encoder|decoder)\.block\.(\d+)\.(layer\.\d\.\w+)\.(.+)")
_OUR_NAME = re.compile(r"(encoder|decoder)\.blocks\.(\d+)\.(\w+)\.(.+)")
_EMBED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")  # copies of shared.weight


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


def read_embedding(path):
    """The input embedding table of a checkpoint directory, as stored, read without the rest."""
    for name in ("shared.weight", *_EMBED_ALIASES):
        found = hf_files.read_tensors(path, [name])
        if found:
            return found[name]
    raise CheckpointError(f"{path}: no shared (input embedding) tensor")


def read_config(path):
    """The T5Config of a checkpoint directory, with the head untied when the tensors say so.

    transformers 5 writes tie_word_embeddings=true for every model but keeps a
    separate lm_head.weight when its values differ from the embedding; follow
    the tensors, not the flag. Only those two tensors are read.
    """
    config = T5Config.from_json(os.path.join(path, "config.json"))
    if config.tie_word_embeddings:
        head = hf_files.read_tensors(path, ["lm_head.weight"]).get("lm_head.weight")
        if head is not None:
            embedding = read_embedding(path)
            if head.shape != embedding.shape or not torch.equal(head, embedding.to(head.dtype)):
                config.tie_word_embeddings = False
    return config


def _set_tensor(model, name, tensor):
    """Replaces a (meta) parameter by `tensor`, so loading allocates each tensor once."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[leaf] = nn.Parameter(tensor, requires_grad=module._parameters[leaf].requires_grad)


@torch.no_grad()
def load_weights(model, path, copy=None, dtype=None, device=None):
    """Fills `model` (built from read_config(path)) from a checkpoint directory, one tensor at a time.

    Every parameter but the adapters (".lora.") must appear once with its
    shape; the tied head and the embed_tokens copies of the embedding are
    aliases. `copy(name, tensor)` puts each full tensor in place; the default
    swaps the meta parameter for the tensor cast to dtype/device, so peak
    memory is the model plus about one tensor in flight. (A sharded model
    passes a copy that keeps only its own slice.)
    """
    if copy is None:
        def copy(name, tensor):
            _set_tensor(model, name, tensor.to(device=device, dtype=dtype))
    config = model.config
    expected = {n: p.shape for n, p in model.named_parameters() if ".lora." not in n}
    loaded = set()
    for hf_name, tensor, file in hf_files.stream_tensors(path):
        if hf_name == "lm_head.weight" and model.lm_head is None:
            continue  # tied: read_config found it equal to the embedding
        name = "shared.weight" if hf_name in _EMBED_ALIASES else hf_to_ours(hf_name)
        if name is None:
            raise CheckpointError(f"{file}: unexpected tensor {hf_name!r}; not a T5/mT5 weight")
        if name not in expected:
            raise CheckpointError(f"{file}: unexpected tensor {ours_to_hf(name)!r} for this config "
                                  f"(model_type={config.model_type}, layers={config.num_layers}/"
                                  f"{config.num_decoder_layers})")
        if name in loaded:
            continue  # an embedding alias after shared.weight
        if tuple(tensor.shape) != tuple(expected[name]):
            raise CheckpointError(f"{file}: tensor {ours_to_hf(name)!r} has shape {tuple(tensor.shape)}; "
                                  f"config.json implies {tuple(expected[name])}")
        copy(name, tensor)
        loaded.add(name)
    missing = [ours_to_hf(n) for n in expected if n not in loaded]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {len(missing)} tensor(s) the config needs, "
                              f"e.g. {missing[:3]}")
    return model


def load_pretrained(path, dtype=torch.float32, device="cpu"):
    """Reads a Hugging Face T5/mT5/UMT5 checkpoint directory into our model.

    The model is built on the meta device (no memory) and filled one tensor at
    a time, so peak memory is the model plus about one tensor in flight.
    """
    return load_weights(build(read_config(path), "meta"), path, dtype=dtype, device=device)


def save_pretrained(model, path, state_dict=None, max_shard_bytes=5 * 10**9):
    """Writes config.json + safetensors in the Hugging Face layout (sharded with an
    index above max_shard_bytes), replacing `path` only once complete; other
    files of an existing directory (spiece.model, a prompt) are kept.
    Pass `state_dict` (our names, full tensors) when the model is sharded.
    Adapters are not part of the model (support/lora.py saves them).
    """
    state = state_dict if state_dict is not None else model.state_dict()
    tensors = {ours_to_hf(n): t for n, t in state.items() if ".lora." not in n}
    hf_files.write_checkpoint(path, model.config.to_dict(), tensors, max_shard_bytes)
