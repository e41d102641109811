"""Beam search speed of evaluate.generate against transformers' generate, side by side.

Same random checkpoint (t5-small shape by default), same inputs, same settings (beam 4,
length penalty 1, early_stopping=False), fp32 on CPU, in one process, alternating the two
so that a busy machine slows both alike. Checks that both return the same tokens, prints
tokens/s of each and, on the last line, the ratio (ours / transformers; above 1 means we
are faster).

    python bench/generate.py [--shape small|tiny] [--batch 8 --src 64 --new 32] [--beams 4] [--iters 3]
"""

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path[:0] = [os.path.join(os.path.dirname(__file__), ".."), os.path.join(os.path.dirname(__file__), "..", "tests")]
import evaluate  # noqa: E402
import model  # noqa: E402
from helpers import load_oracle, make_checkpoint  # noqa: E402

SHAPES = {
    "small": dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6,
                  num_heads=8, dropout_rate=0.0),  # t5-small / t5-v1_1-small shape
    "tiny": dict(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                 num_heads=4, dropout_rate=0.0),  # per-step overhead dominates
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", default="t5v1_1", choices=["t5", "t5v1_1", "mt5"])
    ap.add_argument("--shape", default="small", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--src", type=int, default=64, help="input length (half the rows padded to half)")
    ap.add_argument("--new", type=int, default=32, help="max_new_tokens")
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads [torch's default]")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        make_checkpoint(d, kind=args.kind, **SHAPES[args.shape])
        ours, theirs = model.load_pretrained(d).eval(), load_oracle(d)
    ids = torch.randint(2, ours.config.vocab_size, (args.batch, args.src))
    mask = torch.ones_like(ids)
    mask[::2, args.src // 2:] = 0
    settings = dict(num_beams=args.beams, max_new_tokens=args.new, length_penalty=1.0)

    def run_ours():
        return evaluate.generate(ours, ids, mask, **settings)

    def run_theirs():
        with torch.no_grad():
            return theirs.generate(input_ids=ids, attention_mask=mask, do_sample=False, early_stopping=False,
                                   **settings)[:, 1:]

    a, b = run_ours(), run_theirs()  # warm-up, and the tokens must agree
    same = a.shape == b.shape and torch.equal(a, b)
    # tokens generated = returned tokens up to and including each row's first EOS
    ends = [(row == ours.config.eos_token_id).nonzero() for row in a]
    tokens = sum(int(e[0]) + 1 if len(e) else a.shape[1] for e in ends)
    times = {"promot": 0.0, "transformers": 0.0}
    for _ in range(args.iters):
        for name, fn in (("promot", run_ours), ("transformers", run_theirs)):
            start = time.perf_counter()
            fn()
            times[name] += time.perf_counter() - start
    print(f"{args.shape} {args.kind}: batch {args.batch} x {args.src} input tokens, beam {args.beams}, "
          f"{args.new} new tokens max, {torch.get_num_threads()} threads; same tokens: {same}")
    rates = {}
    for name, total in times.items():
        rates[name] = tokens * args.iters / total
        print(f"{name:12s} {total / args.iters * 1e3:9.1f} ms per call   {rates[name]:9.1f} tokens/s")
    print(f"beam search speed ratio (promot/transformers tokens per second): {rates['promot'] / rates['transformers']:.2f}x")


if __name__ == "__main__":
    main()
