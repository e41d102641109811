"""Tiny end-to-end fixtures for the promot tests: a T5.1.1 checkpoint with its own
SentencePiece vocabulary, and a data folder with two generic JSONL tasks.

The tasks are learnable in a few steps: "toy_tf" answers True when the input
mentions a cat and False otherwise (a classification format like RTE's);
"toy_copy" repeats the last word (a free-text format). Both are registered by a
task.json, the generic layout data.py reads without code.
"""

import json
import os
import random
import shutil

WORDS = [
    "the",
    "cat",
    "dog",
    "sat",
    "on",
    "mat",
    "red",
    "blue",
    "big",
    "small",
    "True",
    "False",
    "question",
    "answer",
    "Q:",
    "A:",
    "hello",
    "world",
    "tree",
    "house",
]


def make_spiece(folder):
    from helpers import train_spiece

    os.makedirs(folder, exist_ok=True)
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(800)]
    train_spiece(folder, lines, 40, character_coverage=1.0)
    return os.path.join(folder, "spiece.model")


def make_model_dir(folder, spiece, kind="t5v1_1", **overrides):
    from helpers import make_checkpoint

    config = dict(
        vocab_size=140, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4
    )
    config.update(overrides)
    make_checkpoint(folder, kind=kind, **config)
    shutil.copy(spiece, os.path.join(folder, "spiece.model"))
    return folder


def make_data_dir(folder, n_train=48, n_val=12):
    rng = random.Random(1)
    os.makedirs(folder, exist_ok=True)

    def write(task, spec, make):
        d = os.path.join(folder, task)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "task.json"), "w") as f:
            json.dump(spec, f)
        for split, n in (("train", n_train), ("validation", n_val)):
            with open(os.path.join(d, f"{split}.jsonl"), "w") as f:
                for _ in range(n):
                    f.write(json.dumps(make()) + "\n")

    def tf():
        words = [rng.choice(WORDS[:10]) for _ in range(rng.randint(3, 8))]
        return {"input": " ".join(words), "target": "True" if "cat" in words else "False"}

    def copy():
        words = [rng.choice(WORDS[:10]) for _ in range(rng.randint(2, 6))]
        return {"input": " ".join(words), "target": words[-1]}

    write(
        "toy_tf",
        {
            "template": "{input} question: is there a cat? answer:",
            "metric": "accuracy",
            "label_words": ["True", "False"],
        },
        tf,
    )
    write(
        "toy_copy",
        {"template": "Q: last word of {input} A:", "metric": "exact_match", "prefix": "Q:"},
        copy,
    )
    return folder


def make_llama_dir(folder, **overrides):
    """A tiny random Llama checkpoint (transformers writes it) with a Llama-style SentencePiece
    tokenizer.model (unk 0, BOS 1, EOS 2) trained on the toy tasks' words, and Llama 2's
    tokenizer_config.json: a decoder-only model as the public ones are laid out (App. C.6)."""
    import sentencepiece
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    os.makedirs(folder, exist_ok=True)
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(800)]
    corpus = os.path.join(folder, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        f.write("\n".join(lines + ["?", ":"]))
    sentencepiece.SentencePieceTrainer.train(
        input=corpus,
        model_prefix=os.path.join(folder, "tokenizer"),
        vocab_size=60,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=False,
        character_coverage=1.0,
        minloglevel=2,
    )
    os.remove(corpus)
    os.remove(os.path.join(folder, "tokenizer.vocab"))
    special = {"__type": "AddedToken", "lstrip": False, "rstrip": False, "normalized": False}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "tokenizer_class": "LlamaTokenizer",
                "add_bos_token": True,
                "add_eos_token": False,
                "legacy": False,
                "bos_token": {**special, "content": "<s>"},
                "eos_token": {**special, "content": "</s>"},
                "unk_token": {**special, "content": "<unk>"},
                "pad_token": None,
            },
            f,
        )
    settings = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    settings.update(overrides)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**settings)).save_pretrained(folder)
    return folder
