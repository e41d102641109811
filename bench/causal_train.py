"""Training-step speed of causal_lm.py with a soft prompt against transformers' LlamaForCausalLM.

    python bench/causal_train.py            # hidden 512, 8 layers, batch 8 x (50 prompt + 128)
    python bench/causal_train.py --quick    # tiny sizes, one timed step: the smoke test

Both sides load one random Llama checkpoint (grouped-query attention, SwiGLU, 32k vocabulary)
written by transformers, on one CPU thread, and take their steps interleaved (ours,
transformers', transformers', ours, ...) so that a busy machine slows both alike. Each step
reads [P; x] with a 50-token prompt (App. C.6's length) and scores the last --tgt tokens of x
with support/t5x_loss.cross_entropy on both sides, so the ratio measures the model and the
optimizer:
  stage 1  prompt tuning: the model frozen, the prompt trains (Adafactor lr 0.3 without
           parameter scaling, App. C.6's rate);
  stage 2  model tuning: the prompt frozen, every weight trains (Adafactor lr 1e-3 with
           parameter scaling: transformers' scale_parameter=True, relative_step=False,
           warmup_init=False).
Ours is `causal_lm` (`model(input_ids, attention_mask, prompt)`) and support/adafactor.Adafactor;
transformers' is its LlamaForCausalLM given inputs_embeds = [P; embed(x)] and its Adafactor.
By default (--logits promot) ours computes the logits only where the loss reads them, as
promot.forward does, and transformers' forward at every position, as its default does;
--logits all has both compute every position, --logits targets both only those (ours: `model.logits` of `model.run`'s hidden
states at the labelled positions; transformers: logits_to_keep), the same work on each side.
Before timing, both sides' losses on the same batch must agree to 1e-4.

Printed per stage: each side's median step time, wall and CPU (this process's CPU time, which
leaves out the time other jobs held the core: the steadier measure on a shared machine), its
tokens/s (prompt positions included), the ratio (transformers' time / ours: above 1 favours
ours), FLOPs per step (FlopCounterMode: the matrix products of forward and backward) and the
fraction of the GEMM peak measured in the same run (a 2048^3 matrix product, its best CPU time
before and after each stage) that they reach in the median CPU time, and each
side's peak memory: the resident set of a child process that loads the checkpoint alone and
takes two steps (VmHWM, reset before the steps), and how much of it the steps added. The last
line holds the ratios.
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shapes  # noqa: E402, F401  (puts the repository root on sys.path)
from train import flops_of  # noqa: E402

# A small Llama that fits a CPU: Llama 2's layout (SwiGLU at ~8/3 d, head_dim 64) with four
# query heads per key head, as in Llama 3 and Mistral.
SIZES = dict(hidden=512, intermediate=1408, layers=8, heads=8, kv_heads=2, vocab=32000)
QUICK = dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=512)
EOS, PAD = 2, 0

# stage -> (ours: support/adafactor.Adafactor kwargs, transformers' Adafactor kwargs)
OPTIMIZERS = {
    1: (
        dict(lr=0.3, multiply_by_parameter_scale=False),
        dict(lr=0.3, scale_parameter=False, relative_step=False, warmup_init=False),
    ),
    2: (
        dict(lr=1e-3, multiply_by_parameter_scale=True),
        dict(lr=1e-3, scale_parameter=True, relative_step=False, warmup_init=False),
    ),
}


def machine():
    """One line: CPU model, core count, torch and transformers versions, threads, load."""
    import transformers

    with open("/proc/cpuinfo", encoding="utf-8") as f:
        cpu = re.search(r"model name\s*:\s*(.*)", f.read())
    return (
        f"{cpu.group(1) if cpu else platform.processor()} ({os.cpu_count()} CPUs, "
        f"{platform.machine()}), torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {torch.get_num_threads()} thread(s), load average "
        f"{os.getloadavg()[0]:.1f}"
    )


def make_checkpoint(folder, sizes, seed=0):
    """A random Llama checkpoint written by transformers' save_pretrained (its own init), made
    once and reused after."""
    transformers = quiet_transformers()
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=sizes["vocab"],
        hidden_size=sizes["hidden"],
        intermediate_size=sizes["intermediate"],
        num_hidden_layers=sizes["layers"],
        num_attention_heads=sizes["heads"],
        num_key_value_heads=sizes["kv_heads"],
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=PAD,
        tie_word_embeddings=False,
    )
    net = transformers.LlamaForCausalLM(config)
    net.save_pretrained(folder)
    return folder


def quiet_transformers():
    """No progress bars or notices from transformers between the benchmark's lines."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load(side, ckpt):
    import causal_lm

    if side == "ours":
        return causal_lm.load_pretrained(ckpt)
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    return AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).train()


def inputs(args):
    """(input_ids, attention_mask, labels over [P; x], prompt): every token real; the labels
    are the last --tgt tokens of x at the positions that predict them, -100 elsewhere."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=g)
    labels = torch.full((args.batch, args.prompt + args.seq), -100)
    labels[:, -args.tgt - 1 : -1] = ids[:, -args.tgt :]  # logits[:, p + j] predict ids[:, j + 1]
    prompt = 0.02 * torch.randn(args.prompt, args.hidden, generator=g)  # the embeddings' scale
    return ids, torch.ones_like(ids), labels, prompt


def loss_fn(side, net, batch, prompt, logits="all"):
    """The step's forward and loss (mean over the target tokens) for one side. logits="all":
    each model's forward, logits at every position; "targets": only where the loss reads them
    (ours: the hidden states at the labelled positions; transformers: logits_to_keep, the last
    tgt + 1 positions, the last of which predicts nothing)."""
    from support import t5x_loss

    ids, mask, labels, _ = batch
    keep, targets = labels != -100, labels
    if side == "ours" and logits in ("targets", "promot"):
        targets = labels[keep]

        def forward():  # (targets, vocab): the head reads the labelled positions only
            return net(ids, mask, prompt, keep=keep)  # keep: over [P; x], as the labels

    elif side == "ours":
        forward = lambda: net(ids, mask, prompt)  # noqa: E731
    else:
        embed, B, last = net.get_input_embeddings(), len(ids), 0
        full_mask = torch.cat([mask.new_ones(B, prompt.shape[0]), mask], 1)
        if logits == "targets":
            last = int(keep[0].sum()) + 1
            targets = labels[:, -last:]

        def forward():
            embeds = torch.cat([prompt.unsqueeze(0).expand(B, -1, -1), embed(ids)], 1)
            return net(inputs_embeds=embeds, attention_mask=full_mask, logits_to_keep=last).logits

    def loss():
        total, count = t5x_loss.cross_entropy(forward(), targets)
        return total / count

    return loss


def train_step(side, net, stage, batch, logits="all"):
    """(a function taking one training step at `stage`, its loss function) for one side."""
    prompt = torch.nn.Parameter(batch[3].clone(), requires_grad=stage == 1)
    for p in net.parameters():
        p.requires_grad_(stage == 2)
    params = [prompt] if stage == 1 else list(net.parameters())
    if side == "ours":
        from support.adafactor import Adafactor

        opt = Adafactor(params, **OPTIMIZERS[stage][0])
    else:
        from transformers.optimization import Adafactor

        opt = Adafactor(params, **OPTIMIZERS[stage][1])
    loss = loss_fn(side, net, batch, prompt, logits)

    def step():
        loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, loss


def gemm_peak(n=2048, repeats=5):
    """FLOP/s of the best of `repeats` (n x n) @ (n x n) products in this process's CPU time,
    the yardstick the steps' CPU time is held against (bench/shapes.gemm_peak times the wall
    clock, which other jobs stretch)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        a @ b
        best = min(best, time.process_time() - start)
    return 2 * n**3 / best


def take_turns(calls, rounds):
    """{side: (median wall seconds, median CPU seconds)} of `rounds` calls each, the sides taking
    turns (the order flips every round). CPU time (this process's) leaves out the time other
    jobs held the core, so on a shared machine it is the steadier of the two."""
    times = {side: ([], []) for side in calls}
    for r in range(rounds):
        for side in list(calls) if r % 2 == 0 else list(calls)[::-1]:
            wall, cpu = time.perf_counter(), time.process_time()
            calls[side]()
            times[side][0].append(time.perf_counter() - wall)
            times[side][1].append(time.process_time() - cpu)
    return {side: tuple(map(statistics.median, t)) for side, t in times.items()}


def check_same_loss(models, batch, logits):
    """Both sides' loss on the same weights and batch, before any step changes them."""
    with torch.no_grad():
        losses = {
            side: float(loss_fn(side, net, batch, batch[3], logits)())
            for side, net in models.items()
        }
    if abs(losses["ours"] - losses["transformers"]) > 1e-4:
        raise SystemExit(f"the two sides' losses differ: {losses}")
    return losses


def memory(side, ckpt, args):
    """Run in a child process: peak resident memory (bytes) of two steps at each stage, and the
    resident memory before them (the checkpoint loaded, the imports done)."""

    def status(key):
        with open("/proc/self/status", encoding="utf-8") as f:
            return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) * 1024

    net, batch, out = load(side, ckpt), inputs(args), {}
    for stage in (1, 2):
        step, _ = train_step(side, net, stage, batch, args.logits)
        before = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
            f.write("5")
        step()
        step()
        out[stage] = (status("VmHWM"), before)
        del step
        for p in net.parameters():
            p.grad = None
    print(json.dumps(out))


def measure_memory(side, ckpt):
    """{stage: (peak, before)} of `side` from a child process alone (sharing one process, the
    two sides' allocations would mix)."""
    argv = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--ckpt", ckpt]
    done = subprocess.run(argv + ["--memory-of", side], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"memory child for {side} failed:\n{done.stderr[-3000:]}")
    return {int(k): v for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def bench_stage(models, stage, args, batch, peaks, mem):
    """Prints both sides' step at `stage`; returns the summary's words."""
    steps = {
        side: train_step(side, net, stage, batch, args.logits)[0] for side, net in models.items()
    }
    for step in steps.values():  # warm-up: creates the gradients and the optimizer state
        step()
    times = take_turns(steps, args.steps)
    peaks.append(gemm_peak())
    peak, tokens = max(peaks), args.batch * (args.prompt + args.seq)
    print(f"  GEMM peak (CPU time), the best so far: {peak / 1e9:,.1f} GFLOP/s", flush=True)
    for side, step in steps.items():
        (wall, cpu), flops, (top, before) = times[side], flops_of(step), mem[side][stage]
        print(
            f"  stage {stage} {side:12s} {wall * 1e3:7.0f} ms wall, {cpu * 1e3:7.0f} ms CPU  "
            f"{tokens / wall:6,.0f} tok/s ({tokens / cpu:,.0f} by CPU time)  "
            f"{flops / 1e9:6.1f} GFLOP/step = {flops / cpu / peak:4.0%} of GEMM peak  peak memory "
            f"{top / 2**20:6,.0f} MiB (steps add {(top - before) / 2**20:,.0f})",
            flush=True,
        )
    ratios = [times["transformers"][i] / times["ours"][i] for i in (0, 1)]
    print(
        f"  stage {stage} speed ratio (transformers time / ours): {ratios[0]:.2f}x wall, "
        f"{ratios[1]:.2f}x CPU",
        flush=True,
    )
    return f"stage {stage} {ratios[0]:.2f}x wall, {ratios[1]:.2f}x CPU"


def parse_args():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name, value in SIZES.items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128, help="tokens of x (the prompt adds --prompt)")
    ap.add_argument("--tgt", type=int, default=32, help="target tokens: the last of x")
    ap.add_argument("--prompt", type=int, default=50, help="prompt length (App. C.6)")
    ap.add_argument(
        "--logits",
        default="promot",
        choices=["promot", "all", "targets"],
        help="promot: ours only at the targets (promot.forward), transformers' default forward; "
        "all / targets: both at every position / only at the targets",
    )
    ap.add_argument("--steps", type=int, default=5, help="timed steps per side and stage")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one timed step")
    ap.add_argument("--ckpt", default=None, help="checkpoint folder to make or reuse")
    ap.add_argument("--memory-of", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        vars(args).update(QUICK, batch=2, seq=16, tgt=4, prompt=4, steps=1)
    return args


def main():
    args = parse_args()
    torch.set_num_threads(1)
    if args.memory_of:
        return memory(args.memory_of, args.ckpt, args)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(args.ckpt or tmp, {k: getattr(args, k) for k in SIZES})
        print(machine())
        print(
            f"Llama: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} "
            f"layers, {args.heads} heads / {args.kv_heads} kv heads, vocab {args.vocab}; batch "
            f"{args.batch} x ({args.prompt} prompt + {args.seq}), loss on the last {args.tgt}; "
            f"logits at {args.logits}; fp32; median of {args.steps} interleaved steps",
            flush=True,
        )
        mem = {side: measure_memory(side, ckpt) for side in ("ours", "transformers")}
        models, batch = {side: load(side, ckpt) for side in mem}, inputs(args)
        losses = check_same_loss(models, batch, args.logits)
        print(f"  same loss: ours {losses['ours']:.6f}, transformers {losses['transformers']:.6f}")
        peaks = [gemm_peak()]
        summary = [bench_stage(models, stage, args, batch, peaks, mem) for stage in (1, 2)]
    print(
        f"speed ratios, transformers time / ours (logits at {args.logits}, load average "
        f"{os.getloadavg()[0]:.1f}): " + "; ".join(summary)
    )


if __name__ == "__main__":
    sys.exit(main())
