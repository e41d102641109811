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
import promot  # noqa: E402

model_dir, data_dir, out = sys.argv[1:4]
ctx = promot.setup_distributed("cpu")
t5 = model.build(model.T5Config.from_json(os.path.join(model_dir, "config.json")), "meta")
promot.shard_model(t5, ctx.mesh)
t5.to_empty(device="cpu")
promot.load_sharded(t5, model_dir)
tokenizer = data.Tokenizer(os.path.join(model_dir, "spiece.model"))
examples = data.load_split(data.get_task("toy_tf", data_dir), data_dir, "train")
batch, shuffled = diagnostics.alignment_batches("toy_tf", examples, tokenizer, 8, seed=0)
cosines = diagnostics.gradient_alignment(t5, batch, shuffled)
if ctx.rank == 0:
    with open(out, "w") as f:
        json.dump(cosines, f)
dist.destroy_process_group()
