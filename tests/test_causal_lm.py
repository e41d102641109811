"""causal_lm.py against transformers (the oracle) on tiny random Llama, Mistral, Qwen2 and Qwen3
checkpoints that transformers writes: logits with a soft prompt (transformers given
`inputs_embeds=[P; embed(x)]`), greedy and beam decoding (`generate`), left-padded rows (each
equal to the row run alone in transformers), saving, and the architectures it refuses."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import causal_lm
import decode

VOCAB, HIDDEN, EOS = 100, 32, 2
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.2,  # peaked logits: no near-ties for beam search to break differently
    bos_token_id=1,
    eos_token_id=EOS,
    pad_token_id=0,
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,  # with theta 500 every band of the scaling is used
    rope_theta=500.0,
)
# Every feature the issue lists, each in a model of its own; sequences below are longer than
# the sliding windows (Mistral: every layer; Qwen2: the layers from max_window_layers on).
KINDS = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False)),
    "llama3_tied_biases": (
        "LlamaConfig",
        dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True, attention_bias=True),
    ),
    "mistral_window": ("MistralConfig", dict(sliding_window=5, tie_word_embeddings=False)),
    "qwen2_tied_window": (
        "Qwen2Config",
        dict(
            tie_word_embeddings=True, use_sliding_window=True, sliding_window=4, max_window_layers=1
        ),
    ),
    "qwen3_head_dim": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=False)),
}


def make_causal_checkpoint(path, kind="llama", layout="single", seed=0):
    """A random tiny checkpoint written by transformers' save_pretrained (sharded: several
    files and an index). Norm scales and biases are random so that a loader that dropped one
    would be caught; EOS's output row is the sum of three others', so beams end at different
    lengths instead of always running to max_new_tokens."""
    import transformers

    config_class, overrides = KINDS[kind]
    torch.manual_seed(seed)
    config = getattr(transformers, config_class)(**TINY, **overrides)
    oracle = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in oracle.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
        head = oracle.get_output_embeddings().weight
        head[EOS] = head[5] + head[6] + head[7]
    shard = dict(max_shard_size="20KB") if layout == "sharded" else {}
    oracle.save_pretrained(path, **shard)
    return path


def load_oracle(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal")
    return {
        (kind, layout): str(make_causal_checkpoint(root / f"{kind}-{layout}", kind, layout))
        for kind in KINDS
        for layout in ("single", "sharded")
    }


def tokens(batch, length, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def prompt_of(length=3, seed=2):
    return torch.randn(length, HIDDEN, generator=torch.Generator().manual_seed(seed))


def oracle_logits(oracle, prompt, ids):
    """transformers' logits over [P; embed(x)], every position real."""
    prompt = prompt.expand(ids.shape[0], -1, -1) if prompt.dim() == 2 else prompt
    embeds = torch.cat([prompt, oracle.get_input_embeddings()(ids)], dim=1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    return oracle(inputs_embeds=embeds, attention_mask=mask).logits


def up_to_eos(ids):
    """Each row as a list, cut after its first EOS (the two sides pad differently after it)."""
    rows = [row.tolist() for row in ids]
    return [row[: row.index(EOS) + 1] if EOS in row else row for row in rows]


def our_generate(model, ids, mask, prompt, num_beams, max_new_tokens=12):
    step, reorder, state, start = causal_lm.start_decoding(model, ids, mask, prompt)
    rule = dict(num_beams=num_beams, length_penalty=1.0, length_rule="transformers")
    return decode.generate(step, reorder, state, start, max_new_tokens, EOS, 0, **rule)


def oracle_generate(oracle, ids, prompt, num_beams, max_new_tokens=12):
    """transformers' generate: with a prompt from inputs_embeds=[P; embed(x)] (it returns the
    new tokens only), without one from input_ids (it returns the input too: cut off)."""
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=num_beams,
        length_penalty=1.0,
        early_stopping=False,
        eos_token_id=EOS,
        pad_token_id=0,
    )
    if prompt is None:
        mask = torch.ones_like(ids)
        return oracle.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1] :]
    embeds = torch.cat([prompt.expand(ids.shape[0], -1, -1), oracle.get_input_embeddings()(ids)], 1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long)
    return oracle.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)


@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_logits_with_a_prompt_equal_transformers_given_prepended_embeddings(
    checkpoints, kind, layout
):
    path = checkpoints[kind, layout]
    if layout == "sharded":
        assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    ours, oracle = causal_lm.load_pretrained(path), load_oracle(path)
    ids = tokens(2, 9)
    shared, per_row = prompt_of(), torch.randn(2, 3, HIDDEN)  # (p, d) and (B, p, d)
    for prompt in (shared, per_row):
        got = ours(ids, torch.ones_like(ids), prompt=prompt)
        assert got.shape == (2, 3 + 9, VOCAB)
        assert (got - oracle_logits(oracle, prompt, ids)).abs().max() < 1e-4
    no_prompt = oracle(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert (ours(ids, torch.ones_like(ids)) - no_prompt).abs().max() < 1e-4


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_padded_rows_give_the_logits_of_each_row_alone_in_transformers(checkpoints, kind):
    """Left padding (decoding) and right padding (training): the prompt sits before each row's
    first real token and counts its positions from there, so a row's logits do not depend on
    its batch (PEFT's placement before the pads would fail this)."""
    path = checkpoints[kind, "single"]
    ours, oracle = causal_lm.load_pretrained(path), load_oracle(path)
    ids, prompt, p, lengths = tokens(3, 10), prompt_of(), 3, [10, 6, 3]
    for side in ("left", "right"):
        real = [slice(10 - n, 10) if side == "left" else slice(0, n) for n in lengths]
        mask = torch.zeros_like(ids)
        for row, tokens_of_row in enumerate(real):
            mask[row, tokens_of_row] = 1
        got = ours(ids, mask, prompt=prompt)
        for row, tokens_of_row in enumerate(real):
            alone = oracle_logits(oracle, prompt, ids[row : row + 1, tokens_of_row])[0]
            # left: [pads; P; x], P and x the last p + n positions; right: [P; x; pads]
            n = lengths[row]
            mine = got[row, 10 - n :] if side == "left" else got[row, : p + n]
            assert (mine - alone).abs().max() < 1e-4, (side, row)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_greedy_and_beam_tokens_equal_transformers_generate(checkpoints, kind):
    path = checkpoints[kind, "sharded"]
    ours, oracle = causal_lm.load_pretrained(path), load_oracle(path)
    ids = tokens(3, 6)
    ended = 0
    for prompt in (None, prompt_of()):
        for num_beams in (1, 4):
            got = our_generate(ours, ids, torch.ones_like(ids), prompt, num_beams)
            expected = oracle_generate(oracle, ids, prompt, num_beams)
            assert up_to_eos(got) == up_to_eos(expected), (prompt is None, num_beams)
            ended += sum(EOS in row for row in up_to_eos(expected))
    assert ended > 0  # some hypotheses finish early: the beams' bookkeeping is exercised


@pytest.mark.parametrize("kind", ["llama3_tied_biases", "mistral_window", "qwen3_head_dim"])
@torch.no_grad()
def test_left_padded_batch_decodes_each_row_as_alone(checkpoints, kind):
    ours = causal_lm.load_pretrained(checkpoints[kind, "single"])
    ids, prompt, lengths = tokens(3, 8, seed=3), prompt_of(seed=4), [8, 5, 1]
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, 8 - n :] = 1
    for num_beams in (1, 4):
        batch = up_to_eos(our_generate(ours, ids, mask, prompt, num_beams))
        for row, n in enumerate(lengths):
            alone = ids[row : row + 1, 8 - n :]
            expected = our_generate(ours, alone, torch.ones_like(alone), prompt, num_beams)
            assert batch[row] == up_to_eos(expected)[0], (num_beams, row)


def test_decoding_refuses_right_padded_rows(checkpoints):
    ours = causal_lm.load_pretrained(checkpoints["llama", "single"])
    ids, mask = tokens(2, 4), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with pytest.raises(ValueError, match="left-padded"):
        causal_lm.start_decoding(ours, ids, mask)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_saved_checkpoint_loads_in_transformers_with_equal_logits(checkpoints, kind, tmp_path):
    ours = causal_lm.load_pretrained(checkpoints[kind, "sharded"])
    causal_lm.save_pretrained(ours, tmp_path)
    tied = ours.config.tie_word_embeddings
    assert ("lm_head.weight" in load_file(tmp_path / "model.safetensors")) == (not tied)
    theirs = load_oracle(tmp_path)
    assert theirs.config.tie_word_embeddings == tied
    ids = tokens(2, 9)
    mask = torch.ones_like(ids)
    assert (theirs(input_ids=ids, attention_mask=mask).logits - ours(ids, mask)).abs().max() < 1e-5
    again = causal_lm.load_pretrained(tmp_path)
    assert torch.equal(again(ids, mask), ours(ids, mask))


@torch.no_grad()
def test_tied_config_with_a_different_stored_head_loads_untied_as_transformers_does(
    checkpoints, tmp_path
):
    path = checkpoints["qwen2_tied_window", "single"]
    state = load_file(os.path.join(path, "model.safetensors"))
    state["lm_head.weight"] = torch.randn(VOCAB, HIDDEN)
    os.makedirs(tmp_path / "ck")
    save_file(state, tmp_path / "ck" / "model.safetensors", metadata={"format": "pt"})
    with open(os.path.join(path, "config.json")) as f:
        (tmp_path / "ck" / "config.json").write_text(f.read())
    ours, oracle = causal_lm.load_pretrained(tmp_path / "ck"), load_oracle(tmp_path / "ck")
    assert not ours.config.tie_word_embeddings and ours.lm_head is not None
    ids = tokens(2, 5)
    mask = torch.ones_like(ids)
    assert (ours(ids, mask) - oracle(input_ids=ids, attention_mask=mask).logits).abs().max() < 1e-4


@pytest.mark.parametrize("config_class", ["GemmaConfig", "GPT2Config", "MixtralConfig"])
def test_unsupported_architectures_are_refused_in_one_line(tmp_path, config_class):
    import transformers

    config = getattr(transformers, config_class)()
    (tmp_path / "config.json").write_text(config.to_json_string())
    with pytest.raises(ValueError) as error:
        causal_lm.load_pretrained(tmp_path)
    message = str(error.value)
    assert "\n" not in message and repr(config.model_type) in message
    assert message.endswith("reads llama, mistral, qwen2, qwen3 checkpoints")


def damaged(src, dst, change):
    """A copy of checkpoint folder `src` at `dst` whose tensors `change(state)` edited."""
    state = load_file(os.path.join(src, "model.safetensors"))
    change(state)
    os.makedirs(dst)
    save_file(state, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        json.dump(json.load(f), open(os.path.join(dst, "config.json"), "w"))
    return dst


@pytest.mark.parametrize(
    "change, named",
    [
        (lambda s: s.pop("model.layers.1.mlp.up_proj.weight"), "model.layers.1.mlp.up_proj.weight"),
        (lambda s: s.update({"model.layers.2.mlp.up_proj.weight": torch.ones(1)}), "layers.2"),
        (
            lambda s: s.update({"model.norm.weight": torch.ones(7)}),
            "'model.norm.weight' has shape (7,)",
        ),
    ],
    ids=["missing", "unexpected", "wrong_shape"],
)
def test_a_missing_unexpected_or_misshapen_tensor_is_named(checkpoints, tmp_path, change, named):
    folder = damaged(checkpoints["llama", "single"], tmp_path / "ck", change)
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
        causal_lm.load_pretrained(folder)


def test_a_folder_without_weights_names_the_files_it_expects(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model.safetensors or model.safetensors.index.json"):
        causal_lm.load_pretrained(tmp_path)


def test_transformers_4_rope_spelling_reads_as_transformers_5s():
    """Llama 3's rope settings as rope_theta + rope_scaling (transformers 4) and as
    rope_parameters (transformers 5) build the same table."""
    base = {**TINY, "model_type": "llama"}
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}
    old = causal_lm.CausalLMConfig.from_dict({**base, "rope_theta": 500.0, "rope_scaling": scaling})
    new = causal_lm.CausalLMConfig.from_dict({**base, "rope_parameters": LLAMA3_ROPE})
    assert old == new and old.rope_scaling is not None
    assert torch.equal(causal_lm.rope_table(old), causal_lm.rope_table(new))
