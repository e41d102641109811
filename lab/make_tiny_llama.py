"""lab/make_tiny_llama.py: make the lab's decoder-only checkpoint, lab/tiny-llama/, from nothing.

    nice -n 5 python lab/make_tiny_llama.py --threads 1   # writes lab/tiny-llama/ (23 min)
    python lab/make_tiny_llama.py --steps 50 --out /tmp/t  # a smoke run

The paper repeats ProMoT on a decoder-only model, PaLM 8B (App. C.6). This script makes the
lab's stand-in for it, the decoder-only twin of lab/make_tiny_t5.py: a model that continues a
few-shot prompt of the synthetic suite (lab/tasks.py) in the format its demonstrations show,
small enough to commit and to fine-tune on a CPU. It
  1. trains a SentencePiece BPE model on the suite's text the way Llama 2's tokenizer.model was
     made (unk 0, BOS 1, EOS 2, no pad, byte fallback, no normalization, so the blank line
     between demonstrations is two <0x0A> pieces), and writes Llama 2's tokenizer_config.json
     (LlamaTokenizer, BOS added, EOS not), which support/causal_tokenizer.py and transformers'
     AutoTokenizer both read;
  2. builds a Llama (causal_lm.py: grouped-query attention, SwiGLU, rotary positions, tied
     embeddings), initialised as transformers' LlamaPreTrainedModel does, normal with std
     hidden^-1/2 (Llama's 0.02 is that rule at hidden 4096; see init_llama_);
  3. pretrains it multi-task on all nine tasks through data.py's own decoder-only encoding
     (training_pairs, encode_batch: demonstrations and query joined by blank lines, the answer
     and EOS learned), with support/adafactor.py's Adafactor in a plain loop and
     lab/make_tiny_t5.py's schedule: no demonstrations for the first --zero-shot-steps, then
     0-2; the fine-tuning task, lab_owns, only behind 1-2 (never 0-shot, as mT5 and PaLM never
     saw RTE). Two departures from make_tiny_t5.py, each measured: the lookups, which a decoder
     learns first, at rate 0.5 and the sequence tasks at 1 (the word reversal is the slowest);
     and Adafactor with momentum (beta1 0.9) from a hidden^-1/2 init. Without momentum and
     from std 0.02, a first run of these 5,500 steps (35 min) learned seven tasks but left the
     three True/False ones at chance on True against False (lab_lives scored only its
     "Neither"); trained alone, lab_both reached 100% in 800 steps with both changes, 63% with
     momentum alone and 71% in 1,200 steps with the init alone;
  4. saves config.json + model.safetensors (causal_lm.save_pretrained), the tokenizer files and
     pretraining.json (settings, time taken, per-task greedy scores through causal_lm's
     start_decoding and decode.py, as evaluate.py decodes).

The bundled checkpoint is this command's output: 0.82M parameters, 3.3 MB in all, 23 min of
pretraining on one thread of a shared 2-core machine; every task 85-100 on validation, 0-shot
and 1-shot (pretraining.json), lab_owns 87.5 0-shot. Everything is seeded: the same command on
the same torch build gives the same files.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import sentencepiece  # noqa: E402
import torch  # noqa: E402

import causal_lm  # noqa: E402
import data  # noqa: E402
import decode  # noqa: E402
import evaluate  # noqa: E402
from lab import tasks as lab_tasks  # noqa: E402
from lab.make_tiny_t5 import (  # noqa: E402
    FEW_SHOT_ONLY,
    LOOKUP_TASKS,
    SEQUENCE_TASKS,
    learning_rate,
    suite_text,
    write_record,
)
from support import t5x_loss  # noqa: E402
from support.adafactor import Adafactor  # noqa: E402

HERE = Path(__file__).resolve().parent
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json")


# --------------------------------------------------------------------------
# 1. Tokenizer
# --------------------------------------------------------------------------


def special_token(content: str) -> dict:
    """A special token as Llama 2's tokenizer_config.json writes it (a serialized AddedToken)."""
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def llama_tokenizer_config() -> dict:
    """Llama 2's tokenizer_config.json: BOS added, EOS not, no pad, legacy false."""
    named = ("<unk>", "<s>", "</s>")
    return {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "bos_token": {"__type": "AddedToken", **special_token("<s>")},
        "eos_token": {"__type": "AddedToken", **special_token("</s>")},
        "unk_token": {"__type": "AddedToken", **special_token("<unk>")},
        "pad_token": None,
        "added_tokens_decoder": {str(i): special_token(t) for i, t in enumerate(named)},
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
        "model_max_length": 1024,
    }


def train_tokenizer(lines, folder: Path, vocab_size: int, seed: int) -> None:
    """tokenizer.model (BPE as Llama 2's: unk 0, BOS 1, EOS 2, no pad, byte fallback, identity
    normalization, whitespace kept) and tokenizer_config.json, in `folder`."""
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        lines = list(lines)
        random.Random(seed).shuffle(lines)
        corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
        sentencepiece.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(Path(tmp) / "tokenizer"),
            model_type="bpe",
            vocab_size=vocab_size,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            byte_fallback=True,  # "\n" (between demonstrations) is <0x0A>, as in Llama 2
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            character_coverage=1.0,
            input_sentence_size=len(lines),
            shuffle_input_sentence=False,
            num_threads=1,
            minloglevel=2,
        )
        (folder / "tokenizer.model").write_bytes((Path(tmp) / "tokenizer.model").read_bytes())
    text = json.dumps(llama_tokenizer_config(), indent=2) + "\n"
    (folder / "tokenizer_config.json").write_text(text, encoding="utf-8")


def load_tokenizer(folder):
    """The checkpoint's tokenizer as promot.py and evaluate.py load it (data.load_tokenizer),
    with data.py's decoder-only conventions."""
    tokenizer = data.load_tokenizer(folder)
    tokenizer.causal = True  # already so where support/causal_tokenizer.py says it
    return tokenizer


# --------------------------------------------------------------------------
# 2. Model
# --------------------------------------------------------------------------


def tiny_config(tokenizer, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int):
    """A Llama 2-shaped config: SwiGLU, grouped-query attention, rotary positions, and tied
    embeddings (as the small Llamas, e.g. Llama 3.2 1B), no pad token (Llama 2 has none)."""
    return causal_lm.CausalLMConfig.from_dict(
        {
            "model_type": "llama",
            "vocab_size": tokenizer.vocab_size,
            "hidden_size": hidden,
            "intermediate_size": ffn,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 1024,
            "rope_theta": 10000.0,
            "tie_word_embeddings": True,
            "bos_token_id": tokenizer.bos_id,
            "eos_token_id": tokenizer.eos_id,
        }
    )


@torch.no_grad()
def init_llama_(model, seed: int, std: float) -> None:
    """transformers' LlamaPreTrainedModel._init_weights: every linear and embedding weight
    normal(0, std), norms 1. Llama's std, initializer_range 0.02, is about hidden^-1/2 at its
    width (4096^-1/2 = 0.016); main() keeps that rule, not the number (128^-1/2 = 0.088)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * std)


# --------------------------------------------------------------------------
# 3. Pretraining
# --------------------------------------------------------------------------


def mixing_rates(args) -> dict[str, float]:
    """lab/make_tiny_t5.py's mix: lookups and sequence tasks at their own rates, the rest at 1."""
    rates = {}
    for name in lab_tasks.TASK_NAMES:
        rates[name] = (
            args.sequence_task_rate
            if name in SEQUENCE_TASKS
            else args.lookup_task_rate
            if name in LOOKUP_TASKS
            else args.fine_tuning_task_rate
            if name == lab_tasks.FINE_TUNING_TASK
            else 1.0
        )
    return rates


def batch_groups(mixture, pools, rng, tokenizer, batch_size: int, max_shots: int):
    """One step's (input, target) pairs, grouped by task, from data.training_pairs (what
    promot.py trains on): each row gets 0..max_shots demonstrations (1..max_shots for
    FEW_SHOT_ONLY tasks). As in make_tiny_t5.batch_groups, the step mixes tasks (Adafactor, with
    no momentum, would chase one task's answer prior) and each task's rows run together (the
    step time follows the padded length)."""
    groups = {}
    for name, example in mixture.take(batch_size):
        low = 1 if name in FEW_SHOT_ONLY else 0
        shots = rng.randint(low, max(low, max_shots))
        pair = data.training_pairs(
            name, [example], shots, pools[name], seed=rng.random(), tokenizer=tokenizer
        )
        groups.setdefault(name, []).extend(pair)
    return groups


def train_step(model, optimizer, groups, tokenizer) -> float:
    """One Adafactor step over the mixed batch (gradient accumulation over its task groups);
    the mean loss per target token. The logits after token j are scored against token j + 1."""
    batches = [data.encode_batch(tokenizer, pairs) for pairs in groups.values()]
    total_tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for batch in batches:
        logits = model(batch["input_ids"], batch["attention_mask"])
        part, _ = t5x_loss.cross_entropy(logits[:, :-1], batch["labels"][:, 1:])
        (part / total_tokens).backward()
        loss_sum += part.item()
    optimizer.step()
    return loss_sum / total_tokens


@torch.no_grad()
def score(model, tokenizer, names, shots: int, n: int, split="validation", batch_size=32):
    """{task: metric} on the first n examples of `split`: data.py's decoder-only inputs,
    left-padded, greedy decoding (causal_lm.start_decoding + decode.generate), App. B.2's
    post-processing, evaluate.py's metrics."""
    was_training = model.training
    model.eval()
    scores = {}
    for name in names:
        task = data.get_task(name)
        queries = lab_tasks.generate(name, split, n)
        pool = lab_tasks.generate(name, "train")
        inputs = data.kshot_inputs(task, queries, pool, shots, seed=0, tokenizer=tokenizer)
        preds = []
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start : start + batch_size]
            encoded = [data.encode_cut(tokenizer, x, None) for x, _ in chunk]
            ids, mask = data.pad_batch(encoded, left=True)
            step, reorder, state, first = causal_lm.start_decoding(model, ids, mask)
            eos = tokenizer.eos_id
            out = decode.generate(step, reorder, state, first, 32, eos, eos, num_beams=1)
            preds += [
                evaluate.postprocess(tokenizer.decode(row), task.label_words)
                for row in out.tolist()
            ]
        scores[name] = evaluate.compute_metric(task.metric, preds, [refs for _, refs in inputs])
    model.train(was_training)
    return scores


def short(scores: dict) -> str:
    return "  ".join(f"{k[4:]} {v:.1f}" for k, v in scores.items())


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", default=str(HERE / "tiny-llama"), help="checkpoint folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--vocab-size",
        type=int,
        default=640,
        help="SentencePiece pieces: 3 specials, 256 bytes, the rest merges (enough for every "
        "word of the suite but the made-up ones to be one piece)",
    )
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2, help="grouped-query attention")
    p.add_argument("--ffn", type=int, default=352, help="SwiGLU width (Llama: ~8/3 hidden)")
    p.add_argument("--steps", type=int, default=5500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.02, help="peak Adafactor lr (x parameter RMS)")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument(
        "--beta1",
        type=float,
        default=0.9,
        help="Adafactor momentum (T5X's default and make_tiny_t5.py: none, which left the "
        "True/False tasks at chance here)",
    )
    p.add_argument(
        "--init-std",
        type=float,
        default=None,
        help="std of the initial weights (default hidden^-1/2; Llama's 0.02 is that at 4096)",
    )
    p.add_argument("--max-shots", type=int, default=2)
    p.add_argument(
        "--zero-shot-steps",
        type=float,
        default=0.3,
        help="fraction of the steps, at the start, without demonstrations (one for the "
        "fine-tuning task): short inputs, cheap steps; then 0..max-shots",
    )
    p.add_argument(
        "--sequence-task-rate",
        type=float,
        default=1.0,
        help="mixing rate of zorbish, backwards and news relative to 1 for the True/False "
        "tasks (make_tiny_t5.py's 0.5 left backwards, the reversal, unlearned here)",
    )
    p.add_argument(
        "--lookup-task-rate",
        type=float,
        default=0.5,
        help="mixing rate of kind, who and where: a decoder learns them first (T5: last, 2)",
    )
    p.add_argument("--fine-tuning-task-rate", type=float, default=1.0)
    p.add_argument(
        "--init-from",
        default=None,
        help="continue from this checkpoint folder (weights and tokenizer); the optimizer "
        "starts afresh",
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=1000, help="quick 1-shot scores (0: none)")
    p.add_argument("--eval-examples", type=int, default=48)
    return p.parse_args(argv)


def build_model(args, out: Path):
    """(model, tokenizer): fresh ones, or those of --init-from (tokenizer files copied)."""
    if args.init_from:
        print(f"[1/3] tokenizer and weights from {args.init_from}", flush=True)
        for name in TOKENIZER_FILES:
            (out / name).write_bytes((Path(args.init_from) / name).read_bytes())
        return causal_lm.load_pretrained(args.init_from), load_tokenizer(out)
    print(f"[1/3] SentencePiece BPE, {args.vocab_size} pieces", flush=True)
    train_tokenizer(suite_text(args.seed), out, args.vocab_size, args.seed)
    tokenizer = load_tokenizer(out)
    cfg = tiny_config(tokenizer, args.hidden, args.layers, args.heads, args.kv_heads, args.ffn)
    model = causal_lm.build(cfg, device="cpu")
    init_llama_(model, args.seed, args.init_std or args.hidden**-0.5)
    return model, tokenizer


def pretrain(args, model, tokenizer) -> tuple[list[dict], float]:
    """The loop: the schedule of lab/make_tiny_t5.py, progress lines, quick 1-shot scores.
    Returns the loss history and the seconds it took."""
    pools = {n: lab_tasks.generate(n, "train", seed=args.seed) for n in lab_tasks.TASK_NAMES}
    mixture = data.Mixture(pools, rates=mixing_rates(args), seed=args.seed)
    zero_shot_steps = int(args.zero_shot_steps * args.steps)
    rng = random.Random(args.seed)
    optimizer = Adafactor(model.parameters(), lr=args.lr, beta1=args.beta1)
    print(
        f"[3/3] pretraining {args.steps} steps x {args.batch_size} examples, {len(pools)} tasks: "
        f"0 shots for {zero_shot_steps} steps, then 0-{args.max_shots}",
        flush=True,
    )
    model.train()
    history, window, started = [], [], time.time()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        shots = 0 if step < zero_shot_steps else args.max_shots
        groups = batch_groups(mixture, pools, rng, tokenizer, args.batch_size, shots)
        window.append(train_step(model, optimizer, groups, tokenizer))
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            elapsed = time.time() - started
            loss = sum(window) / len(window)
            eta = (args.steps - done) * elapsed / done / 60
            print(
                f"step {done:5d}  loss {loss:.4f}  {elapsed / done:.2f}s/step  eta {eta:.1f} min",
                flush=True,
            )
            history.append({"step": done, "loss": loss, "elapsed_s": round(elapsed, 1)})
            window = []
        if args.eval_every and done % args.eval_every == 0 and done != args.steps:
            quick = score(model, tokenizer, lab_tasks.TASK_NAMES, 1, args.eval_examples // 2)
            print("      1-shot: " + short(quick), flush=True)
    return history, time.time() - started


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    model, tokenizer = build_model(args, out)
    cfg, n_params = model.config, sum(p.numel() for p in model.parameters())
    print(
        f"[2/3] Llama: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
        f"{cfg.num_attention_heads} heads ({cfg.num_key_value_heads} kv), vocab "
        f"{cfg.vocab_size}, {n_params / 1e6:.2f}M parameters",
        flush=True,
    )
    history, train_seconds = pretrain(args, model, tokenizer)
    final = {}
    for shots in (0, 1):
        final[f"{shots}-shot"] = score(
            model, tokenizer, lab_tasks.TASK_NAMES, shots, args.eval_examples
        )
        print(f"final {shots}-shot (greedy, validation): " + short(final[f"{shots}-shot"]))
    causal_lm.save_pretrained(model, str(out))
    timing = dict(started=started, train_seconds=train_seconds)
    write_record(
        "lab/make_tiny_llama.py",
        args,
        argv,
        out,
        n_params,
        cfg.vocab_size,
        final,
        history,
        **timing,
    )


if __name__ == "__main__":
    main()
