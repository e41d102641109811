"""The fast paths give the results of the plain ones, bit for bit where they promise it.

1. support/adafactor.py's in-place step against the per-tensor step it replaced
   (`ReferenceAdafactor` below, the straightforward tensor expressions): bit for bit.
2. support/t5x_loss.cross_entropy (T5XCrossEntropy, its gradient written out) against the
   log_softmax + autograd version it replaced, plus the z-loss that promot.train_step
   used to add apart: to float rounding.
(Beam and greedy search dropping finished rows: tests/test_evaluate_generate.py.)
"""

import math

import pytest
import torch
import torch.distributed as dist

from support.adafactor import Adafactor, _local, _shard_info


class ReferenceAdafactor(Adafactor):
    """The step as first written: one fresh tensor per expression of the rule."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._reference_update(p, group)

    def _reference_update(self, p, group):
        shape = tuple(p.shape)
        shard_dim, pg = _shard_info(p)
        x, g = _local(p), _local(p.grad)

        def mean(t, dims, full_shape, sharded):
            s = t.sum(dim=dims, keepdim=True)
            if pg is not None and sharded is not None and sharded in dims:
                dist.all_reduce(s, group=pg)
            return s / math.prod(full_shape[d] for d in dims)

        def rms(t):
            return mean(t * t, tuple(range(t.dim())), shape, shard_dim).sqrt().reshape(())

        state = self._state_of(p, group)
        dims = self.factored_dims(shape, group["min_dim_size_to_factor"])
        x32, g32 = x.float(), g.float()
        t = int(state["step"]) - group["step_offset"] + 1
        decay = 1.0 - t ** (-group["decay_rate"])
        mixing = 1.0 - decay
        update_scale = group["lr"]
        if group["multiply_by_parameter_scale"]:
            update_scale = update_scale * torch.clamp(rms(x32), min=group["epsilon2"])
        g2 = g32 * g32 + group["epsilon1"]
        if dims is not None:
            row_dim, col_dim = dims
            v_row, v_col = _local(state["v_row"]), _local(state["v_col"])
            v_row.mul_(decay).add_(mixing * mean(g2, (col_dim,), shape, shard_dim).squeeze(col_dim))
            v_col.mul_(decay).add_(mixing * mean(g2, (row_dim,), shape, shard_dim).squeeze(row_dim))
            row_shape = shape[:col_dim] + shape[col_dim + 1 :]
            row_dim_in_row = row_dim - (1 if col_dim < row_dim else 0)
            row_sharded = (
                None
                if shard_dim in (None, col_dim)
                else shard_dim - (1 if col_dim < shard_dim else 0)
            )
            row_col_mean = mean(v_row, (row_dim_in_row,), row_shape, row_sharded)
            row_factor = (v_row / row_col_mean).rsqrt()
            col_factor = v_col.rsqrt()
            u = g32 * row_factor.unsqueeze(col_dim) * col_factor.unsqueeze(row_dim)
        else:
            v = _local(state["v"])
            v.mul_(decay).add_(mixing * g2)
            u = g32 * v.rsqrt()
        if group["clipping_threshold"] is not None:
            u = u / torch.clamp(rms(u) / group["clipping_threshold"], min=1.0)
        subtrahend = update_scale * u
        if group["beta1"] is not None:
            m = _local(state["m"])
            m.mul_(group["beta1"]).add_((1.0 - group["beta1"]) * subtrahend)
            subtrahend = m
        if group["weight_decay_rate"] is not None:
            new_x = (1.0 - group["weight_decay_rate"]) * x32 - subtrahend
        else:
            new_x = x32 - subtrahend
        x.copy_(new_x)
        state["step"] += 1


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
        ReferenceAdafactor(reference, **SETTINGS[setting]),
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


def reference_cross_entropy(logits, labels, label_smoothing=0.0, z_loss=0.0):
    """t5x_loss.cross_entropy as first written (log_softmax and autograd), plus the z-loss that
    promot.train_step added apart."""
    keep = labels != -100
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, labels.masked_fill(~keep, 0).unsqueeze(-1)).squeeze(-1)
    loss = nll
    if label_smoothing > 0:
        vocab = logits.shape[-1]
        on, off = 1.0 - label_smoothing, label_smoothing / (vocab - 1)
        entropy = -(on * math.log(on) + (vocab - 1) * off * math.log(off + 1e-20))
        loss = on * nll + off * (-logp.sum(-1) - nll) - entropy
    z = torch.logsumexp(logits.float(), dim=-1).square()
    return ((loss + z_loss * z) * keep).sum(), keep.sum()


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("z_loss", [0.0, 1e-4])
def test_cross_entropy_and_its_gradient_equal_the_autograd_version(label_smoothing, z_loss):
    from support.t5x_loss import cross_entropy

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 1000, generator=g) * 4
    labels = torch.randint(0, 1000, (3, 5), generator=g)
    labels[1, 3:] = -100
    grads, totals = [], []
    for fn in (cross_entropy, reference_cross_entropy):
        x = logits.clone().requires_grad_()
        total, count = fn(x, labels, label_smoothing, z_loss)
        (total / count * 0.5).backward()  # a gradient other than 1 reaches the loss
        grads.append(x.grad)
        totals.append(total.detach())
        assert count == 13
    torch.testing.assert_close(totals[0], totals[1], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-8)
    assert grads[0][1, 3:].abs().max() == 0  # ignored positions get no gradient


def test_cross_entropy_of_bfloat16_logits_is_computed_in_float32_and_returns_a_bfloat16_gradient():
    from support.t5x_loss import cross_entropy

    logits = (torch.randn(2, 4, 300) * 3).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, 300, (2, 4))
    total, count = cross_entropy(logits, labels, 0.1, 1e-4)
    total.backward()
    expected, _ = reference_cross_entropy(logits.detach().float(), labels, 0.1, 1e-4)
    assert total.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(total, expected, rtol=1e-6, atol=1e-5)
