"""model.py is a copy unit (STYLE.md): copied alone into an empty folder and run by a Python
that cannot see the project, it builds a T5 from a config dict, runs it with a soft prompt,
loads a public-layout checkpoint (one safetensors file, or shards named by an index) with the
logits transformers gives, and saves a checkpoint that it and transformers read back."""

import os
import shutil
import subprocess
import sys

import torch
from helpers import load_oracle, make_checkpoint, random_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in the folder that holds only model.py; writes what it computed to out.pt.
ALONE = r"""
import sys
import torch
import model

assert model.BadInput is ValueError and "support" not in sys.modules  # nothing of promot here
folders, ids, mask, dec = sys.argv[1:], *torch.load("batch.pt")
out = {}

# (a) build from a config dict, (b) forward with a soft prompt
config = model.T5Config.from_dict(
    {"vocab_size": 64, "d_model": 16, "d_kv": 4, "d_ff": 32, "num_layers": 2, "num_heads": 4,
     "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False, "model_type": "mt5"}
)
torch.manual_seed(0)
net = model.build(config, "cpu").eval()
with torch.no_grad():
    x = torch.randint(2, 64, (2, 7))
    out["built"] = net(x, torch.ones_like(x), x[:, :4], prompt=torch.randn(3, 16))

# (c) load public checkpoints, (d) save one and read it back
with torch.no_grad():
    for folder in folders:
        t5 = model.load_pretrained(folder).eval()
        out[folder] = t5(ids, mask, dec, prompt=torch.ones(2, t5.config.d_model))
        if folder.endswith("sharded"):
            model.save_pretrained(t5, "saved", max_shard_bytes=20_000)
            out["saved"] = model.load_pretrained("saved").eval()(ids, mask, dec)
            out["before saving"] = t5(ids, mask, dec)
try:
    model.load_pretrained("bin")
except ValueError as e:
    out["bin"] = str(e)
try:  # alone, a save never replaces a folder half-way: that needs support/hf_files.py
    model.save_pretrained(net, "saved")
except ValueError as e:
    out["saved again"] = str(e)
torch.save(out, "out.pt")
"""


def test_model_py_copied_alone_builds_runs_loads_and_saves(tmp_path):
    shutil.copy(os.path.join(ROOT, "model.py"), tmp_path / "model.py")
    config = make_checkpoint(tmp_path / "single", kind="t5v1_1")
    make_checkpoint(tmp_path / "sharded", kind="t5v1_1", layout="sharded")
    make_checkpoint(tmp_path / "bin", kind="t5", layout="bin")
    ids, mask, dec = random_batch(config["vocab_size"])
    torch.save((ids, mask, dec), tmp_path / "batch.pt")
    assert sorted(os.listdir(tmp_path)) == ["batch.pt", "bin", "model.py", "sharded", "single"]

    result = subprocess.run(
        [sys.executable, "-E", "-c", ALONE, "single", "sharded"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = torch.load(tmp_path / "out.pt")

    assert out["built"].shape == (2, 4, 64) and torch.isfinite(out["built"]).all()
    oracle = load_oracle(tmp_path / "single")
    prompt = torch.ones(2, config["d_model"])
    embeds = torch.cat([prompt.expand(3, -1, -1), oracle.shared(ids)], dim=1)
    with torch.no_grad():
        extended = torch.cat([torch.ones(3, 2, dtype=mask.dtype), mask], dim=1)
        expected = oracle(inputs_embeds=embeds, attention_mask=extended, decoder_input_ids=dec)
    for folder in ("single", "sharded"):  # the same checkpoint in both layouts (same seed)
        torch.testing.assert_close(out[folder], expected.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(out["saved"], out["before saving"])
    assert len(set(os.listdir(tmp_path / "saved"))) > 2  # config.json, an index and its shards
    with torch.no_grad():
        theirs = load_oracle(tmp_path / "saved")(
            input_ids=ids, attention_mask=mask, decoder_input_ids=dec
        )
    torch.testing.assert_close(theirs.logits, out["saved"], rtol=1e-5, atol=1e-5)
    assert out["bin"] == (
        f"{os.path.join('bin', 'pytorch_model.bin')}: reading pytorch_model.bin needs promot's "
        "support/hf_files.py beside model.py"
    )
    # (transformers read "saved" back above: the refused second save left the first as it was)
    assert out["saved again"] == (
        "saved: exists; saving over a checkpoint folder needs promot's support/hf_files.py "
        "beside model.py"
    )
