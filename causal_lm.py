"""causal_lm.py: a Llama-family decoder-only model, written out by hand (the paper's App. C.6).

What ProMoT needs of a Llama, Mistral, Qwen2 or Qwen3 checkpoint: `CausalLMConfig` (from
config.json, transformers 4 or 5 spelling); RMS norm; rotary embeddings from one precomputed
table (Llama 3's scaling included); grouped-query attention that repeats keys only where heads
share them, with Qwen2's q/k/v biases, Qwen3's per-head q/k norms and Mistral's sliding window;
SwiGLU; a KV cache of plain (keys, values) pairs and `start_decoding`, the glue to decode.py;
soft-prompt placement (`prompt=`), the only change ProMoT needs; `load_pretrained` /
`save_pretrained` in the Hugging Face layout, whose tensor names are ours.

Where the prompt goes. `model(input_ids, attention_mask, prompt)` puts P right before each
row's first real token, and positions count from there: a left-padded row reads
[pads, P, x] with P at positions 0..p-1 and its tokens after, so its logits equal the row run
alone. (PEFT's prompt tuning puts the virtual tokens before the pads, huggingface/peft#1093
and #1212, so a row's output depends on the batch it sits in.) The output has p + L positions
in that order; for every row, logits[:, p + j] is the prediction after input_ids[:, j].

Copied alone it needs only torch and safetensors; training, data, search: promot, data, decode.
"""

import json
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

try:
    from support.errors import BadInput, DamagedFile
except ImportError:  # causal_lm.py copied alone
    BadInput = DamagedFile = ValueError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")  # LlamaForCausalLM, ... Qwen3ForCausalLM


# ---- Configuration ----


@dataclass
class CausalLMConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32  # fewer than the query heads: grouped-query attention
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama 3: factor, low/high_freq_factor, original_max_...
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Llama/Qwen3: biases on q, k, v and o
    mlp_bias: bool = False
    sliding_window: int | None = None  # a key further back than this is hidden
    layer_types: list = field(default_factory=list)  # "sliding_attention" or "full_attention"
    bos_token_id: int | list | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None

    @property
    def d_model(self):  # the width of a soft prompt's rows (T5's name for it)
        return self.hidden_size

    def window(self, layer):
        """The sliding window of a layer (Mistral: all; Qwen: those layer_types name), or None."""
        sliding = not self.layer_types or self.layer_types[layer] == "sliding_attention"
        return self.sliding_window if sliding else None

    @classmethod
    def from_dict(cls, d, source="config"):
        """Reads a Hugging Face config.json: rope settings as `rope_theta` + `rope_scaling`
        (transformers 4) or `rope_parameters` (transformers 5); `head_dim` when given."""
        if not isinstance(d, dict):
            raise BadInput(f"{source}: expected a JSON object, got {type(d).__name__}")
        kind = d.get("model_type")
        if kind not in SUPPORTED:
            raise BadInput(
                f"{source}: model_type {kind!r} is not supported; causal_lm.py reads "
                f"{', '.join(SUPPORTED)} checkpoints"
            )
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")
        bad = [k for k in sizes + ("num_attention_heads",) if type(d.get(k)) is not int or d[k] < 1]
        if bad or d.get("hidden_act", "silu") != "silu":
            raise BadInput(
                f"{source}: {bad or 'hidden_act'} missing or wrong; expected positive "
                "integers and hidden_act 'silu' (SwiGLU)"
            )
        kwargs = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and v is not None}
        kwargs.setdefault("num_key_value_heads", d["num_attention_heads"])
        kwargs.setdefault("head_dim", d["hidden_size"] // d["num_attention_heads"])
        if d["num_attention_heads"] % kwargs["num_key_value_heads"]:
            raise BadInput(f"{source}: num_attention_heads not a multiple of num_key_value_heads")
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        kwargs["rope_theta"] = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        kind_of_rope = rope.get("rope_type", rope.get("type", "default"))
        if kind_of_rope not in ("default", "llama3"):
            raise BadInput(f"{source}: rope type {kind_of_rope!r}; expected 'default' or 'llama3'")
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        if kind_of_rope == "llama3" and not set(keys) <= set(rope):
            raise BadInput(f"{source}: llama3 rope settings need {', '.join(keys)}")
        kwargs["rope_scaling"] = {k: rope[k] for k in keys} if kind_of_rope == "llama3" else None
        if kind in ("qwen2", "qwen3"):  # Qwen slides only with use_sliding_window, upper layers
            n, first = d["num_hidden_layers"], d.get("max_window_layers", 0)
            if not d.get("use_sliding_window"):
                kwargs.pop("sliding_window", None)
            sliding = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
            kwargs["layer_types"] = d.get("layer_types") or sliding
        else:
            kwargs.pop("layer_types", None)
        return cls(**kwargs)

    def to_dict(self):
        """The config.json that transformers (4.x and 5.x) reads back as this model."""
        rope = {"rope_type": "llama3", **self.rope_scaling} if self.rope_scaling else None
        d = asdict(self) | dict(
            architectures=[self.model_type.capitalize() + "ForCausalLM"],
            hidden_act="silu",
            rope_parameters={"rope_type": "default", **(rope or {}), "rope_theta": self.rope_theta},
            rope_scaling=rope,
        )
        if self.model_type in ("qwen2", "qwen3"):
            d["use_sliding_window"] = self.sliding_window is not None
        else:
            del d["layer_types"]
        return d


def read_config(path):
    """The CausalLMConfig of a checkpoint folder's config.json."""
    file = os.path.join(path, "config.json")
    try:
        with open(file, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise BadInput(f"{file}: no such file; a checkpoint folder needs a config.json") from None
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, nested too deeply
        raise DamagedFile(f"{file}: not valid JSON ({e})") from None
    return CausalLMConfig.from_dict(d, source=file)


# ---- Building blocks ----


class RMSNorm(nn.Module):
    """Scale only, no mean subtraction, statistics in fp32 (Llama's LlamaRMSNorm)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_table(config, device=None):
    """(2, max_position_embeddings, head_dim // 2): cos and sin of position * frequency, in fp32.

    Frequencies theta ** (-2i / head_dim) (RoFormer). Llama 3 slows those whose wavelength
    exceeds old / low_freq_factor by `factor`, keeps those under old / high_freq_factor and
    blends the band between (transformers' `_compute_llama3_parameters`).
    """
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    freq = 1.0 / config.rope_theta**exponents
    if config.rope_scaling:
        s = config.rope_scaling
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old, wavelength = s["original_max_position_embeddings"], 2 * torch.pi / freq
        slow = torch.where(wavelength > old / low, freq / factor, freq)
        smooth = (old / wavelength - low) / (high - low)
        middle = (wavelength >= old / high) & (wavelength <= old / low)
        freq = torch.where(middle, (1 - smooth) * slow / factor + smooth * slow, slow)
    angles = torch.outer(torch.arange(config.max_position_embeddings, device=device).float(), freq)
    return torch.stack([angles.cos(), angles.sin()])


def rotate(x, cos, sin):
    """Rotary embedding in transformers' layout: the two halves of each head form the pairs."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class Attention(nn.Module):
    """Grouped-query attention: num_key_value_heads heads of keys and values, each shared by
    num_attention_heads // num_key_value_heads query heads."""

    def __init__(self, cfg):
        super().__init__()
        H, K, D, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.heads, self.kv_heads, self.head_dim = H, K, D
        qwen2 = cfg.model_type == "qwen2"  # Qwen2: biases on q, k and v always, never on o
        qkv_bias, o_bias = cfg.attention_bias or qwen2, cfg.attention_bias and not qwen2
        self.q_proj = nn.Linear(d, H * D, bias=qkv_bias)
        self.k_proj = nn.Linear(d, K * D, bias=qkv_bias)
        self.v_proj = nn.Linear(d, K * D, bias=qkv_bias)
        self.o_proj = nn.Linear(H * D, d, bias=o_bias)
        if cfg.model_type == "qwen3":  # Qwen3 normalizes each head's queries and keys
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, past=None):
        """x: (B, T, d); cos, sin: (B, 1, T, head_dim); mask: additive, (B, 1, T, past + T).
        Returns the output and this layer's (keys, values) including `past`'s."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2).contiguous()
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate(q.transpose(1, 2), cos, sin), rotate(k.transpose(1, 2), cos, sin)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        kv, repeat = (k, v), self.heads // self.kv_heads
        if repeat > 1 and T == 1:  # decoding: key head h's query heads as its rows, no cache copy
            q = q.reshape(B, self.kv_heads, repeat, self.head_dim)
        elif repeat > 1:  # query heads h*repeat .. h*repeat + repeat - 1 share key head h
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # scale: head_dim**-0.5
        out = out.reshape(B, self.heads, T, self.head_dim)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1)), kv


class MLP(nn.Module):
    """SwiGLU (Shazeer, 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg):
        super().__init__()
        d, ff, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(d, ff, bias=bias)
        self.up_proj = nn.Linear(d, ff, bias=bias)
        self.down_proj = nn.Linear(ff, d, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    """Pre-norm residual block: attention, then the MLP."""

    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, past=None):
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class KVCache:
    """Per layer a plain (keys, values) pair, each (B, kv_heads, S, head_dim), and which of the
    S positions are real (B, S); positions are recounted from it, so pads never count."""

    def __init__(self, num_layers, batch, device=None):
        self.kv = [None] * num_layers
        self.mask = torch.zeros(batch, 0, dtype=torch.bool, device=device)

    def reorder(self, rows):
        """Keeps the batch rows `rows`, in that order (beam search; finished rows leaving)."""
        self.kv = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in self.kv]
        self.mask = self.mask[rows]


# ---- The model ----


class Decoder(nn.Module):
    """transformers' `model.` prefix: the embedding, the layers, the final norm."""

    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        tied = config.tie_word_embeddings  # a tied model's logits use the input embedding
        self.lm_head = None if tied else nn.Linear(config.hidden_size, config.vocab_size, False)
        self.register_buffer("rope", rope_table(config), persistent=False)

    def embed(self, input_ids, attention_mask, prompt=None):
        """Embeddings [pads; P; x] per row and their mask: P sits right before the row's first
        real token, so it holds that row's positions 0..p-1 whatever its padding."""
        embeds, real = self.model.embed_tokens(input_ids), attention_mask.bool()
        if prompt is None:
            return embeds, real
        B, L, d = embeds.shape
        prompt = prompt.to(embeds.dtype)
        prompt = prompt.unsqueeze(0).expand(B, -1, -1) if prompt.dim() == 2 else prompt
        if prompt.dim() != 3 or prompt.shape[0] != B or prompt.shape[2] != d:
            raise BadInput(
                f"prompt has shape {tuple(prompt.shape)}; expected (p, {d}) or ({B}, p, {d})"
            )
        p = prompt.shape[1]
        lead = (real.long().cumsum(1) == 0).sum(1, keepdim=True)  # leading pads of each row
        i = torch.arange(p + L, device=embeds.device)[None, :]
        # index into cat([P, x]): a leading pad, then P, then the tokens after the pads
        source = torch.where(i < lead, i + p, torch.where(i < lead + p, i - lead, i))
        both = torch.cat([prompt, embeds], dim=1)
        placed = both.gather(1, source[:, :, None].expand(-1, -1, d))
        mask = torch.cat([real.new_ones(B, p), real], dim=1).gather(1, source)
        return placed, mask

    def run(self, x, mask, cache=None):
        """Final hidden states of the new positions x (B, T, d), whose real ones `mask` (B, T)
        marks. With a cache, x continues the cached positions and the cache grows by T."""
        T = x.shape[1]
        keys = mask if cache is None else torch.cat([cache.mask, mask], dim=1)
        positions = (keys.long().cumsum(1) - 1).clamp(min=0)  # pads don't count (left padding)
        if int(positions.max()) >= self.rope.shape[1]:
            raise BadInput(f"{int(positions.max()) + 1} positions exceed max_position_embeddings")
        cos, sin = (
            torch.cat([t, t], -1)[:, None].to(x.dtype) for t in self.rope[:, positions[:, -T:]]
        )
        masks = self.attention_masks(keys, positions, T, x.dtype)
        kv = [None] * len(self.model.layers) if cache is None else cache.kv  # grows in place
        for i, layer in enumerate(self.model.layers):
            x, kv[i] = layer(x, cos, sin, masks[self.config.window(i)], kv[i])
        if cache is not None:
            cache.mask = keys
        return self.model.norm(x)

    def attention_masks(self, keys, positions, T, dtype):
        """{window: additive (B, 1, T, S) mask} for the windows the layers use (None: none).
        A query sees the real keys at or before it, and within the window when one is set."""
        S = keys.shape[1]
        keep = torch.ones(T, S, dtype=torch.bool, device=keys.device).tril(S - T) & keys[:, None]
        distance = positions[:, -T:, None] - positions[:, None, :]
        windows = {self.config.window(i) for i in range(len(self.model.layers))}
        seen = {w: keep if w is None else keep & (distance < w) for w in windows}
        hidden = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=keys.device)
        return {w: torch.where(m, 0.0, hidden)[:, None] for w, m in seen.items()}

    def logits(self, hidden):
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)

    def forward(self, input_ids, attention_mask, prompt=None, keep=None):
        """(B, p + L, V) logits over [P; x], P placed per row as the module docstring says; with
        `keep`, a (B, p + L) bool mask (a loss's positions), only those: (kept, V)."""
        hidden = self.run(*self.embed(input_ids, attention_mask, prompt))
        return self.logits(hidden if keep is None else hidden[keep])


def start_decoding(model, input_ids, attention_mask, prompt=None):
    """(step, reorder, state, start) for decode.generate: [P; x] is read but its last token, each
    row's start token. Rows are left-padded (last token real); each decodes as it would alone."""
    if not attention_mask[:, -1].all():
        raise BadInput("decoding needs left-padded rows: each row's last token must be real")
    cache = KVCache(len(model.model.layers), input_ids.shape[0], input_ids.device)
    x, mask = model.embed(input_ids[:, :-1], attention_mask[:, :-1], prompt)
    if x.shape[1]:
        model.run(x, mask, cache)

    def step(tokens, cache):
        hidden = model.run(*model.embed(tokens, torch.ones_like(tokens)), cache)
        return model.logits(hidden[:, -1]), cache

    def reorder(cache, rows, moved):  # every state row belongs to one beam: all move
        cache.reorder(rows)
        return cache

    return step, reorder, cache, input_ids[:, -1]


# ---- Checkpoints in the Hugging Face layout (our parameter names are transformers') ----

SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")


def checkpoint_files(path):
    """The weight files of a checkpoint folder: model.safetensors, or the shards its index names."""
    single, index = (os.path.join(path, f) for f in SAFETENSORS)
    if os.path.exists(single) or not os.path.exists(index):
        return [single]
    try:
        with open(index, encoding="utf-8") as f:
            shards = list(dict.fromkeys(json.load(f)["weight_map"].values()))
    except (ValueError, KeyError, AttributeError, TypeError, RecursionError) as e:
        raise DamagedFile(f"{index}: expected JSON with a 'weight_map' ({e!r})") from None
    for shard in shards:  # a shard is a file of this folder, not '../x' or '/x'
        if not isinstance(shard, str) or os.path.basename(shard) != shard:
            raise DamagedFile(f"{index}: weight_map names {shard!r}, not a file of this folder")
    return [os.path.join(path, shard) for shard in shards]


def read_file(file):
    """Yields (name, tensor) from one safetensors file, one tensor at a time."""
    from safetensors import SafetensorError, safe_open

    if not os.path.exists(file):
        raise BadInput(f"{file}: no such file; expected {' or '.join(SAFETENSORS)} beside it")
    try:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise DamagedFile(f"{file}: cannot read as safetensors ({e})") from None


def build(config, device="meta"):
    """The model with uninitialised (meta) or default-initialised tensors on `device`. Once a
    meta model is materialized, set `model.rope = rope_table(config, device)` (a computed
    buffer, in no checkpoint); load_pretrained does."""
    with torch.device(device):
        return CausalLM(config)


@torch.no_grad()
def load_weights(model, path, copy):
    """Fills `model` (on meta) one tensor at a time, each checked by name and shape, then put in
    place by `copy(name, tensor)`: a new parameter, or under FSDP2 this rank's slice of it."""
    expected, loaded = dict(model.named_parameters()), set()
    for file in checkpoint_files(path):
        for name, tensor in read_file(file):
            if name == "lm_head.weight" and model.lm_head is None:  # tied, yet a head is stored
                model.lm_head = nn.Linear(model.config.hidden_size, model.config.vocab_size, False)
                expected[name] = model.lm_head.weight
            if name not in expected:
                raise DamagedFile(
                    f"{file}: unexpected tensor {name!r} for a {model.config.model_type} config"
                )
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise DamagedFile(
                    f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}; config.json "
                    f"implies {tuple(expected[name].shape)}"
                )
            copy(name, tensor)
            loaded.add(name)
    missing = [n for n in expected if n not in loaded]
    if missing:
        raise DamagedFile(f"{path}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}")


def load_pretrained(path, dtype=torch.float32, device="cpu"):
    """A checkpoint folder read into our model (load_weights): 8B params in 16 GB of bf16."""
    config = read_config(path)
    model = build(config, "meta")

    def put(name, tensor):
        module_name, _, leaf = name.rpartition(".")
        parameter = nn.Parameter(tensor.to(device=device, dtype=dtype))
        model.get_submodule(module_name)._parameters[leaf] = parameter

    load_weights(model, path, put)
    config.tie_word_embeddings = model.lm_head is None  # a stored head wins, as in transformers
    model.rope = rope_table(config, device)
    return model


def read_embedding(path):
    """The input embedding table, read from the checkpoint's files (and the tensors before it)."""
    files = checkpoint_files(path)
    return next(t for f in files for n, t in read_file(f) if n == "model.embed_tokens.weight")


def save_pretrained(model, path, state_dict=None):
    """Writes config.json + model.safetensors that transformers' AutoModelForCausalLM reads
    back with the same logits (a tied model stores no lm_head.weight). Pass `state_dict` (full
    tensors) when the model is sharded."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    state = model.state_dict() if state_dict is None else state_dict
    state = {name: t.detach().cpu().contiguous() for name, t in state.items()}
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(model.config.to_dict(), f, indent=2)
