"""The fast paths give the results of the plain ones, bit for bit where they promise it.

1. support/adafactor.py: `Adafactor.update_in_place` (the default) against `Adafactor.update`,
   the rule one tensor expression per line (`in_place=False`): bit for bit.
2. support/t5x_loss.py: `T5XCrossEntropy` (the gradient written out, `fused=True`) against
   `token_losses` with autograd (`fused=False`): to float rounding, since the two compute
   different expressions of the same maths (lse - logits[target] from one exp pass against
   log_softmax and a second logsumexp; the gradient as a scaled softmax against autograd's).
The outside oracles (transformers' Adafactor, T5X's rule in numpy, the loss in float64) are in
tests/test_adafactor.py and tests/test_plain_rules.py.
(Beam and greedy search dropping finished rows: tests/test_evaluate_generate.py.)
"""

import pytest
import torch

from support.adafactor import Adafactor
from support.t5x_loss import cross_entropy

SHAPES = [(130, 256), (300, 140), (160, 160), (64, 200), (9,), (200, 3, 150), (130, 7, 130), (5, 6)]
SETTINGS = {
    "defaults (stage 2)": dict(lr=1e-3),
    "momentum and weight decay": dict(lr=0.05, beta1=0.9, weight_decay_rate=1e-3),
    "no parameter scaling (stage 1)": dict(lr=0.2, multiply_by_parameter_scale=False),
    "no clipping, step_offset": dict(lr=0.05, clipping_threshold=None, step_offset=-3),
}


def same_bits(a, b):
    """Equal bit for bit (torch.equal calls -0.0 and 0.0 equal)."""
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.int64: torch.int64}[
        a.dtype
    ]
    return a.dtype == b.dtype and torch.equal(a.detach().view(bits), b.detach().view(bits))


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_adafactor_step_equals_the_per_tensor_step_bit_for_bit(setting, dtype):
    torch.manual_seed(0)
    start = [torch.randn(s).to(dtype) for s in SHAPES]
    grads = [[torch.randn(s).to(dtype) for s in SHAPES] for _ in range(4)]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    reference = [torch.nn.Parameter(t.clone()) for t in start]
    opt, ref = (
        Adafactor(ours, **SETTINGS[setting]),
        Adafactor(reference, in_place=False, **SETTINGS[setting]),
    )
    for step_grads in grads:
        for a, b, g in zip(ours, reference, step_grads):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for a, b in zip(ours, reference):
            assert same_bits(a, b)
    for a, b, s in zip(ours, reference, start):
        assert not torch.equal(a, s)  # it moved
        for key, value in opt.state[a].items():
            assert same_bits(value, ref.state[b][key]), key


def test_adafactor_on_cpu_keeps_two_scratch_buffers_the_size_of_the_largest_parameter():
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = Adafactor(params, lr=1e-3)
    addresses = []
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        buffers = opt._scratch_buffers[torch.device("cpu")]
        addresses.append([b.data_ptr() for b in buffers])
    assert addresses[0] == addresses[1]  # allocated at the first step only
    assert [b.numel() for b in buffers] == [max(p.numel() for p in params)] * 2
    assert all(
        set(st) <= {"step", "v_row", "v_col", "v", "m"} for st in opt.state.values()
    )  # not state


# --- 2. The loss: T5X's cross-entropy, label smoothing and z-loss in one function -----------


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("z_loss", [0.0, 1e-4])
def test_cross_entropy_and_its_gradient_equal_the_autograd_version(label_smoothing, z_loss):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 1000, generator=g) * 4
    labels = torch.randint(0, 1000, (3, 5), generator=g)
    labels[1, 3:] = -100
    grads, totals = [], []
    for fused in (True, False):
        x = logits.clone().requires_grad_()
        total, count = cross_entropy(x, labels, label_smoothing, z_loss, fused=fused)
        (total / count * 0.5).backward()  # a gradient other than 1 reaches the loss
        grads.append(x.grad)
        totals.append(total.detach())
        assert count == 13
    torch.testing.assert_close(totals[0], totals[1], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-8)
    assert grads[0][1, 3:].abs().max() == 0  # ignored positions get no gradient


def test_cross_entropy_of_bfloat16_logits_is_computed_in_float32_and_returns_a_bfloat16_gradient():
    logits = (torch.randn(2, 4, 300) * 3).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 300, (2, 4))
    total, count = cross_entropy(logits, labels, 0.1, 1e-4)
    total.backward()
    expected, _ = cross_entropy(logits.detach().float(), labels, 0.1, 1e-4, fused=False)
    assert total.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=1e-5)
    plain = logits.detach().clone().requires_grad_()
    cross_entropy(plain, labels, 0.1, 1e-4, fused=False)[0].backward()
    assert plain.grad.dtype == torch.bfloat16  # the plain path too
