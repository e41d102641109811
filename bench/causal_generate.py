"""Greedy and beam-4 decoding speed of causal_lm.py + decode.py against transformers' generate.

    python bench/causal_generate.py            # hidden 512, 8 layers, batch 8 x (50 prompt + 64)
    python bench/causal_generate.py --quick    # tiny sizes, one call each: the smoke test

Both sides load one random Llama checkpoint (bench/causal_train.py's, written by transformers)
on one CPU thread and decode the same left-padded batch (every other row padded to half
length) behind a 50-token soft prompt (App. C.6's length): ours with
`causal_lm.start_decoding` and `decode.generate(..., length_rule="transformers")`,
transformers' with `generate(inputs_embeds=[pads; P; embed(x)], do_sample=False,
num_beams=..., length_penalty=1.0, early_stopping=False)`, the prompt placed right before each
row's first real token as causal_lm.py places it. Two kinds of answers, each searched greedily
and with --beams:
  to the limit  a random model rarely writes EOS (id 2), so every answer runs to --new tokens:
                the same work on both sides (decode.py's dropping of finished rows saves nothing);
  mixed         answers of different lengths, as evaluate.py's are (a True/False, a name, a
                translation): the end-of-answer id is one the model writes in most rows at
                different steps of their greedy answers (picked from the first search, the same
                id on both sides). decode.py drops a row when it ends; transformers' generate
                decodes every row until the last one ends.

The floor printed first: ours' prefill (the prompt and inputs through every layer, once), and the
matrix products of one decoding step alone at the batch's rows (every weight read once): a
greedy call can not cost less than the prefill plus --new floors, on either side.

Both must return the same tokens (up to each answer's EOS) before timing; then the two take
turns, --iters calls each, and the medians count. Printed per search: the answer lengths, each
side's median time per call, wall and CPU (this process's CPU time, which leaves out the time
other jobs held the core: the steadier measure on a shared machine), its tokens/s (answer
tokens, EOS included), and the ratio (transformers' time / ours: above 1 favours ours); the
last line holds the ratios.
"""

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from causal_train import EOS, PAD, QUICK, SIZES, load, machine, make_checkpoint  # noqa: E402
from causal_train import take_turns  # noqa: E402

import causal_lm  # noqa: E402  (the repository root is on sys.path since causal_train)
import decode  # noqa: E402


def left_padded_batch(args):
    """(input_ids, attention_mask, prompt token ids): odd rows padded on the left to half
    length; the prompt will be those tokens' embeddings (prompt tuning's initialisation)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab, (args.batch, args.src), generator=g)
    mask = torch.ones_like(ids)
    mask[1::2, : args.src // 2] = 0
    ids[mask == 0] = PAD
    return ids, mask, torch.randint(3, args.vocab, (args.prompt,), generator=g)


@torch.no_grad()
def ours(net, ids, mask, prompt, num_beams, max_new_tokens, eos):
    step, reorder, state, start = causal_lm.start_decoding(net, ids, mask, prompt)
    return decode.generate(
        step,
        reorder,
        state,
        start,
        max_new_tokens,
        eos,
        PAD,
        num_beams=num_beams,
        length_penalty=1.0,
        length_rule="transformers",
    )


@torch.no_grad()
def theirs(net, ids, mask, prompt, num_beams, max_new_tokens, eos):
    """transformers' generate over [pads; P; x] per row (it returns the new tokens only)."""
    embeds = torch.cat([prompt.expand(len(ids), -1, -1), net.get_input_embeddings()(ids)], 1)
    full = torch.cat([mask.new_ones(len(ids), prompt.shape[0]), mask], 1)
    p, rows = prompt.shape[0], []
    for e, m, pads in zip(embeds, full, (mask == 0).sum(1).tolist()):
        order = torch.cat(
            [torch.arange(p, p + pads), torch.arange(p), torch.arange(p + pads, len(e))]
        )
        rows.append((e[order], m[order]))
    embeds, full = (torch.stack(t) for t in zip(*rows))
    return net.generate(
        inputs_embeds=embeds,
        attention_mask=full,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=num_beams,
        length_penalty=1.0,
        early_stopping=False,
        eos_token_id=eos,
        pad_token_id=PAD,
    )


def floor(net, batch, rows, rounds):
    """(ours' prefill, one decoding step's matrix products alone at `rows` rows), CPU seconds
    (medians): the cost of a greedy call that no implementation gets under on these weights."""
    ids, mask, prompt_ids = batch
    prompt = net.model.embed_tokens.weight[prompt_ids].detach()
    linears = [m.weight for m in net.modules() if isinstance(m, torch.nn.Linear)]
    if net.lm_head is None:
        linears.append(net.model.embed_tokens.weight)
    x = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in linears}
    calls = {
        "prefill": lambda: causal_lm.start_decoding(net, ids, mask, prompt),
        "step": lambda: [torch.nn.functional.linear(x[w.shape[1]], w) for w in linears],
    }
    with torch.no_grad():
        seconds = take_turns(calls, rounds)
    return seconds["prefill"][1], seconds["step"][1]


def answers(ids, eos):
    """Each row as a list, cut after its first EOS (the two sides pad differently after it)."""
    rows = [row.tolist() for row in ids]
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


def mixed_eos(rows, limit):
    """An end-of-answer id that ends the most rows of these greedy answers, at the most
    different steps: (rows it ends, distinct lengths), then the smaller id."""

    def spread(token):
        ends = [row.index(token) + 1 for row in rows if token in row[: limit - 1]]
        return (len(ends), len(set(ends)), -token)

    return max({t for row in rows for t in row}, key=spread)


def race(models, batch, num_beams, eos, args):
    """(answer lengths, {side: (median wall, median CPU seconds) per call}); stops the run if
    the two sides' tokens differ."""
    ids, mask, prompt_ids = batch
    prompt = models["ours"].model.embed_tokens.weight[prompt_ids].detach()
    calls = {
        "ours": lambda: ours(models["ours"], ids, mask, prompt, num_beams, args.new, eos),
        "transformers": lambda: theirs(
            models["transformers"], ids, mask, prompt, num_beams, args.new, eos
        ),
    }
    got = {side: answers(call(), eos) for side, call in calls.items()}  # also the warm-up
    if got["ours"] != got["transformers"]:
        raise SystemExit(f"num_beams={num_beams}: the two sides' tokens differ:\n{got}")
    return got["ours"], take_turns(calls, args.iters)


def parse_args():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, value in SIZES.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--src", type=int, default=64, help="input length (odd rows: half of it)")
    ap.add_argument("--prompt", type=int, default=50, help="prompt length (App. C.6)")
    ap.add_argument("--new", type=int, default=32, help="max_new_tokens")
    ap.add_argument("--beams", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--iters", type=int, default=5, help="timed calls per side and search")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one timed call")
    ap.add_argument("--ckpt", default=None, help="checkpoint folder to make or reuse")
    args = ap.parse_args()
    if args.quick:
        vars(args).update(QUICK, batch=4, src=8, prompt=4, new=6, iters=1)
    return args


def main():
    args = parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(args.ckpt or tmp, {k: getattr(args, k) for k in SIZES})
        models = {side: load(side, ckpt).eval() for side in ("ours", "transformers")}
    print(machine())
    print(
        f"Llama: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
        f"{args.heads} heads / {args.kv_heads} kv heads, vocab {args.vocab}; batch {args.batch} "
        f"x ({args.prompt} prompt + {args.src}, odd rows left-padded to half), {args.new} new "
        f"tokens max; fp32; median of {args.iters} calls, taking turns",
        flush=True,
    )
    batch, summary, eos = left_padded_batch(args), [], {"to the limit": EOS}
    prefill, step = floor(models["ours"], batch, args.batch, max(args.iters, 3))
    print(
        f"  floor: prefill {prefill * 1e3:.0f} ms CPU, then per step the matrix products alone "
        f"{step * 1e3:.1f} ms CPU ({args.batch} rows): greedy to the limit >= "
        f"{(prefill + (args.new - 1) * step) * 1e3:.0f} ms CPU",
        flush=True,
    )
    for kind in ("to the limit", "mixed"):
        for num_beams in args.beams:
            got, seconds = race(models, batch, num_beams, eos[kind], args)
            if "mixed" not in eos:  # the first search's answers pick the mixed lengths' end
                eos["mixed"] = mixed_eos(got, args.new)
            name = ("greedy" if num_beams == 1 else f"beam {num_beams}") + f", {kind}"
            lengths = [len(a) for a in got]
            print(f"  {name} (end id {eos[kind]}): answer lengths {lengths}; same tokens: True")
            for side, (wall, cpu) in seconds.items():
                print(
                    f"    {side:12s} {wall * 1e3:7.0f} ms wall, {cpu * 1e3:7.0f} ms CPU per call"
                    f"  {sum(lengths) / wall:6.1f} tokens/s ({sum(lengths) / cpu:.1f} by CPU time)",
                    flush=True,
                )
            ratios = [seconds["transformers"][i] / seconds["ours"][i] for i in (0, 1)]
            summary.append(f"{name} {ratios[0]:.2f}x wall, {ratios[1]:.2f}x CPU")
    print(
        f"decoding speed ratios, transformers time / ours (load average "
        f"{os.getloadavg()[0]:.1f}): " + ", ".join(summary)
    )


if __name__ == "__main__":
    sys.exit(main())
