"""Peak memory of loading a checkpoint: model.load_pretrained against transformers.

Writes a random checkpoint (t5-v1_1-base shape by default, about 1 GB in fp32
safetensors), then loads it in a fresh process with each library and reports
the peak private (anonymous) memory above the process' baseline, sampled
every millisecond, next to the size of the weights and of the largest
tensor. Pages of a memory-mapped checkpoint file are page cache, not counted:
fp32 weights read from safetensors may stay backed by the file. load_pretrained builds the model on the
meta device and fills it one tensor at a time, so its peak should be the
weights plus about one tensor.

    python bench/load_memory.py [--shape base|small] [--dtype float32|bfloat16]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SHAPES = {
    "small": dict(
        vocab_size=32128,
        d_model=512,
        d_kv=64,
        d_ff=1024,
        num_layers=8,
        num_decoder_layers=8,
        num_heads=6,
    ),
    "base": dict(
        vocab_size=32128,
        d_model=768,
        d_kv=64,
        d_ff=2048,
        num_layers=12,
        num_decoder_layers=12,
        num_heads=12,
    ),
}

CHILD = r"""
import json, sys, threading, time, torch
sys.path[:0] = [{root!r}]
import model, safetensors.torch, transformers  # libraries count in the baseline, not in the peak

def anon_mb():  # private (anonymous) memory: file pages of a memory-mapped checkpoint are not counted
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon")) / 1024

peak, running = [0.0], [True]
def sample():
    while running[0]:
        peak[0] = max(peak[0], anon_mb())
        time.sleep(0.001)
before = anon_mb()
sampler = threading.Thread(target=sample)
sampler.start()
if {which!r} == "promot":
    net = model.load_pretrained({path!r}, dtype=getattr(torch, {dtype!r}))
else:
    from transformers import AutoModelForSeq2SeqLM
    net = AutoModelForSeq2SeqLM.from_pretrained({path!r}, dtype=getattr(torch, {dtype!r}))
running[0] = False
sampler.join()
print(json.dumps({{"peak_mb": max(peak[0], anon_mb()) - before,
                   "params_mb": sum(p.numel() * p.element_size() for p in net.parameters()) / 2**20}}))
"""


def measure(which, path, dtype):
    child = CHILD.format(root=ROOT, which=which, path=path, dtype=dtype)
    out = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, cwd=ROOT, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shape", default="base", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
    from helpers import make_checkpoint

    with tempfile.TemporaryDirectory() as d:
        make_checkpoint(d, kind="t5v1_1", **SHAPES[args.shape])
        file_mb = os.path.getsize(os.path.join(d, "model.safetensors")) / 2**20
        cfg = SHAPES[args.shape]
        largest_mb = cfg["vocab_size"] * cfg["d_model"] * 4 / 2**20
        results = {which: measure(which, d, args.dtype) for which in ("promot", "transformers")}
    print(
        f"{args.shape} t5v1_1 checkpoint: {file_mb:.0f} MB on disk (fp32), largest tensor {largest_mb:.0f} MB; "
        f"loading as {args.dtype}"
    )
    for which, r in results.items():
        extra = r["peak_mb"] - r["params_mb"]
        note = (
            f"+{extra:.0f} MB over the weights"
            if extra >= 0
            else "weights stay memory-mapped from the file"
        )
        print(
            f"{which:12s} peak {r['peak_mb']:7.0f} MB private memory for {r['params_mb']:6.0f} MB of "
            f"parameters ({note})"
        )
    print(
        f"peak load memory ratio (transformers/promot): "
        f"{results['transformers']['peak_mb'] / results['promot']['peak_mb']:.2f}x"
    )


if __name__ == "__main__":
    main()
