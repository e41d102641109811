"""Forward and training-step speed of model.T5 against transformers, side by side.

Same config (t5-small shape by default, random weights), same inputs, fp32 on
CPU, in one process. Prints per-iteration times and, last, the speed ratios
(transformers time / our time; above 1 means we are faster).

    python bench/model.py [--kind t5v1_1] [--batch 8 --src 256 --tgt 64] [--iters 5]
"""

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path[:0] = [
    os.path.join(os.path.dirname(__file__), ".."),
    os.path.join(os.path.dirname(__file__), "..", "tests"),
]
import model  # noqa: E402
from support import t5x_loss  # noqa: E402
from helpers import load_oracle, make_checkpoint  # noqa: E402

SHAPES = {
    "small": dict(
        vocab_size=32128,
        d_model=512,
        d_kv=64,
        d_ff=2048,
        num_layers=6,
        num_decoder_layers=6,
        num_heads=8,
        dropout_rate=0.0,
    )
}


def timed(fn, iters):
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--kind", default="t5v1_1", choices=["t5", "t5v1_1", "mt5"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--src", type=int, default=256)
    ap.add_argument("--tgt", type=int, default=64)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        make_checkpoint(d, kind=args.kind, **SHAPES["small"])
        ours, theirs = model.load_pretrained(d), load_oracle(d)
    vocab = ours.config.vocab_size
    ids = torch.randint(2, vocab, (args.batch, args.src))
    mask = torch.ones_like(ids)
    mask[::2, args.src // 2 :] = 0  # half the rows padded to half length
    labels = torch.randint(2, vocab, (args.batch, args.tgt))
    dec = model.shift_right(labels)

    def ours_forward():
        with torch.no_grad():
            ours(ids, mask, dec)

    def theirs_forward():
        with torch.no_grad():
            theirs(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)

    def ours_step():
        total, count = t5x_loss.cross_entropy(ours(ids, mask, dec), labels)
        (total / count).backward()
        ours.zero_grad(set_to_none=True)

    def theirs_step():
        theirs(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        theirs.zero_grad(set_to_none=True)

    ours.train(), theirs.train()  # dropout is 0: train mode only turns on autograd bookkeeping
    results = {}
    for name, a, b in (
        ("forward", ours_forward, theirs_forward),
        ("train step", ours_step, theirs_step),
    ):
        t_ours, t_theirs = timed(a, args.iters), timed(b, args.iters)
        results[name] = t_theirs / t_ours
        print(
            f"{name:10s}  promot {t_ours * 1e3:8.1f} ms   transformers {t_theirs * 1e3:8.1f} ms   "
            f"({args.batch}x{args.src} -> {args.tgt} tokens, {torch.get_num_threads()} threads)"
        )
    print(" ".join(f"{k} speed ratio (transformers/promot): {v:.2f}x" for k, v in results.items()))


if __name__ == "__main__":
    main()
