"""LoRA adapters (paper App. C.7): zero at start, exact math, removable, saved on their own."""

import pytest
import torch
from helpers import make_checkpoint, random_batch

import model


@pytest.fixture
def net(tmp_path):
    make_checkpoint(tmp_path / "ckpt", kind="mt5")
    return model.load_pretrained(tmp_path / "ckpt").eval()


def logits(net, batch):
    with torch.no_grad():
        return net(*batch)


def randomize_b(net):
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(".lora.q.b") or name.endswith(".lora.v.b"):
                p.normal_()


def test_fresh_adapter_leaves_logits_unchanged(net):
    batch = random_batch(net.config.vocab_size)
    before = logits(net, batch)
    params = model.add_lora(net, rank=4)
    assert torch.equal(logits(net, batch), before)
    attentions = 2 + 2 * 2  # mt5 fixture: 2 encoder self, 2 decoder self + 2 cross
    assert len(params) == attentions * 2 * 2  # (q, v) x (A, B)


def test_adapter_equals_dense_weight_plus_scaled_BA(net):
    model.add_lora(net, rank=2, alpha=6.0, targets=("q", "v"))
    randomize_b(net)
    attn = net.encoder.blocks[1].self_attn
    x = torch.randn(3, 5, net.config.d_model)
    for name in ("q", "v"):
        a, b = attn.lora[name].a, attn.lora[name].b
        dense = getattr(attn, name).weight + (6.0 / 2) * b @ a
        torch.testing.assert_close(attn.project(name, x), x @ dense.T)
    assert torch.equal(attn.project("k", x), attn.k(x))  # untargeted projections untouched


def test_disabling_adapters_restores_the_plain_model(net):
    batch = random_batch(net.config.vocab_size)
    plain = logits(net, batch)
    model.add_lora(net, rank=4)
    randomize_b(net)
    assert not torch.allclose(logits(net, batch), plain)
    model.set_lora_enabled(net, False)
    assert torch.equal(logits(net, batch), plain)
    model.set_lora_enabled(net, True)
    assert not torch.allclose(logits(net, batch), plain)


def test_save_and_load_round_trip(net, tmp_path):
    model.add_lora(net, rank=3, alpha=5.0, targets=("q", "k", "v", "o"))
    randomize_b(net)
    model.save_lora(net, tmp_path / "lora.safetensors")
    fresh = model.load_pretrained(tmp_path / "ckpt").eval()
    model.load_lora(fresh, tmp_path / "lora.safetensors")
    assert model.lora_info(fresh) == {"rank": 3, "alpha": 5.0, "targets": ["q", "k", "v", "o"]}
    batch = random_batch(net.config.vocab_size)
    assert torch.equal(logits(fresh, batch), logits(net, batch))


def test_model_checkpoint_excludes_adapters(net, tmp_path):
    model.add_lora(net, rank=2)
    model.save_pretrained(net, tmp_path / "saved")
    reloaded = model.load_pretrained(tmp_path / "saved")  # would fail on unexpected adapter tensors
    assert model.lora_info(reloaded) is None


@pytest.mark.parametrize("rank", [0, -1, 2.5])
def test_bad_rank(net, rank):
    with pytest.raises(ValueError, match="LoRA rank must be a positive integer"):
        model.add_lora(net, rank=rank)


def test_unknown_target(net):
    with pytest.raises(ValueError, match=r"unknown LoRA target\(s\) \['wi'\]"):
        model.add_lora(net, rank=2, targets=("q", "wi"))


def test_adapter_for_another_rank_is_rejected(net, tmp_path):
    model.add_lora(net, rank=2)
    model.save_lora(net, tmp_path / "r2.safetensors")
    other = model.load_pretrained(tmp_path / "ckpt")
    model.add_lora(other, rank=4)
    with pytest.raises(model.CheckpointError, match=r"r2.safetensors \(rank 2 in the file\): .* has shape \(2, 32\)"):
        model.load_lora(other, tmp_path / "r2.safetensors")


def test_adapter_for_another_model_shape_is_rejected(net, tmp_path):
    model.add_lora(net, rank=2)
    model.save_lora(net, tmp_path / "a.safetensors")
    make_checkpoint(tmp_path / "wide", kind="mt5", d_model=48)
    with pytest.raises(model.CheckpointError, match="adapter made for d_model=32, this model has d_model=48"):
        model.load_lora(model.load_pretrained(tmp_path / "wide"), tmp_path / "a.safetensors")
    make_checkpoint(tmp_path / "deep", kind="mt5", num_layers=3)
    with pytest.raises(model.CheckpointError, match="do not fit this model"):
        model.load_lora(model.load_pretrained(tmp_path / "deep"), tmp_path / "a.safetensors")
