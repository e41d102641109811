"""Run by tests/test_diagnostics.py under `torchrun --nproc_per_node 2`: gradient
alignment of an FSDP2-sharded model; rank 0 writes the cosines to argv[3]."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch.distributed as dist  # noqa: E402

import data  # noqa: E402
import diagnostics  # noqa: E402
import model  # noqa: E402
from support import fsdp  # noqa: E402

model_dir, data_dir, out = sys.argv[1:4]
ctx = fsdp.setup_distributed("cpu")
t5 = model.build(model.read_config(model_dir), "meta")
fsdp.shard_model(t5, ctx.mesh, list(t5.encoder.blocks) + list(t5.decoder.blocks))
t5.to_empty(device="cpu")
model.load_weights(
    t5, model_dir, copy=lambda name, tensor: fsdp.copy_into_shard(t5.get_parameter(name), tensor)
)
tokenizer = data.Tokenizer(os.path.join(model_dir, "spiece.model"))
task = data.register_tasks(["toy_tf"], data_dir)[0]
examples = data.load_split(task, data_dir, "train")
batch, shuffled = diagnostics.alignment_batches(task, examples, tokenizer, 8, seed=0)
cosines = diagnostics.gradient_alignment(t5, batch, shuffled)
if ctx.rank == 0:
    with open(out, "w") as f:
        json.dump(cosines, f)
dist.destroy_process_group()
fsdp.exit(0)
