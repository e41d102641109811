"""The fast paths give the results of the plain ones, bit for bit where they promise it.

1. support/adafactor.py's in-place step against the per-tensor step it replaced
   (`ReferenceAdafactor` below, the straightforward tensor expressions): bit for bit.
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
            row_shape = shape[:col_dim] + shape[col_dim + 1:]
            row_dim_in_row = row_dim - (1 if col_dim < row_dim else 0)
            row_sharded = None if shard_dim in (None, col_dim) else shard_dim - (1 if col_dim < shard_dim else 0)
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


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_adafactor_step_equals_the_per_tensor_step_bit_for_bit(setting, dtype):
    torch.manual_seed(0)
    start = [torch.randn(s).to(dtype) for s in SHAPES]
    grads = [[torch.randn(s).to(dtype) for s in SHAPES] for _ in range(4)]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    reference = [torch.nn.Parameter(t.clone()) for t in start]
    opt, ref = Adafactor(ours, **SETTINGS[setting]), ReferenceAdafactor(reference, **SETTINGS[setting])
    for step_grads in grads:
        for a, b, g in zip(ours, reference, step_grads):
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        for a, b in zip(ours, reference):
            assert torch.equal(a, b)
    for a, b, s in zip(ours, reference, start):
        assert not torch.equal(a, s)  # it moved
        for key, value in opt.state[a].items():
            assert torch.equal(value, ref.state[b][key]), key


def test_adafactor_step_allocates_its_scratch_once_on_cpu():
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    opt = Adafactor(params, lr=1e-3)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        buffers = opt._scratch_buffers[torch.device("cpu")]
        if _ == 0:
            first = [b.data_ptr() for b in buffers]
    assert [b.data_ptr() for b in buffers] == first
    assert all(b.numel() == max(p.numel() for p in params) for b in buffers)
