"""Training-step speed and memory of promot against a plain transformers + transformers-Adafactor loop.

    python bench/train.py [--batch 8 --src 256 --tgt 32 --steps 5] [--device cuda]

Same config (a T5.1.1 of t5-small's shape by default, random weights), same
batch, same optimizer settings, each measured in a fresh subprocess so peak
memory is its own:
  stage 1  prompt tuning: frozen model, a 100-token prompt, Adafactor lr 0.2
           without parameter scaling. promot: model.T5(prompt=P); transformers:
           inputs_embeds = [P; embed(x)] with requires_grad off on the weights.
  stage 2  model tuning: all weights, Adafactor lr 1e-3 with parameter scaling,
           label smoothing 0.1 (the prompt frozen and prepended in both).
T5X's z-loss (promot's default) is off here, as transformers has none.
The promot side runs promot.train_step, the step promot.train runs (forward
with the prompt, model.cross_entropy normalised by the token count, backward,
promot.Adafactor.step); data loading is left out of both. Tokens/s counts input
(+ prompt) and target tokens. Peak memory: on CUDA the allocator's peak above
the memory held before the first step; on CPU the growth of the process's peak
RSS over its RSS before the first step (grads, optimizer state, activations).
The last line prints the ratios (promot / transformers; speed above 1 and
memory below 1 favour promot) and stage 1 / stage 2 memory.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

SHAPE = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=6, num_decoder_layers=6, num_heads=8,
             dropout_rate=0.1)


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args):
    import model
    import promot
    from helpers import load_oracle
    from support.adafactor import Adafactor as PromotAdafactor
    from support.fsdp import Dist
    torch.manual_seed(0)
    dev = torch.device(args.device)
    vocab = SHAPE["vocab_size"]
    ids = torch.randint(2, vocab, (args.batch, args.src), device=dev)
    mask = torch.ones_like(ids)
    labels = torch.randint(2, vocab, (args.batch, args.tgt), device=dev)
    prompt = torch.nn.Parameter((torch.rand(100, SHAPE["d_model"]) * 0.5).to(dev), requires_grad=args.stage == 1)
    if args.impl == "promot":
        net = model.load_pretrained(args.ckpt, device=dev)
        model.set_dropout(net, SHAPE["dropout_rate"])
        params = [prompt] if args.stage == 1 else list(net.parameters())
        for p in net.parameters():
            p.requires_grad_(args.stage == 2)
        opt = PromotAdafactor(params, lr=0.2 if args.stage == 1 else 1e-3,
                                 multiply_by_parameter_scale=args.stage == 2)
        # promot.train_step, as promot.train calls it (stage 1 has no label smoothing: T5X prompt tuning)
        cfg = SimpleNamespace(prompt_length=100, dtype="float32", label_smoothing=0.0 if args.stage == 1 else 0.1,
                              z_loss=0.0)  # transformers' loss has none
        batch = dict(input_ids=ids, attention_mask=mask, labels=labels, tasks=["bench"] * args.batch)
        prompts, ctx = {"bench": prompt}, Dist(device=dev)

        def step():
            promot.train_step(net, [batch], prompts, opt, cfg, ctx)

    else:
        from transformers.optimization import Adafactor
        net = load_oracle(args.ckpt).to(dev).train()
        params = [prompt] if args.stage == 1 else list(net.parameters())
        for p in net.parameters():
            p.requires_grad_(args.stage == 2)
        opt = Adafactor(params, lr=0.2 if args.stage == 1 else 1e-3, relative_step=False, warmup_init=False,
                        scale_parameter=args.stage == 2)
        full_mask = torch.cat([torch.ones(args.batch, 100, dtype=mask.dtype, device=dev), mask], 1)
        embed = net.get_input_embeddings()

        smoothing = 0.0 if args.stage == 1 else 0.1
        dec = net._shift_right(labels)

        def step():
            embeds = torch.cat([prompt.unsqueeze(0).expand(args.batch, -1, -1), embed(ids)], 1)
            logits = net(inputs_embeds=embeds, attention_mask=full_mask, decoder_input_ids=dec).logits
            # the same amount of work as promot's loss: mean token cross-entropy with smoothing
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), label_smoothing=smoothing)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    step()  # warm-up (creates the optimizer state and grads, counted in the peak)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    tokens = args.batch * (args.src + 100 + args.tgt)
    print(json.dumps({"tokens_per_s": tokens / seconds, "peak_bytes": peak, "step_s": seconds}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--src", type=int, default=256)
    ap.add_argument("--tgt", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", help=argparse.SUPPRESS)
    ap.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    from helpers import make_checkpoint
    results = {}
    with tempfile.TemporaryDirectory() as d:
        make_checkpoint(d, kind="t5v1_1", **SHAPE)
        print(f"device {args.device}, T5.1.1 d_model {SHAPE['d_model']} x {SHAPE['num_layers']}+"
              f"{SHAPE['num_decoder_layers']} layers, vocab {SHAPE['vocab_size']}, batch {args.batch}, "
              f"input {args.src} + prompt 100, target {args.tgt}, {args.steps} timed steps")
        for stage in (1, 2):
            for impl in ("promot", "transformers"):
                cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--stage", str(stage), "--ckpt", d,
                       "--batch", str(args.batch), "--src", str(args.src), "--tgt", str(args.tgt),
                       "--steps", str(args.steps), "--device", args.device]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                r = results[(impl, stage)] = json.loads(out)
                print(f"stage {stage} {impl:12s} {r['tokens_per_s']:10,.0f} tok/s  {r['step_s'] * 1000:8.1f} ms/step  "
                      f"peak +{r['peak_bytes'] / 2**20:8.1f} MiB", flush=True)
    ratio = {s: (results[("promot", s)]["tokens_per_s"] / results[("transformers", s)]["tokens_per_s"],
                 results[("promot", s)]["peak_bytes"] / results[("transformers", s)]["peak_bytes"]) for s in (1, 2)}
    print(f"ratios promot/transformers: stage 1 speed x{ratio[1][0]:.2f} memory x{ratio[1][1]:.2f}; "
          f"stage 2 speed x{ratio[2][0]:.2f} memory x{ratio[2][1]:.2f}; promot stage1/stage2 memory "
          f"x{results[('promot', 1)]['peak_bytes'] / results[('promot', 2)]['peak_bytes']:.2f}")


if __name__ == "__main__":
    main()
