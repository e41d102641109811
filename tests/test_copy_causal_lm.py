"""causal_lm.py is a copy unit (STYLE.md): copied alone into an empty folder and run by a Python
that cannot see the project, it loads a tiny checkpoint that transformers wrote (one safetensors
file, and shards named by an index) and runs it with a soft prompt, with the logits
transformers gives for `inputs_embeds=[P; embed(x)]` in this process."""

import os
import shutil

import torch
from test_causal_lm import HIDDEN, load_oracle, make_causal_checkpoint, oracle_logits
from test_layout import run_alone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in the folder that holds only causal_lm.py; writes what it computed to out.pt.
ALONE = """
    import sys
    import torch
    import causal_lm

    assert causal_lm.BadInput is ValueError and "support" not in sys.modules  # nothing of promot
    ids, prompt = torch.load("batch.pt")
    out = {}
    with torch.no_grad():
        for folder in ("single", "sharded"):
            model = causal_lm.load_pretrained(folder)
            out[folder] = model(ids, torch.ones_like(ids), prompt=prompt)
    torch.save(out, "out.pt")
"""


def test_causal_lm_py_copied_alone_loads_and_runs_with_a_prompt(tmp_path):
    shutil.copy(os.path.join(ROOT, "causal_lm.py"), tmp_path / "causal_lm.py")
    make_causal_checkpoint(tmp_path / "single", kind="qwen3_head_dim")
    make_causal_checkpoint(tmp_path / "sharded", kind="qwen3_head_dim", layout="sharded")
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    prompt = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(1))
    torch.save((ids, prompt), tmp_path / "batch.pt")
    assert sorted(os.listdir(tmp_path)) == ["batch.pt", "causal_lm.py", "sharded", "single"]

    result = run_alone(tmp_path, ALONE)
    assert result.returncode == 0, result.stderr
    out = torch.load(tmp_path / "out.pt")

    with torch.no_grad():
        expected = oracle_logits(load_oracle(tmp_path / "single"), prompt, ids)
    for folder in ("single", "sharded"):  # the same weights (same seed) in both layouts
        assert out[folder].shape == (2, 3 + 7, 100)
        assert (out[folder] - expected).abs().max() < 1e-4
