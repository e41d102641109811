"""The plain rules of support/ against oracles outside them, so a bug shared by a plain path and
its fast twin still fails (tests/test_speed_paths.py holds the twins equal).

1. support/t5x_loss.py, both paths: T5X's smoothed cross-entropy and z-loss written as a soft
   target distribution in float64 (T5X's `cross_entropy_with_logits` against
   `onehot(target) * (on - off) + off`, minus that distribution's entropy), gradient by autograd.
2. support/adafactor.py's plain `update` on FSDP2-sharded parameters under torchrun: the steps
   of one process (tests/dist_adafactor.py covers the in-place default the same way).
(Adafactor's plain and in-place paths against transformers' Adafactor and T5X's rule in numpy:
tests/test_adafactor.py.)
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from support.t5x_loss import cross_entropy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def t5x_loss_in_float64(logits, labels, label_smoothing, z_loss):
    """Sum over kept tokens of -sum(q * log_softmax) - H(q) + z_loss * logsumexp^2, where q puts
    1 - s on the label and s / (V - 1) on every other token."""
    keep = labels != -100
    x = logits.double()
    vocab = x.shape[-1]
    off = label_smoothing / (vocab - 1)
    q = torch.full_like(x, off).scatter(-1, labels.clamp(min=0)[..., None], 1.0 - label_smoothing)
    entropy = -torch.special.xlogy(q, q).sum(-1)
    loss = -(q * torch.log_softmax(x, -1)).sum(-1) - entropy + z_loss * x.logsumexp(-1) ** 2
    return (loss * keep).sum()


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("z_loss", [0.0, 1e-4])
def test_loss_and_gradient_equal_the_soft_target_formula_in_float64(fused, label_smoothing, z_loss):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 1000, generator=g) * 4
    labels = torch.randint(0, 1000, (3, 5), generator=g)
    labels[1, 3:] = -100
    ours = logits.clone().requires_grad_()
    total, count = cross_entropy(ours, labels, label_smoothing, z_loss, fused=fused)
    (total / count).backward()
    oracle = logits.double().requires_grad_()
    expected = t5x_loss_in_float64(oracle, labels, label_smoothing, z_loss)
    (expected / 13).backward()
    assert count == 13
    torch.testing.assert_close(total.double(), expected.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(ours.grad.double(), oracle.grad, rtol=1e-4, atol=1e-9)


SHARDED_PLAIN_STEPS = """
    import sys
    import torch, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from support import fsdp
    from support.adafactor import Adafactor

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    # sharded on the row side, the column side, a vector, uneven, unfactored, 3-D
    shapes = [(130, 256), (300, 140), (9,), (129, 131), (5, 7), (150, 3, 200)]
    full = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(4)]
    settings = dict(lr=0.05, beta1=0.9, weight_decay_rate=1e-3)
    one = [torch.nn.Parameter(t.clone()) for t in full]
    plain, fast = (
        [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in full]
        for _ in range(2)
    )
    opts = [
        Adafactor(one, in_place=False, **settings),
        Adafactor(plain, in_place=False, **settings),
        Adafactor(fast, **settings),
    ]
    for step_grads in grads:
        for p, q, r, g in zip(one, plain, fast, step_grads):
            p.grad = g.clone()
            q.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
            r.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        for opt in opts:
            opt.step()
    for p, q, r in zip(one, plain, fast):
        assert torch.equal(q.to_local(), r.to_local())  # the same bits, sharded too
        # the sums over the sharded dim are added in another order: to float32 rounding
        torch.testing.assert_close(q.full_tensor(), p.detach(), rtol=1e-6, atol=1e-7)
        for key, value in opts[1].state[q].items():  # the state, placed alike
            other = opts[2].state[r][key]
            if key != "step":
                assert value.placements == other.placements, key
                value, other = value.to_local(), other.to_local()
            assert torch.equal(value, other), key
    dist.barrier()
    if dist.get_rank() == 0:
        open(sys.argv[1], "w").write("OK")
    dist.destroy_process_group()
    fsdp.exit(0)
"""


def test_plain_adafactor_on_sharded_parameters_takes_the_single_process_steps(tmp_path):
    script = tmp_path / "sharded_plain_steps.py"
    script.write_text(textwrap.dedent(SHARDED_PLAIN_STEPS))
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]
    proc = subprocess.run(
        [*cmd, str(script), str(tmp_path / "ok")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "ok").read_text() == "OK"
