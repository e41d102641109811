"""Tiny checkpoints in the public Hugging Face layout, made with transformers (the oracle).

`make_checkpoint` writes config.json and the tensors itself, the way the public
checkpoints on the hub are laid out (T5.1.1/mT5: `tie_word_embeddings: false`
and a separate lm_head.weight), because transformers 5 rewrites those keys
when it saves. Layer norms get random scales so that a loader that forgot one
would be caught.
"""

import json
import os

import torch

CONFIGS = {
    # T5 v1.0: ReLU, tied embeddings, logits rescaled
    "t5": dict(model_type="t5", feed_forward_proj="relu", tie_word_embeddings=True),
    # T5.1.1: gated GELU, separate head
    "t5v1_1": dict(model_type="t5", feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "mt5": dict(model_type="mt5", feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "umt5": dict(model_type="umt5", feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}
BASE = dict(
    vocab_size=96,
    d_model=32,
    d_kv=8,
    d_ff=48,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.1,
    layer_norm_epsilon=1e-6,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)


def oracle_model(config):
    """A transformers model with random weights for a public-style config dict."""
    import transformers

    cls = {
        "t5": (transformers.T5Config, transformers.T5ForConditionalGeneration),
        "mt5": (transformers.MT5Config, transformers.MT5ForConditionalGeneration),
        "umt5": (transformers.UMT5Config, transformers.UMT5ForConditionalGeneration),
    }[config["model_type"]]
    kwargs = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    return cls[1](cls[0](**kwargs)).eval()


def make_checkpoint(path, kind="t5v1_1", seed=0, layout="safetensors", **overrides):
    """Writes a random tiny checkpoint; returns its config dict. layout: safetensors | sharded | bin | sharded_bin."""
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    config = {**BASE, **CONFIGS[kind], **overrides}
    config["architectures"] = [
        {"t5": "T5", "mt5": "MT5", "umt5": "UMT5"}[config["model_type"]]
        + "ForConditionalGeneration"
    ]
    state = oracle_model(config).state_dict()
    for name in state:
        if "layer_norm" in name:
            state[name] = 1.0 + 0.2 * torch.randn_like(state[name])
    state = {k: v.clone().contiguous() for k, v in state.items()}
    if config["tie_word_embeddings"]:
        state.pop("lm_head.weight", None)  # tied: the head is the embedding
    else:
        state["lm_head.weight"] = (
            torch.randn_like(state["lm_head.weight"]) * config["d_model"] ** -0.5
        )
    state.pop("encoder.embed_tokens.weight", None)
    state.pop("decoder.embed_tokens.weight", None)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    if layout in ("safetensors", "bin"):
        if layout == "safetensors":
            save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        else:
            torch.save(state, os.path.join(path, "pytorch_model.bin"))
    else:
        names = sorted(state)
        halves = [names[: len(names) // 2], names[len(names) // 2 :]]
        ext = "safetensors" if layout == "sharded" else "bin"
        prefix = "model" if ext == "safetensors" else "pytorch_model"
        weight_map = {}
        for i, part in enumerate(halves):
            file = f"{prefix}-{i + 1:05d}-of-00002.{ext}"
            shard = {n: state[n] for n in part}
            if ext == "safetensors":
                save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
            else:
                torch.save(shard, os.path.join(path, file))
            weight_map.update(dict.fromkeys(part, file))
        index = f"{prefix}.{ext}.index.json"
        with open(os.path.join(path, index), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return config


def load_oracle(path):
    """The checkpoint as transformers reads it."""
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_pretrained(path).eval()


def random_batch(vocab_size, batch=3, src_len=11, tgt_len=7, seed=1, pad_rows=True):
    """Token ids with padded rows (EOS at the end of each real sequence)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab_size, (batch, src_len), generator=g)
    mask = torch.ones(batch, src_len, dtype=torch.long)
    if pad_rows:
        for row in range(1, batch):
            keep = src_len - 2 * row
            mask[row, keep:] = 0
            ids[row, keep:] = 0
            ids[row, keep - 1] = 1
    dec = torch.randint(2, vocab_size, (batch, tgt_len), generator=g)
    dec[:, 0] = 0
    return ids, mask, dec


def train_spiece(folder, lines, vocab_size, **options):
    """A unigram SentencePiece model with T5's ids (pad 0, EOS 1, UNK 2, no BOS), trained on
    `lines` (written to FOLDER/corpus.txt) into FOLDER/spiece.model; returns that path."""
    import sentencepiece

    corpus = os.path.join(folder, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    sentencepiece.SentencePieceTrainer.train(
        input=corpus,
        model_prefix=os.path.join(folder, "spiece"),
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
        **options,
    )
    return os.path.join(folder, "spiece.model")
