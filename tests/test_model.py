"""model.py against transformers (the oracle) on tiny random checkpoints."""

import json
import os

import pytest
import torch
from helpers import load_oracle, make_checkpoint, random_batch

import model
from support import t5x_loss
from support.errors import BadInput, DamagedFile

# The coverage list: v1.0 ReLU tied, v1.1/mT5 gated-GELU untied, UMT5,
# encoder and decoder depths that differ, num_heads*d_kv != d_model,
# non-default buckets / max distance with sequences longer than max_distance.
VARIANTS = {
    "t5_v1_0_relu_tied": dict(kind="t5"),
    "t5_v1_1_gated_untied": dict(kind="t5v1_1"),
    "mt5": dict(kind="mt5"),
    "umt5_per_layer_bias": dict(kind="umt5"),
    "odd_shapes": dict(
        kind="mt5",
        num_layers=3,
        num_decoder_layers=1,
        num_heads=3,
        d_kv=8,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=6,
    ),
}


def assert_logits_close(ours, ref):
    scale = ref.abs().max().item()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * scale)


def logits_of(net, ids, mask, dec, **kw):
    with torch.no_grad():
        return net(ids, mask, dec, **kw)


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_equal_transformers(tmp_path, variant):
    spec = dict(VARIANTS[variant])
    config = make_checkpoint(tmp_path, **spec)
    ids, mask, dec = random_batch(
        config["vocab_size"], batch=3, src_len=20, tgt_len=9
    )  # 20 > max_distance 6
    ref = load_oracle(tmp_path)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert_logits_close(logits_of(model.load_pretrained(tmp_path).eval(), ids, mask, dec), expected)


@pytest.mark.parametrize("layout", ["sharded", "bin", "sharded_bin"])
def test_every_checkpoint_layout_loads_the_same_logits(tmp_path, layout):
    config = make_checkpoint(tmp_path / layout, kind="t5v1_1", layout=layout)
    make_checkpoint(tmp_path / "single", kind="t5v1_1", layout="safetensors")
    ids, mask, dec = random_batch(config["vocab_size"])
    ref = load_oracle(tmp_path / "single")
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert_logits_close(
        logits_of(model.load_pretrained(tmp_path / layout).eval(), ids, mask, dec), expected
    )


@pytest.mark.parametrize("kind", ["t5", "mt5"])
def test_prompt_equals_transformers_with_prepended_embeddings(tmp_path, kind):
    config = make_checkpoint(tmp_path, kind=kind)
    ids, mask, dec = random_batch(config["vocab_size"])
    prompt = torch.randn(5, config["d_model"])
    ref = load_oracle(tmp_path)
    embeds = torch.cat([prompt.expand(3, -1, -1), ref.shared(ids)], dim=1)
    ext_mask = torch.cat([torch.ones(3, 5, dtype=mask.dtype), mask], dim=1)
    with torch.no_grad():
        expected = ref(inputs_embeds=embeds, attention_mask=ext_mask, decoder_input_ids=dec).logits
    ours = model.load_pretrained(tmp_path).eval()
    assert_logits_close(logits_of(ours, ids, mask, dec, prompt=prompt), expected)
    # a per-example (batch, p, d) prompt is the same thing
    assert_logits_close(logits_of(ours, ids, mask, dec, prompt=prompt.expand(3, -1, -1)), expected)


def test_prompt_of_wrong_width_is_rejected(tmp_path):
    config = make_checkpoint(tmp_path, kind="t5")
    ids, mask, dec = random_batch(config["vocab_size"])
    with pytest.raises(ValueError, match="prompt has shape"):
        model.load_pretrained(tmp_path)(
            ids, mask, dec, prompt=torch.zeros(4, config["d_model"] + 1)
        )


@pytest.mark.parametrize("kind", ["t5", "umt5"])
def test_kv_cached_decoding_equals_full_forward(tmp_path, kind):
    config = make_checkpoint(
        tmp_path, kind=kind, relative_attention_max_distance=4, relative_attention_num_buckets=6
    )
    ids, mask, dec = random_batch(config["vocab_size"], tgt_len=12)
    net = model.load_pretrained(tmp_path).eval()
    prompt = torch.randn(2, config["d_model"])
    with torch.no_grad():
        full = net(ids, mask, dec, prompt=prompt)
        hidden, enc_mask = net.encode(ids, mask, prompt=prompt)
        cache = model.KVCache()
        steps = [net.decode(dec[:, :3], hidden, enc_mask, cache)]  # a multi-token first call
        for t in range(3, dec.shape[1]):
            steps.append(net.decode(dec[:, t : t + 1], hidden, enc_mask, cache))
    assert cache.length == dec.shape[1]
    assert_logits_close(torch.cat(steps, dim=1), full)


def test_cache_reorder_follows_selected_rows(tmp_path):
    config = make_checkpoint(tmp_path, kind="t5v1_1")
    ids, mask, dec = random_batch(config["vocab_size"], batch=2)
    net = model.load_pretrained(tmp_path).eval()
    with torch.no_grad():
        hidden, enc_mask = net.encode(ids[:1].expand(2, -1), mask[:1].expand(2, -1))
        cache = model.KVCache()
        net.decode(dec[:, :2], hidden, enc_mask, cache)
        cache.reorder(torch.tensor([1, 1]))
        step = net.decode(dec[1:2, 2:3].expand(2, -1), hidden, enc_mask, cache)
        full = net(ids[:1], mask[:1], dec[1:2, :3])
    assert_logits_close(step[0], full[0, -1:])
    assert_logits_close(step[1], full[0, -1:])


@pytest.mark.parametrize("kind", ["t5", "mt5"])
def test_gradients_equal_transformers(tmp_path, kind):
    """The training path (attention through SDPA, position-bias gradients) matches the oracle."""
    config = make_checkpoint(tmp_path, kind=kind, dropout_rate=0.0)
    ids, mask, dec = random_batch(config["vocab_size"])
    labels = torch.cat([dec[:, 1:], torch.ones(3, 1, dtype=torch.long)], dim=1)
    ref, ours = load_oracle(tmp_path).train(), model.load_pretrained(tmp_path).train()
    ref(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    loss_sum, count = t5x_loss.cross_entropy(ours(ids, mask, model.shift_right(labels)), labels)
    (loss_sum / count).backward()
    ref_grads = {
        model.hf_to_ours(n): p.grad for n, p in ref.named_parameters() if p.grad is not None
    }
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_save_then_transformers_and_we_load_identical_weights(tmp_path):
    make_checkpoint(tmp_path / "src", kind="mt5")
    ours = model.load_pretrained(tmp_path / "src").eval()
    model.save_pretrained(ours, tmp_path / "out")
    ids, mask, dec = random_batch(ours.config.vocab_size)
    expected = logits_of(ours, ids, mask, dec)
    with torch.no_grad():
        theirs = load_oracle(tmp_path / "out")(
            input_ids=ids, attention_mask=mask, decoder_input_ids=dec
        ).logits
    assert_logits_close(theirs, expected)
    again = model.load_pretrained(tmp_path / "out")
    for (n, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n


def test_tied_model_saves_and_reloads_in_transformers(tmp_path):
    make_checkpoint(tmp_path / "src", kind="t5")
    ours = model.load_pretrained(tmp_path / "src").eval()
    model.save_pretrained(ours, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["tie_word_embeddings"] is True and saved["feed_forward_proj"] == "relu"
    ids, mask, dec = random_batch(ours.config.vocab_size)
    with torch.no_grad():
        theirs = load_oracle(tmp_path / "out")(
            input_ids=ids, attention_mask=mask, decoder_input_ids=dec
        ).logits
    assert_logits_close(theirs, logits_of(ours, ids, mask, dec))


def test_large_models_save_sharded_with_an_index(tmp_path):
    make_checkpoint(tmp_path / "src", kind="t5v1_1")
    ours = model.load_pretrained(tmp_path / "src")
    model.save_pretrained(ours, tmp_path / "out", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "out" / "model.safetensors").exists()
    again = model.load_pretrained(tmp_path / "out")
    assert all(
        torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values())
    )


def test_saving_over_a_checkpoint_keeps_its_other_files(tmp_path):
    make_checkpoint(tmp_path / "ckpt", kind="t5")
    (tmp_path / "ckpt" / "spiece.model").write_bytes(b"sentencepiece")
    model.save_pretrained(model.load_pretrained(tmp_path / "ckpt"), tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "spiece.model").read_bytes() == b"sentencepiece"
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary directories left behind


def test_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    make_checkpoint(tmp_path / "ckpt", kind="t5")
    before = {f: (tmp_path / "ckpt" / f).read_bytes() for f in os.listdir(tmp_path / "ckpt")}
    net = model.load_pretrained(tmp_path / "ckpt")
    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(net, tmp_path / "ckpt")
    assert {
        f: (tmp_path / "ckpt" / f).read_bytes() for f in os.listdir(tmp_path / "ckpt")
    } == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin"])
@pytest.mark.parametrize(
    "tie", [True, None]
)  # transformers 5 writes true for every model; v1.0 omits the key
def test_config_saying_tied_with_a_different_head_loads_untied(tmp_path, tie, layout):
    config = make_checkpoint(tmp_path, kind="t5v1_1", layout=layout)
    ids, mask, dec = random_batch(config["vocab_size"])
    with torch.no_grad():
        expected = load_oracle(tmp_path)(
            input_ids=ids, attention_mask=mask, decoder_input_ids=dec
        ).logits
    _edit_config(tmp_path, tie_word_embeddings=tie, scale_decoder_outputs=False)
    assert model.read_config(tmp_path).tie_word_embeddings is False
    net = model.load_pretrained(tmp_path).eval()
    assert net.config.tie_word_embeddings is False and net.lm_head is not None
    assert_logits_close(logits_of(net, ids, mask, dec), expected)


def test_tied_checkpoint_that_also_stores_an_equal_head_stays_tied(tmp_path):
    config = make_checkpoint(tmp_path, kind="t5")
    _rewrite(
        tmp_path,
        lambda s: s.update(
            {
                "lm_head.weight": s["shared.weight"].clone(),
                "encoder.embed_tokens.weight": s["shared.weight"].clone(),
            }
        ),
    )
    ids, mask, dec = random_batch(config["vocab_size"])
    with torch.no_grad():
        expected = load_oracle(tmp_path)(
            input_ids=ids, attention_mask=mask, decoder_input_ids=dec
        ).logits
    assert model.read_config(tmp_path).tie_word_embeddings is True
    net = model.load_pretrained(tmp_path).eval()
    assert net.lm_head is None
    assert_logits_close(logits_of(net, ids, mask, dec), expected)


def test_read_config_reads_only_the_head_and_the_embedding(tmp_path, monkeypatch):
    make_checkpoint(tmp_path, kind="t5v1_1", layout="sharded")
    _edit_config(tmp_path, tie_word_embeddings=True)
    read = []
    original = model.read_file

    def read_file(file, names=None):
        if names is None:
            pytest.fail("read the whole checkpoint")
        return read.extend(names) or original(file, names)

    monkeypatch.setattr(model, "read_file", read_file)
    assert model.read_config(tmp_path).tie_word_embeddings is False
    assert sorted(read) == ["lm_head.weight", "shared.weight"]


def test_read_tensors_returns_just_the_named_tensors_it_finds(tmp_path):
    from safetensors.torch import load_file

    make_checkpoint(tmp_path / "single", kind="t5v1_1")
    make_checkpoint(tmp_path / "sharded", kind="t5v1_1", layout="sharded")
    stored = load_file(tmp_path / "single" / "model.safetensors")
    for layout in ("single", "sharded"):
        found = model.read_tensors(
            tmp_path / layout, ["lm_head.weight", "shared.weight", "no.such.weight"]
        )
        assert sorted(found) == ["lm_head.weight", "shared.weight"]
        assert all(torch.equal(found[n], stored[n]) for n in found)


def test_load_weights_hands_every_tensor_to_copy_once(tmp_path):
    """The sharded loader's path: a materialised model, filled by a caller's copy; adapters are not expected."""
    from support import lora as lora_lib

    make_checkpoint(tmp_path, kind="t5")
    _rewrite(
        tmp_path,
        lambda s: s.update(
            {
                "lm_head.weight": s["shared.weight"].clone(),
                "decoder.embed_tokens.weight": s["shared.weight"].clone(),
            }
        ),
    )
    net = model.build(model.read_config(tmp_path), "cpu").eval()
    lora_lib.add_lora(net, rank=2)
    copied = []

    def copy(name, tensor):
        copied.append(name)
        net.get_parameter(name).copy_(tensor)

    assert model.load_weights(net, tmp_path, copy=copy) is net
    assert sorted(copied) == sorted(n for n, _ in net.named_parameters() if ".lora." not in n)
    ids, mask, dec = random_batch(net.config.vocab_size)
    loaded = model.load_pretrained(tmp_path).eval()
    assert torch.equal(logits_of(net, ids, mask, dec), logits_of(loaded, ids, mask, dec))


# Published parameter counts (model cards / transformers), checked on the meta device.
PUBLIC = {
    "t5-small": (
        dict(
            d_model=512,
            d_ff=2048,
            d_kv=64,
            num_heads=8,
            num_layers=6,
            vocab_size=32128,
            feed_forward_proj="relu",
        ),
        60_506_624,
    ),
    "t5-v1_1-base": (
        dict(
            d_model=768,
            d_ff=2048,
            d_kv=64,
            num_heads=12,
            num_layers=12,
            vocab_size=32128,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
        ),
        247_577_856,
    ),
    "mt5-small": (
        dict(
            d_model=512,
            d_ff=1024,
            d_kv=64,
            num_heads=6,
            num_layers=8,
            vocab_size=250112,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            model_type="mt5",
        ),
        300_176_768,
    ),
    "mt5-xl": (
        dict(
            d_model=2048,
            d_ff=5120,
            d_kv=64,
            num_heads=32,
            num_layers=24,
            vocab_size=250112,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            model_type="mt5",
        ),
        None,
    ),
    "mt5-xxl": (
        dict(
            d_model=4096,
            d_ff=10240,
            d_kv=64,
            num_heads=64,
            num_layers=24,
            vocab_size=250112,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            model_type="mt5",
        ),
        12_921_057_280,
    ),
}


@pytest.mark.parametrize("name", PUBLIC)
def test_public_configs_have_the_published_parameter_counts(name):
    import transformers

    cfg, published = PUBLIC[name]
    ours = sum(p.numel() for p in model.build(model.T5Config.from_dict(cfg)).parameters())
    hf_cfg = transformers.T5Config(
        **{k: v for k, v in cfg.items() if k != "model_type"},
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    with torch.device("meta"):
        ref = transformers.T5ForConditionalGeneration(hf_cfg)
    # transformers 5 always ties lm_head to the embedding; public untied checkpoints hold a separate one
    expected = sum(p.numel() for p in ref.parameters())
    if cfg.get("tie_word_embeddings") is False:
        expected += cfg["vocab_size"] * cfg["d_model"]
    assert ours == expected
    if published is not None:
        assert ours == published


def test_cross_entropy_matches_torch_and_ignores_padding():
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[1, 3:] = -100
    total, count = t5x_loss.cross_entropy(logits, labels)
    assert count == 8
    torch.testing.assert_close(
        total / count, torch.nn.functional.cross_entropy(logits.view(-1, 11), labels.view(-1))
    )


def test_label_smoothing_follows_t5x():
    """T5X: target 1-s, others s/(V-1), minus the entropy of that distribution."""
    logits, labels, s = torch.randn(3, 7), torch.tensor([0, 4, 6]), 0.1
    soft = torch.full((3, 7), s / 6).scatter(1, labels[:, None], 1 - s)
    entropy = -(soft * soft.log()).sum(-1)
    expected = (-(soft * torch.log_softmax(logits, -1)).sum(-1) - entropy).sum()
    total, _ = t5x_loss.cross_entropy(logits[None], labels[None], label_smoothing=s)
    torch.testing.assert_close(total, expected)
    # a prediction equal to the smoothed target scores zero
    total, _ = t5x_loss.cross_entropy(soft.log()[None], labels[None], label_smoothing=s)
    assert abs(total.item()) < 1e-5


def test_shift_right_starts_with_the_start_token_and_pads_ignored_labels():
    labels = torch.tensor([[5, 6, 1, -100]])
    assert model.shift_right(labels).tolist() == [[0, 5, 6, 1]]
    assert model.shift_right(torch.tensor([[5, -100, -100]]), 0, 0).tolist() == [[0, 5, 0]]


# ---- bad input: one clear error naming the file and the key


def test_missing_directory(tmp_path):
    with pytest.raises(BadInput, match="no such checkpoint directory|config.json"):
        model.load_pretrained(tmp_path / "nope")


def test_directory_without_weights(tmp_path):
    make_checkpoint(tmp_path, kind="t5")
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(BadInput, match="found no weights; expected model.safetensors"):
        model.load_pretrained(tmp_path)


def test_unknown_feed_forward_proj(tmp_path):
    make_checkpoint(tmp_path, kind="t5")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["feed_forward_proj"] = "gated-silu"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(BadInput, match=r"config.json: feed_forward_proj is 'gated-silu'"):
        model.load_pretrained(tmp_path)


@pytest.mark.parametrize("value", [[1, 2], "t5", None, 3])
def test_a_config_that_is_not_a_json_object_is_one_clear_error(value):
    with pytest.raises(BadInput, match=r"config.json: expected a JSON object, got"):
        model.T5Config.from_dict(value, source="config.json")


def test_a_config_json_holding_a_list_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(BadInput, match=r"config.json: expected a JSON object, got list"):
        model.load_pretrained(tmp_path)


@pytest.mark.parametrize(
    "key,value,expected",
    [("d_model", -4, "a non-negative integer"), ("model_type", "bart", "'t5', 'mt5' or 'umt5'")],
)
def test_a_config_value_out_of_range_names_the_key(key, value, expected):
    config = {"vocab_size": 8, "d_model": 4, "d_kv": 2, "d_ff": 8, "num_layers": 1, "num_heads": 2}
    with pytest.raises(BadInput, match=f"cfg: {key} is {value!r}; expected {expected}"):
        model.T5Config.from_dict({**config, key: value}, source="cfg")


def _rewrite(path, edit):
    from safetensors.torch import load_file, save_file

    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors")


def test_missing_tensor(tmp_path):
    make_checkpoint(tmp_path, kind="t5v1_1")
    _rewrite(tmp_path, lambda s: s.pop("decoder.block.1.layer.2.DenseReluDense.wo.weight"))
    with pytest.raises(
        DamagedFile, match=r"lacks 1 tensor.*decoder.block.1.layer.2.DenseReluDense.wo"
    ):
        model.load_pretrained(tmp_path)


def test_unexpected_tensor(tmp_path):
    make_checkpoint(tmp_path, kind="t5v1_1")
    _rewrite(
        tmp_path,
        lambda s: s.update({"encoder.block.9.layer.0.SelfAttention.q.weight": torch.zeros(2, 2)}),
    )
    with pytest.raises(DamagedFile, match=r"model.safetensors: unexpected tensor 'encoder.block.9"):
        model.load_pretrained(tmp_path)


def test_shape_mismatch(tmp_path):
    make_checkpoint(tmp_path, kind="t5v1_1")
    _rewrite(
        tmp_path,
        lambda s: s.update({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(32, 31)}),
    )
    with pytest.raises(
        DamagedFile,
        match=r"SelfAttention.q.weight' has shape \(32, 31\); config.json implies",
    ):
        model.load_pretrained(tmp_path)


def test_truncated_safetensors(tmp_path):
    make_checkpoint(tmp_path, kind="t5")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(DamagedFile, match="model.safetensors: cannot read as safetensors"):
        model.load_pretrained(tmp_path)


def test_corrupted_safetensors_header(tmp_path):
    make_checkpoint(tmp_path, kind="t5")
    (tmp_path / "model.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all"
    )
    with pytest.raises(DamagedFile, match="cannot read as safetensors"):
        model.load_pretrained(tmp_path)


class Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_bin_that_needs_pickle_code_execution_is_refused(tmp_path, capsys):
    make_checkpoint(tmp_path, kind="t5", layout="bin")
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    state["evil"] = Payload()
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(DamagedFile, match="pytorch_model.bin: refused to load"):
        model.load_pretrained(tmp_path)
    assert "pickled code ran" not in capsys.readouterr().out


def test_saved_checkpoint_has_the_usual_file_modes(tmp_path):
    make_checkpoint(tmp_path / "src", kind="t5")
    model.save_pretrained(model.load_pretrained(tmp_path / "src"), tmp_path / "out")
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "out").st_mode & 0o777 == 0o777 & ~umask
    assert os.stat(tmp_path / "out" / "model.safetensors").st_mode & 0o777 == 0o666 & ~umask
