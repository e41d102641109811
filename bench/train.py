"""Training-step speed of promot against a plain transformers + transformers-Adafactor loop, side by side.

    python bench/train.py                                   # t5-small shape, fp32, CPU, 1 and 2 threads
    python bench/train.py --device cuda --dtype bfloat16 --shape t5-base [--memory]   # what bench/gpu.sh runs

Both sides load the same random checkpoint (bench/shapes.py) into one process and
take their steps interleaved (promot, transformers, transformers, promot, ...),
so a busy machine slows both alike; each side's best step is compared.
  stage 1  prompt tuning: frozen model, a 100-token prompt, Adafactor lr 0.2
           without parameter scaling. promot: model.T5(prompt=P); transformers:
           inputs_embeds = [P; embed(x)] with requires_grad off on the weights.
  stage 2  model tuning: all weights, Adafactor lr 1e-3 with parameter scaling,
           label smoothing 0.1 (the prompt frozen and prepended in both).
The promot side is promot.train_step, the step promot.train runs (forward with
the prompt, t5x_loss.cross_entropy over the token count, backward, Adafactor.step);
T5X's z-loss is off, as transformers has none. The transformers side is its T5
with torch's cross_entropy (label smoothing) and transformers' Adafactor.
bfloat16 runs both under autocast with fp32 weights (promot's one-process rule).

Printed per thread count (CPU) and stage: each side's step time, the speed ratio
(transformers time / promot time, above 1 favours promot), FLOPs per step
(torch.utils.flop_counter.FlopCounterMode: the matrix products of forward and
backward), achieved FLOP/s, and its fraction of the GEMM peak measured in the
same run (a large matmul, timed before and after each stage; the best counts)
and on CUDA of the card's bf16 data-sheet peak (MFU). Then Adafactor.step()
alone on copies of the stage-2 parameters against transformers' Adafactor.
--memory (CUDA) adds promot's stage-2 peak memory with and without activation
checkpointing against bench/memory_plan.py's prediction. The last line holds
the ratios. (CPU peak memory is not measured: both sides share one process.)

Threads: on a CPU that other jobs share, OpenMP threads spin-wait for each other at
every parallel operation, so two threads on two cores with one core taken run both
sides about twice as slowly as one thread (measured: 4.3 s against 2.3 s a step);
OMP_WAIT_POLICY=PASSIVE brings that back to the one-thread time. The load average is
printed with each thread count so a reader can tell a busy run.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shapes import SHAPES, bf16_peak, gemm_peak, make_checkpoint, sync  # noqa: E402

PROMPT = 100
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def inputs(args, device):
    g = torch.Generator().manual_seed(0)
    vocab = SHAPES[args.shape][1]["vocab_size"]
    ids = torch.randint(2, vocab, (args.batch, args.src), generator=g).to(device)
    labels = torch.randint(2, vocab, (args.batch, args.tgt), generator=g).to(device)
    prompt = (torch.rand(PROMPT, SHAPES[args.shape][1]["d_model"], generator=g) * 0.5).to(device)
    return ids, torch.ones_like(ids), labels, prompt


def load_models(ckpt, device):
    """promot's and transformers' model of the checkpoint, dropout 0.1 in both (attention too)."""
    import model
    from helpers import load_oracle

    ours = model.load_pretrained(ckpt, device=device)
    model.set_dropout(ours, 0.1)
    return {"promot": ours, "transformers": load_oracle(ckpt).to(device).train()}


def promot_step(net, stage, args, batch):
    """(promot.train_step as promot.train calls it, the parameters it trains)."""
    import promot
    from support import fsdp
    from support.adafactor import Adafactor

    ids, mask, labels, prompt = batch
    prompt = torch.nn.Parameter(prompt.clone(), requires_grad=stage == 1)
    for p in net.parameters():
        p.requires_grad_(stage == 2)
    params = [prompt] if stage == 1 else list(net.parameters())
    opt = Adafactor(params, lr=0.2 if stage == 1 else 1e-3, multiply_by_parameter_scale=stage == 2)
    # stage 1 has no label smoothing (T5X prompt tuning); z-loss off: transformers' loss has none
    cfg = SimpleNamespace(
        prompt_length=PROMPT,
        dtype=args.dtype,
        label_smoothing=0.0 if stage == 1 else 0.1,
        z_loss=0.0,
    )
    rows = dict(input_ids=ids, attention_mask=mask, labels=labels, tasks=["bench"] * len(ids))
    ctx = fsdp.Dist(device=ids.device)
    return (lambda: promot.train_step(net, [rows], {"bench": prompt}, opt, cfg, ctx)), params


def transformers_step(net, stage, args, batch):
    """(the same step for transformers: its T5, torch's cross_entropy, its Adafactor; the parameters)."""
    from transformers.optimization import Adafactor

    ids, mask, labels, prompt = batch
    prompt = torch.nn.Parameter(prompt.clone(), requires_grad=stage == 1)
    for p in net.parameters():
        p.requires_grad_(stage == 2)
    params = [prompt] if stage == 1 else list(net.parameters())
    opt = Adafactor(
        params,
        lr=0.2 if stage == 1 else 1e-3,
        relative_step=False,
        warmup_init=False,
        scale_parameter=stage == 2,
    )
    full_mask = torch.cat(
        [torch.ones(len(ids), PROMPT, dtype=mask.dtype, device=ids.device), mask], 1
    )
    embed, dec, smoothing = (
        net.get_input_embeddings(),
        net._shift_right(labels),
        0.0 if stage == 1 else 0.1,
    )

    def step():
        with torch.autocast(
            ids.device.type, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"
        ):
            embeds = torch.cat([prompt.unsqueeze(0).expand(len(ids), -1, -1), embed(ids)], 1)
            logits = net(
                inputs_embeds=embeds, attention_mask=full_mask, decoder_input_ids=dec
            ).logits
        # the work of promot's loss: token-mean cross-entropy with label smoothing
        loss = torch.nn.functional.cross_entropy(
            logits.float().flatten(0, 1), labels.flatten(), label_smoothing=smoothing
        )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, params


def interleaved(steps, rounds, device):
    """Seconds of each step, the sides taking turns (the order flips every round)."""
    times = {name: [] for name in steps}
    for fn in steps.values():  # warm-up: creates grads and optimizer state
        fn()
    for r in range(rounds):
        for name in list(steps) if r % 2 == 0 else list(steps)[::-1]:
            sync(device)
            start = time.perf_counter()
            steps[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def flops_of(step):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def bench_stage(models, stage, args, batch, peaks, card_peak):
    """Prints both sides' step at `stage`; returns the summary's words. `peaks` collects this
    thread count's GEMM peak measurements, one more after the steps: the best of them counts."""
    steps = {
        "promot": promot_step(models["promot"], stage, args, batch)[0],
        "transformers": transformers_step(models["transformers"], stage, args, batch)[0],
    }
    times = interleaved(steps, args.steps, batch[0].device)
    peaks.append(gemm_peak(batch[0].device, DTYPES[args.dtype]))
    peak = max(peaks)
    print(f"  GEMM peak, the best measured so far: {peak / 1e9:,.1f} GFLOP/s", flush=True)
    tokens = args.batch * (args.src + PROMPT + args.tgt)
    best = {}
    for name, step in steps.items():
        best[name], flops = min(times[name]), flops_of(step)
        rate = flops / best[name]
        mfu = f", MFU {rate / card_peak:5.1%}" if card_peak else ""
        print(
            f"  stage {stage} {name:12s} best {best[name] * 1e3:8.1f} ms  median "
            f"{statistics.median(times[name]) * 1e3:8.1f} ms  {tokens / best[name]:9,.0f} tok/s  "
            f"{flops / 1e9:7.1f} GFLOP/step  {rate / 1e9:7.1f} GFLOP/s = {rate / peak:5.1%} of GEMM peak{mfu}",
            flush=True,
        )
        if name == "promot":
            mine = f"promot {tokens / best[name]:,.0f} tok/s, {rate / peak:.0%} of GEMM peak" + (
                f", MFU {rate / card_peak:.0%}" if card_peak else ""
            )
    ratio = best["transformers"] / best["promot"]
    print(
        f"  stage {stage} speed ratio (transformers / promot step time): {ratio:.2f}x", flush=True
    )
    return f"stage {stage} {ratio:.2f}x ({mine})"


def bench_adafactor(models, args):
    """Adafactor.step() alone on copies of the stage-2 parameters (random gradients), the two
    optimizers taking turns; returns each one's best time in seconds."""
    from transformers.optimization import Adafactor as TheirAdafactor

    from support.adafactor import Adafactor

    ours = [torch.nn.Parameter(p.detach().clone()) for p in models["promot"].parameters()]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    g = torch.Generator(device=ours[0].device).manual_seed(1)
    for a, b in zip(ours, theirs):
        a.grad = torch.randn(a.shape, generator=g, device=a.device)
        b.grad = a.grad.clone()
    opts = {
        "promot": Adafactor(ours, lr=1e-3),
        "transformers": TheirAdafactor(
            theirs, lr=1e-3, relative_step=False, warmup_init=False, scale_parameter=True
        ),
    }
    times = interleaved({name: opt.step for name, opt in opts.items()}, args.steps, ours[0].device)
    return min(times["promot"]), min(times["transformers"])


def bench_memory(models, args, batch):
    """promot's stage-2 peak memory on one GPU with and without activation checkpointing,
    against bench/memory_plan.py's prediction for the same shape and batch. Measured as the
    peak above what was allocated before the first step (both models' weights), plus
    promot's weights."""
    import memory_plan
    from support import fsdp

    kind, shape = SHAPES[args.shape]
    config = dict(
        shape,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        scale_decoder_outputs=False,
        model_type="mt5" if kind == "mt5" else "t5",
    )
    plan = memory_plan.single_device(config, args.batch, args.src, args.tgt, PROMPT)
    net = models["promot"]
    weights = sum(p.numel() * p.element_size() for p in net.parameters())
    for checkpointing in (False, True):
        if checkpointing:
            for block in list(net.encoder.blocks) + list(net.decoder.blocks):
                fsdp.checkpoint_block(block)
        step, _ = promot_step(net, 2, args, batch)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        step()
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated() - before + weights
        predicted = plan["total_ckpt" if checkpointing else "total"]
        print(
            f"  stage 2 peak memory, activation checkpointing {'on ' if checkpointing else 'off'}: "
            f"{measured / 1e9:6.2f} GB measured, {predicted / 1e9:6.2f} GB predicted by memory_plan "
            f"(measured/predicted x{measured / predicted:.2f})",
            flush=True,
        )
        del step
        for p in net.parameters():
            p.grad = None


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shape", default="t5-small", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--src", type=int, default=128, help="input tokens (the prompt adds 100)")
    ap.add_argument("--tgt", type=int, default=32, help="target tokens")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per side")
    ap.add_argument(
        "--threads", type=int, nargs="+", default=[1, 2], help="torch threads, each in turn (CPU)"
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument(
        "--ckpt", default=None, help="checkpoint folder to make or reuse [a temporary one]"
    )
    ap.add_argument(
        "--memory", action="store_true", help="stage-2 peak memory vs memory_plan (CUDA)"
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = make_checkpoint(args.shape, args.ckpt or tmp)
        card, card_peak = bf16_peak(device)
        card_peak = card_peak if args.dtype == "bfloat16" else None
        cfg = SHAPES[args.shape][1]
        print(
            f"{args.shape}: d_model {cfg['d_model']}, d_ff {cfg['d_ff']}, {cfg['num_layers']}+"
            f"{cfg['num_decoder_layers']} layers, vocab {cfg['vocab_size']}; batch {args.batch} x ({args.src} + "
            f"{PROMPT} prompt) -> {args.tgt}; {args.dtype} on {card}; best of {args.steps} interleaved steps"
        )
        models, batch = load_models(ckpt, device), inputs(args, device)
        summary = []
        for threads in args.threads if device.type == "cpu" else [torch.get_num_threads()]:
            torch.set_num_threads(threads)
            peaks = [gemm_peak(device, DTYPES[args.dtype])]
            print(
                f"{threads} thread(s): GEMM peak {peaks[0] / 1e9:,.1f} GFLOP/s; load average "
                f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
                flush=True,
            )
            stages = [bench_stage(models, stage, args, batch, peaks, card_peak) for stage in (1, 2)]
            ours, theirs = bench_adafactor(models, args)
            print(
                f"  Adafactor.step() on the stage-2 parameters: promot {ours * 1e3:.1f} ms, transformers "
                f"{theirs * 1e3:.1f} ms ({theirs / ours:.2f}x)",
                flush=True,
            )
            summary.append(
                f"{threads} thread(s) (load average {os.getloadavg()[0]:.1f}): {stages[0]}, {stages[1]}, "
                f"Adafactor.step() {theirs / ours:.2f}x"
            )
        if args.memory and device.type == "cuda":
            bench_memory(models, args, batch)
    print(
        f"speed ratios, transformers time / promot time ({args.shape}, {args.dtype}, {card}): "
        + "; ".join(summary)
    )


if __name__ == "__main__":
    sys.exit(main())
