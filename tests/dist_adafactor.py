"""Run by tests/test_promot_distributed.py under `torchrun --nproc_per_node 2`.

Each rank holds shards (dim 0, FSDP2's layout, uneven sizes included) of the
same parameters; Adafactor must take exactly the steps that one
process takes on the full tensors. Rank 0 writes "OK" to argv[1] on success.
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from support import fsdp
from support.adafactor import Adafactor

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
torch.manual_seed(0)
# (shape, sharded dim is ...): row statistic side / column side / vector / uneven / unfactored / 3-D
shapes = [(130, 256), (300, 140), (9,), (129, 131), (5, 7), (150, 3, 200)]
full = [torch.randn(s) for s in shapes]
grads = [[torch.randn(s) for s in shapes] for _ in range(4)]
results = {}
for kwargs in [
    dict(),
    dict(beta1=0.9, weight_decay_rate=1e-3),
    dict(multiply_by_parameter_scale=False),
]:
    plain = [torch.nn.Parameter(t.clone()) for t in full]
    sharded = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in full]
    opt_plain = Adafactor(plain, lr=0.05, **kwargs)
    opt_sharded = Adafactor(sharded, lr=0.05, **kwargs)
    for step_grads in grads:
        for p, q, g in zip(plain, sharded, step_grads):
            p.grad = g.clone()
            q.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
        opt_plain.step()
        opt_sharded.step()
    for p, q in zip(plain, sharded):
        torch.testing.assert_close(q.full_tensor(), p.detach(), rtol=1e-6, atol=1e-7)
    # the state is sharded like the parameter where it keeps dim 0
    st = opt_sharded.state[sharded[0]]
    assert st["v_row"].placements[0].is_shard() and st["v_col"].placements[0].is_replicate()
dist.barrier()
if dist.get_rank() == 0:
    with open(sys.argv[1], "w") as f:
        f.write("OK")
dist.destroy_process_group()
fsdp.exit(0)  # without the interpreter's teardown, which can abort under gloo
