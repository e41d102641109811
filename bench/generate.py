"""Beam search speed of evaluate.generate against transformers' generate, side by side.

Same random checkpoint (bench/shapes.py, t5-small shape by default), same inputs, same
settings (beam 4, length penalty 1, early_stopping=False; ours asked for transformers' length
rule by name, length_rule="transformers"), in one process, the two taking
turns so that a busy machine slows both alike. Two batches:
  padded  random inputs, half the rows padded to half length; a random model rarely writes
          EOS, so the answers run to --new tokens (the search's cost per step);
  mixed   half the examples answer in one word, the others write --new tokens, as in an
          evaluation batch of short answers and long translations. The model's EOS row is
          set to point from the long examples' decoder states to the short ones' (the short
          inputs repeat one token), in both models.
Checks that both return the same tokens, prints tokens/s of each and, last, the ratios
(transformers time / ours; above 1 means we are faster).

    python bench/generate.py [--shape t5-small|tiny|t5-base|mt5-large] [--batch 8 --src 64 --new 32]
                             [--beams 4] [--iters 3] [--threads 1] [--device cuda --dtype bfloat16]
"""

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shapes import SHAPES, make_checkpoint, sync  # noqa: E402

import evaluate  # noqa: E402
import model  # noqa: E402
from helpers import load_oracle  # noqa: E402


def padded_batch(vocab, batch, src, device):
    ids = torch.randint(2, vocab, (batch, src), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[::2, src // 2 :] = 0
    return ids.to(device), mask.to(device)


@torch.no_grad()
def make_answers_mixed(ours, theirs, ids, mask, gap=8.0):
    """Half the batch (even rows, their input one token repeated) answers in one word: the EOS
    row of both heads points from the other rows' decoder states to theirs, scaled so EOS
    scores `gap` nats more on average there. Returns the batch."""
    short = torch.arange(len(ids), device=ids.device) % 2 == 0
    ids = ids.clone()
    ids[short] = 7
    states = []
    hook = ours.decoder.register_forward_hook(
        lambda module, args, out: states.append(out[:, -1].float())
    )
    evaluate.generate(ours, ids, mask, num_beams=1, max_new_tokens=4)
    hook.remove()
    h = torch.stack(states)  # (steps, batch, d_model)
    direction = h[:, short].flatten(0, 1).mean(0) - h[:, ~short].flatten(0, 1).mean(0)
    row = direction * gap / ((h[:, short] @ direction).mean() - (h[:, ~short] @ direction).mean())
    ours.lm_head.weight[ours.config.eos_token_id] = row.to(ours.lm_head.weight.dtype)
    theirs.lm_head.weight[ours.config.eos_token_id] = row.to(theirs.lm_head.weight.dtype)
    return ids, mask


def race(ours, theirs, ids, mask, args, device):
    """(same tokens?, answer lengths, {name: seconds per call}) over --iters turns each."""
    settings = dict(num_beams=args.beams, max_new_tokens=args.new, length_penalty=1.0)

    def run_ours():
        return evaluate.generate(ours, ids, mask, length_rule="transformers", **settings)

    def run_theirs():
        with torch.no_grad():
            return theirs.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                early_stopping=False,
                **settings,
            )[:, 1:]

    a, b = run_ours(), run_theirs()  # warm-up, and the tokens must agree
    same = a.shape == b.shape and torch.equal(a, b)
    # an answer's length: its tokens up to and including its first EOS
    ends = [(row == ours.config.eos_token_id).nonzero() for row in a]
    lengths = [int(e[0]) + 1 if len(e) else a.shape[1] for e in ends]
    times = {"promot": 0.0, "transformers": 0.0}
    for i in range(args.iters):
        for name, fn in (("promot", run_ours), ("transformers", run_theirs))[
            :: 1 if i % 2 == 0 else -1
        ]:
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name] += (time.perf_counter() - start) / args.iters
    return same, lengths, times


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shape", default="t5-small", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument(
        "--src", type=int, default=64, help="input length (half the rows padded to half)"
    )
    ap.add_argument("--new", type=int, default=32, help="max_new_tokens")
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads [torch's default]")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument(
        "--ckpt", default=None, help="checkpoint folder to make or reuse [a temporary one]"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(args.shape, args.ckpt or tmp)
        ours = model.load_pretrained(ckpt, dtype=dtype, device=device).eval()
        theirs = load_oracle(ckpt).to(device=device, dtype=dtype)
    on = f"{args.dtype} on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
    print(
        f"{args.shape}: batch {args.batch} x {args.src} input tokens, beam {args.beams}, "
        f"{args.new} new tokens "
        f"max, {on}, {torch.get_num_threads()} threads"
    )
    ratios = []
    padded = padded_batch(ours.config.vocab_size, args.batch, args.src, device)
    for case, (ids, mask) in (
        ("padded", padded),
        ("mixed", make_answers_mixed(ours, theirs, *padded)),
    ):
        same, lengths, times = race(ours, theirs, ids, mask, args, device)
        tokens = sum(lengths)
        print(f"  {case}: answer lengths {lengths}; same tokens: {same}")
        for name, seconds in times.items():
            rate = f"{tokens / seconds:9.1f} tokens/s"
            print(f"    {name:12s} {seconds * 1e3:9.1f} ms per call   {rate}")
        ratios.append(f"{case} {times['transformers'] / times['promot']:.2f}x")
    print(
        f"beam search speed ratios (transformers time / promot time, {args.shape}, {on}): "
        + ", ".join(ratios)
    )


if __name__ == "__main__":
    main()
