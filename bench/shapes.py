"""The model shapes the benches run at, a random checkpoint of each, and the GEMM peak they are measured against.

A checkpoint is made by tests/helpers.make_checkpoint (transformers' own
initialisation, written in the public Hugging Face layout), so promot and
transformers load the same weights from the same files.
"""

import os
import shutil
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

# name -> (checkpoint kind, config). "t5-small" is a T5.1.1 (gated GELU, separate head) at
# t5-small's depth and width with t5-v1_1-small's d_ff; the others are the public configs.
SHAPES = {
    "tiny": (
        "t5v1_1",
        dict(
            vocab_size=512,
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
        ),
    ),
    "t5-small": (
        "t5v1_1",
        dict(
            vocab_size=32128,
            d_model=512,
            d_kv=64,
            d_ff=1024,
            num_layers=6,
            num_decoder_layers=6,
            num_heads=8,
        ),
    ),
    "t5-base": (
        "t5v1_1",
        dict(
            vocab_size=32128,
            d_model=768,
            d_kv=64,
            d_ff=2048,
            num_layers=12,
            num_decoder_layers=12,
            num_heads=12,
        ),
    ),
    "mt5-large": (
        "mt5",
        dict(
            vocab_size=250112,
            d_model=1024,
            d_kv=64,
            d_ff=2816,
            num_layers=24,
            num_decoder_layers=24,
            num_heads=16,
        ),
    ),
}


def make_checkpoint(shape, folder):
    """A random checkpoint of `shape` in `folder`, made once and reused after (the GPU
    script hands the same folder to every bench). Its dropout rate is T5's 0.1, which
    transformers reads for training, attention probabilities included."""
    from helpers import make_checkpoint as write

    if not os.path.isfile(os.path.join(folder, "config.json")):
        kind, config = SHAPES[shape]
        partial = (
            folder.rstrip("/") + ".partial"
        )  # renamed when complete: a killed run leaves no half checkpoint
        shutil.rmtree(partial, ignore_errors=True)
        write(partial, kind=kind, dropout_rate=0.1, **config)
        if os.path.isdir(folder):
            os.rmdir(folder)  # an empty folder (a temporary directory) gives way
        os.replace(partial, folder)
    return folder


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def gemm_peak(device, dtype, n=None, repeats=5):
    """FLOP/s of the best of `repeats` (n x n) @ (n x n) products: what this machine's matrix
    multiply reaches now, the yardstick of the achieved fraction."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a, b = (
        torch.randn(n, n, device=device, dtype=dtype),
        torch.randn(n, n, device=device, dtype=dtype),
    )
    a @ b
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, for MFU.
BF16_PEAK_TFLOPS = {
    "H200": 989,
    "H100 SXM": 989,
    "H100 NVL": 835,
    "H100 PCIe": 756,
    "H100": 989,
    "A100": 312,
    "L40S": 362,
    "A10G": 70,
    "L4": 121,
}


def bf16_peak(device):
    """(name, FLOP/s) of the card's data-sheet bf16 peak, or (name, None) when unknown."""
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    for key, tflops in BF16_PEAK_TFLOPS.items():
        if key in name:
            return name, tflops * 1e12
    return name, None
