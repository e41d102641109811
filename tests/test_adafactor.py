"""support/adafactor.py's Adafactor (promot.Adafactor) against two oracles.

1. `transformers.optimization.Adafactor` where the two rules coincide:
   relative_step=False, warmup_init=False, decay_rate=-0.8 (theirs) = 0.8
   (ours), no weight decay, scale_parameter == multiply_by_parameter_scale,
   and every tensor of 2+ dims factored over its last two dims, which holds
   for 1-D tensors, and for 2-D tensors whose smaller side is at least
   `min_dim_size_to_factor` (transformers factors every matrix; T5X only
   those; for a tall matrix T5X swaps which statistic it calls row/column,
   which is the same estimate V ~ r c^T / mean(r)).
2. A line-by-line numpy transcription of `t5x/adafactor.py`
   (`apply_param_gradient` with the heuristic factor rule) where they differ:
   small matrices kept unfactored, weight decay not scaled by lr, momentum,
   step_offset, 3-D tensors factored over their two largest dims.
Both oracles check both paths of the step: the plain rule (`Adafactor.update`, in_place=False)
and the in-place one that `step` takes by default (`Adafactor.update_in_place`).
"""

import numpy as np
import pytest
import torch

from support.adafactor import Adafactor


def run_ours(shapes, steps, seed=0, **kwargs):
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(steps)]
    start = [p.detach().clone() for p in params]
    opt = Adafactor(params, **kwargs)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return start, grads, [p.detach() for p in params]


# --- Oracle 1: transformers -------------------------------------------------


PATHS = dict(argnames="in_place", argvalues=[True, False], ids=["in place", "plain"])


@pytest.mark.parametrize(**PATHS)
@pytest.mark.parametrize("scale", [True, False])
@pytest.mark.parametrize("beta1", [None, 0.9])
def test_matches_transformers_adafactor_where_rules_coincide(scale, beta1, in_place):
    from transformers.optimization import Adafactor as HFAdafactor

    shapes = [
        (128, 256),
        (300, 128),
        (160, 160),
        (7,),
    ]  # factored matrices (both ways round) + a vector
    start, grads, ours = run_ours(
        shapes, steps=5, lr=0.01, multiply_by_parameter_scale=scale, beta1=beta1, in_place=in_place
    )
    params = [torch.nn.Parameter(s.clone()) for s in start]
    hf = HFAdafactor(
        params,
        lr=0.01,
        eps=(1e-30, 1e-3),
        clip_threshold=1.0,
        decay_rate=-0.8,
        beta1=beta1,
        weight_decay=0.0,
        scale_parameter=scale,
        relative_step=False,
        warmup_init=False,
    )
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        hf.step()
    for mine, theirs, s in zip(ours, params, start):
        assert not torch.equal(mine, s)  # it moved
        torch.testing.assert_close(mine, theirs.detach(), rtol=1e-5, atol=1e-7)


# --- Oracle 2: T5X's rule written out ---------------------------------------


def t5x_adafactor(
    param,
    grads,
    learning_rate,
    decay_rate=0.8,
    step_offset=0,
    multiply_by_parameter_scale=True,
    beta1=None,
    clipping_threshold=1.0,
    weight_decay_rate=None,
    min_dim_size_to_factor=128,
    epsilon1=1e-30,
    epsilon2=1e-3,
):
    """t5x/adafactor.py Adafactor.apply_param_gradient, heuristic rule, in numpy float32."""
    f32 = np.float32
    param = param.astype(f32)
    shape = param.shape
    averaging_dims = tuple(range(param.ndim))
    factored_dims = None
    if param.ndim >= 2:
        sorted_dims = np.argsort(shape, kind="stable")
        if shape[sorted_dims[-2]] >= min_dim_size_to_factor:
            factored_dims = (int(sorted_dims[-2]),), (int(sorted_dims[-1]),)
    if factored_dims is not None:
        d1, d0 = factored_dims
        v_row = np.zeros(np.delete(shape, d0), f32)
        v_col = np.zeros(np.delete(shape, d1), f32)
    else:
        v = np.zeros(shape, f32)
    m = np.zeros(shape, f32)
    for step, grad in enumerate(grads):  # T5X's step counter starts at 0
        grad = grad.astype(f32)
        t = f32(step - step_offset) + f32(1.0)
        decay = f32(1.0) - t ** f32(-decay_rate)
        update_scale = f32(learning_rate)
        if multiply_by_parameter_scale:
            param_scale = np.sqrt(np.mean(param * param, axis=averaging_dims, keepdims=True))
            update_scale = update_scale * np.maximum(param_scale, f32(epsilon2))
        mixing_rate = f32(1.0) - decay
        grad_sqr = grad * grad + f32(epsilon1)
        if factored_dims is not None:
            v_row = decay * v_row + mixing_rate * np.mean(grad_sqr, axis=d0)
            v_col = decay * v_col + mixing_rate * np.mean(grad_sqr, axis=d1)
            reduced_d1 = tuple(d - len([e for e in d0 if e < d]) for d in d1)
            row_col_mean = np.mean(v_row, axis=reduced_d1, keepdims=True)
            row_factor = (v_row / row_col_mean) ** f32(-0.5)
            col_factor = v_col ** f32(-0.5)
            y = grad * np.expand_dims(row_factor, axis=d0) * np.expand_dims(col_factor, axis=d1)
        else:
            v = decay * v + mixing_rate * grad_sqr
            y = grad * v ** f32(-0.5)
        if clipping_threshold is not None:
            clipping_denom = np.maximum(
                f32(1.0),
                np.sqrt(np.mean(y * y, axis=averaging_dims, keepdims=True))
                / f32(clipping_threshold),
            )
            y = y / clipping_denom
        subtrahend = update_scale * y
        if beta1 is not None:
            m = f32(beta1) * m + f32(1.0 - beta1) * subtrahend
            subtrahend = m
        if weight_decay_rate is not None:
            param = f32(1.0 - weight_decay_rate) * param - subtrahend
        else:
            param = param - subtrahend
        param = param.astype(f32)
    return param


CASES = {
    "small matrix stays unfactored": dict(shapes=[(64, 200)], kwargs={}),
    "weight decay is not scaled by lr": dict(
        shapes=[(130, 140), (9,)], kwargs=dict(weight_decay_rate=1e-2)
    ),
    "momentum": dict(shapes=[(128, 130)], kwargs=dict(beta1=0.9)),
    "step_offset restarts the decay schedule": dict(
        shapes=[(140, 129)], kwargs=dict(step_offset=-1000)
    ),
    "3-D tensor factors its two largest dims": dict(
        shapes=[(200, 3, 150), (130, 7, 130)], kwargs={}
    ),
    "no parameter scaling, no clipping": dict(
        shapes=[(150, 140), (5, 6)],
        kwargs=dict(multiply_by_parameter_scale=False, clipping_threshold=None),
    ),
    "prompt-tuning setting (p=100 prompt, 100 < 128)": dict(
        shapes=[(100, 256)], kwargs=dict(multiply_by_parameter_scale=False, weight_decay_rate=1e-5)
    ),
}


@pytest.mark.parametrize(**PATHS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_written_out_t5x_rule(case, in_place):
    shapes, kwargs = CASES[case]["shapes"], CASES[case]["kwargs"]
    start, grads, ours = run_ours(shapes, steps=6, lr=0.05, in_place=in_place, **kwargs)
    for i, (s, mine) in enumerate(zip(start, ours)):
        ref = t5x_adafactor(s.numpy(), [g[i].numpy() for g in grads], 0.05, **kwargs)
        np.testing.assert_allclose(mine.numpy(), ref, rtol=2e-5, atol=1e-7)


def test_factoring_rule_is_t5x_heuristic():
    f = Adafactor.factored_dims
    assert f((64, 200)) is None  # second-largest dim 64 < 128
    assert f((128, 200)) == (0, 1)  # row = second largest, col = largest
    assert f((300, 128)) == (1, 0)
    assert f((160, 160)) == (0, 1)  # ties: the later dim counts as larger (stable argsort)
    assert f((200, 3, 150)) == (2, 0)
    assert f((512,)) is None
    assert f((64, 64), min_dim_size_to_factor=32) == (0, 1)


def test_factored_state_is_two_vectors():
    p = torch.nn.Parameter(torch.randn(128, 256))
    opt = Adafactor([p], lr=0.1)
    p.grad = torch.randn_like(p)
    opt.step()
    st = opt.state[p]
    assert st["v_row"].shape == (128,) and st["v_col"].shape == (256,) and "v" not in st
    assert int(st["step"]) == 1


def test_first_step_has_unit_rms_before_scaling():
    # At t=1 decay is 0, so U = G/sqrt(G^2+eps1) = sign(G) when unfactored: RMS 1,
    # clipped to 1 anyway, and the step is exactly lr (no parameter scaling).
    p = torch.nn.Parameter(torch.zeros(10))
    opt = Adafactor([p], lr=0.2, multiply_by_parameter_scale=False)
    p.grad = torch.tensor([1.0, -2.0] * 5)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.tensor([-0.2, 0.2] * 5))


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(1)
    a = torch.nn.Parameter(torch.randn(130, 140))
    b = torch.nn.Parameter(a.detach().clone())
    grads = [torch.randn(130, 140) for _ in range(4)]
    opt_a = Adafactor([a], lr=0.01, beta1=0.9)
    for g in grads:
        a.grad = g.clone()
        opt_a.step()
    opt_b = Adafactor([b], lr=0.01, beta1=0.9)
    for g in grads[:2]:
        b.grad = g.clone()
        opt_b.step()
    saved = opt_b.state_dict()
    opt_c = Adafactor([b], lr=0.01, beta1=0.9)
    opt_c.load_state_dict(saved)
    for g in grads[2:]:
        b.grad = g.clone()
        opt_c.step()
    assert torch.equal(a.detach(), b.detach())
