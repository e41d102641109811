"""model.py and decode.py together are a copy unit for inference: copied alone into an empty
folder and run by a Python that cannot see the project, they beam-search a checkpoint in a few
lines (`model.start_decoding`, then `decode.generate`). With length_rule="transformers" the
tokens are transformers' `generate(num_beams=4, length_penalty=..., early_stopping=False,
do_sample=False)` on the same checkpoint (the oracle); the default (the paper's T5X rule)
decodes as evaluate.generate does in the project, whose T5X parity tests/test_t5x_decoding.py
checks."""

import os
import shutil
import subprocess
import sys

import torch
from helpers import random_batch
from test_evaluate_generate import VOCAB, checkpoint_that_stops

import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_NEW = 12

# Runs in the folder that holds only model.py, decode.py, the checkpoint and the batch.
ALONE = r"""
import sys
import torch
import model, decode

assert "support" not in sys.modules  # nothing of promot here
ids, mask = torch.load("batch.pt")
t5 = model.load_pretrained("ckpt").eval()
eos = t5.config.eos_token_id  # transformers fills a row after its EOS with EOS, T5's pad being 0
out = {}
with torch.no_grad():
    step, reorder, state, start = model.start_decoding(t5, ids, mask)
    out["transformers"] = decode.generate(
        step, reorder, state, start, 12, eos, eos, num_beams=4, length_penalty=0.6,
        length_rule="transformers"
    )
    step, reorder, state, start = model.start_decoding(t5, ids, mask)
    out["default"] = decode.generate(step, reorder, state, start, 12, eos, eos)
torch.save(out, "out.pt")
"""


def test_model_py_and_decode_py_copied_alone_beam_search_a_checkpoint_as_transformers(tmp_path):
    for unit in ("model.py", "decode.py"):
        shutil.copy(os.path.join(ROOT, unit), tmp_path / unit)
    ours, oracle = checkpoint_that_stops(tmp_path / "ckpt", seed=1)  # EOS now and then
    ids, mask, _ = random_batch(VOCAB, batch=6, src_len=12, seed=4)
    torch.save((ids, mask), tmp_path / "batch.pt")
    assert sorted(os.listdir(tmp_path)) == ["batch.pt", "ckpt", "decode.py", "model.py"]

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-E", "-c", ALONE],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")

    with torch.no_grad():
        expected = oracle.generate(
            input_ids=ids,
            attention_mask=mask,
            num_beams=4,
            length_penalty=0.6,
            early_stopping=False,
            do_sample=False,
            max_new_tokens=MAX_NEW,
        )[:, 1:]  # without the decoder start token
    torch.testing.assert_close(out["transformers"], expected, rtol=0, atol=0)
    eos = ours.config.eos_token_id
    lengths = {row.index(eos) + 1 if eos in row else len(row) for row in expected.tolist()}
    assert len(lengths) > 2  # answers of several lengths: examples closed at different steps
    paper = evaluate.generate(ours, ids, mask, max_new_tokens=MAX_NEW)  # beam 4, T5X, alpha 0.6
    torch.testing.assert_close(out["default"], paper, rtol=0, atol=0)
    assert out["default"].tolist() != out["transformers"].tolist()  # two rules, two answers here
