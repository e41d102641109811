"""Evaluation for ProMoT: decoding a T5, the paper's post-processing, metrics, the results table.

This room holds everything between a trained model and the paper's Tables 3-5:

* decoding -- `generate` plugs `model.T5` and its KV cache into decode.py's greedy and beam
  search: by default the paper's (beam 4, T5X's length rule, alpha 0.6), or by name token for
  token `transformers`' `generate(..., early_stopping=False, do_sample=False)`;
* post-processing -- App. B.2 of the paper: keep the text between `<extra_id_0>` and
  `<extra_id_1>`, cut where the model starts writing a new example, read the first word
  for classification;
* metrics -- accuracy, TriviaQA exact match, BLEU and ROUGE-2 computed the way T5's own
  evaluation code (`t5/evaluation/metrics.py`) computes them, the paper's normalized
  average and the format-specialization ratio of its Fig. 2;
* the evaluation run -- `python evaluate.py --model DIR ...` prints the paper's table
  and writes every example's input, raw output, prediction and reference to JSON.

It leaves the model to `model.py`, the search itself to `decode.py`, task templates and data
files to `data.py`, the input checks to `checks.py`, and training (which calls `score_task` to
pick the best checkpoint) to `promot.py`. It reads top to bottom: decoding, post-processing,
metrics, scoring and prompt routing, results, and the command line last (its flags, `Settings`,
are in flags.py, without torch, so that --help answers at once).
"""

import dataclasses
import json
import os
import re
import string
import sys

import flags

if __name__ == "__main__":  # --help answers from flags.py, before torch loads (seconds)
    flags.answer_help(flags.evaluate_parser, sys.argv[1:])

import sacrebleu
import torch
from rouge_score import rouge_scorer

import causal_lm
import checks
import data
import decode
import model as model_lib
from support import cli, fsdp, lora, prompt_formats, run_checkpoints
from support.errors import BadInput, DamagedFile


# ---------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------


def model_family(path):
    """The module that holds a checkpoint's network: causal_lm.py for a decoder-only one (App.
    C.6; config.json's model_type llama, mistral, qwen2 or qwen3), else model.py (T5, mT5)."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            kind = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError, RecursionError):
        kind = None  # model.py's reader says what is wrong with the file
    if kind not in (None, "t5", "mt5", "umt5", *causal_lm.SUPPORTED):
        raise BadInput(
            f"{path}/config.json: model_type {kind!r} is not supported; promot reads t5, mt5 "
            f"and umt5 (model.py) and {', '.join(causal_lm.SUPPORTED)} (causal_lm.py) checkpoints"
        )
    return causal_lm if kind in causal_lm.SUPPORTED else model_lib


def special_ids(model):
    """(EOS, pad) ids decoding uses: the config's (a decoder's first EOS; its pad, else EOS)."""
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    pad = model.config.pad_token_id
    return eos, eos if pad is None else pad


@torch.inference_mode()
def generate(
    model,
    input_ids,
    attention_mask,
    prompt=None,
    num_beams=4,
    max_new_tokens=128,
    length_penalty=0.6,
    length_rule="t5x",
):
    """Greedy (num_beams=1) or beam search with `model` (a `model.T5`, or a
    `causal_lm.CausalLM` given left-padded rows); returns (batch, length) generated ids without
    the decoder start token (or the input). `prompt` (p or batch x p, x d_model) is prepended
    to the embedded input.

    The default is the paper's decoding (App. B.4: beam 4; T5X's length rule, alpha 0.6).
    With length_rule="transformers" it is token for token `transformers`' `generate(num_beams=...,
    length_penalty=..., early_stopping=False, do_sample=False, max_new_tokens=...)` on the same
    weights, with `prompt` in the place of `inputs_embeds=[P; embed(x)]` (decode.py: the rules).
    """
    was_training, (eos, pad), family = model.training, special_ids(model), model_lib
    if isinstance(model, causal_lm.CausalLM):
        family = causal_lm
    model.eval()  # dropout off: decoding is deterministic
    try:
        step, reorder, state, start = family.start_decoding(
            model, input_ids, attention_mask, prompt
        )
        # Rows padded after EOS as transformers pads them: greedy with pad, beam search with EOS
        # (its fill value is `pad_token_id or eos_token_id`, and T5's pad id 0 is falsy).
        pad = pad if num_beams == 1 else eos
        rule = dict(num_beams=num_beams, length_penalty=length_penalty, length_rule=length_rule)
        return decode.generate(step, reorder, state, start, max_new_tokens, eos, pad, **rule)
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------
# Post-processing (paper, App. B.2)
# ---------------------------------------------------------------------------------------

# Every k-shot prompt of the paper (Table 7) starts its examples with one of these; a model
# that keeps writing after its answer starts the next example with one of them (App. B.2).
CUT_PREFIXES = ("Q:", "Translate", "Article:")


def postprocess(text, label_words=None, cut_prefixes=CUT_PREFIXES):
    """Turn one raw decoded output into the prediction that is scored (paper, App. B.2).

    1. Keep the text after `<extra_id_0>` and before `<extra_id_1>`; without the
       sentinels the whole output is the answer.
    2. Cut at the next example: the text from the first task prefix (`Q:`, `Translate`,
       `Article:`) that is not at the very start and stands as a word of its own. B.2 says
       "the second prefix token": an output that begins by echoing a prefix keeps that
       first one, and "IQ:" or "Translated" inside an answer is no prefix. A decoder-only
       model, which runs on past its answer, starts its next example after a blank line
       (data.CAUSAL_JOIN): the text is cut there too (T5 never writes one).
    3. Classification (`label_words` given, e.g. True/False/Neither, or OpenbookQA's
       A/B/C/D): the first word, with punctuation around it removed ("True." -> "True",
       "B)" -> "B"). Case is kept: the references are the label words themselves.
    """
    if "<extra_id_0>" in text:
        text = text.split("<extra_id_0>", 1)[1]
    text = text.split("<extra_id_1>", 1)[0]
    text = text.strip().split(data.CAUSAL_JOIN, 1)[0]
    # A prefix is a whole word after whitespace (the start itself never cuts, it was stripped).
    cuts = [
        m.start()
        for p in cut_prefixes
        for m in [re.search(rf"(?<=\s){re.escape(p)}(?=\s|$)", text)]
        if m
    ]
    if cuts:
        text = text[: min(cuts)].strip()
    if label_words is not None:
        text = first_word(text)
    return text


def first_word(text):
    """The first whitespace-separated word of `text` without surrounding punctuation."""
    words = text.split()
    return words[0].strip(string.punctuation) if words else ""


def decode_with_sentinels(tokenizer, ids):
    """Decode generated ids, writing sentinels as `<extra_id_N>` so `postprocess` can see them.

    A tokenizer's plain `decode` drops sentinels (like transformers' skip_special_tokens),
    so the ids are split at each sentinel and the pieces between them decoded one by one;
    EOS and pad vanish with the rest. Works with any tokenizer that has `decode(ids)` and
    `sentinel_id(n)`.
    """
    sentinel_number = {tokenizer.sentinel_id(n): n for n in range(100)}
    pieces, current = [], []
    for token in ids:
        token = int(token)
        if token in sentinel_number:
            pieces.append(tokenizer.decode(current))
            pieces.append(f"<extra_id_{sentinel_number[token]}>")
            current = []
        else:
            current.append(token)
    pieces.append(tokenizer.decode(current))
    return " ".join(p for p in pieces if p)


# ---------------------------------------------------------------------------------------
# Metrics. Each takes predictions (list[str]) and references (list[list[str]]: every
# acceptable answer of each example) and returns a score on a 0-100 scale.
# ---------------------------------------------------------------------------------------


def accuracy(predictions, references):
    """Percent of predictions equal to one of their references (classification tasks)."""
    return 100.0 * _mean([p in refs for p, refs in zip(predictions, references)])


def normalize_answer(text):
    """The official TriviaQA answer normalization (as T5's `qa_utils.normalize_trivia_qa`):
    lowercase, punctuation (plus the quote marks and `_` that the TriviaQA script adds)
    replaced by spaces, articles a/an/the removed, whitespace collapsed."""
    punctuation = set(string.punctuation + "‘’´`_")
    text = "".join(" " if ch in punctuation else ch for ch in text.lower())
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(predictions, references):
    """Percent of predictions whose normalized text equals a normalized reference,
    i.e. the maximum over answer aliases (TriviaQA / web_questions)."""
    hits = [
        normalize_answer(p) in {normalize_answer(r) for r in refs}
        for p, refs in zip(predictions, references)
    ]
    return 100.0 * _mean(hits)


def bleu(predictions, references):
    """Corpus BLEU as T5 computes it for WMT (`t5/evaluation/metrics.py`, `bleu`):
    sacrebleu's `corpus_bleu` on detokenized text with the `intl` tokenizer, exponential
    smoothing, case-sensitive, no effective order. Examples with fewer references than
    others leave a gap (None) in the extra reference streams, which sacrebleu skips."""
    n_streams = max(len(refs) for refs in references)
    streams = [
        [refs[i] if i < len(refs) else None for refs in references] for i in range(n_streams)
    ]
    return sacrebleu.corpus_bleu(
        predictions,
        streams,
        smooth_method="exp",
        smooth_value=0.0,
        force=False,
        lowercase=False,
        tokenize="intl",
        use_effective_order=False,
    ).score


def rouge2(predictions, references):
    """Mean ROUGE-2 F-measure x 100, scored with `rouge-score` as T5 does
    (`t5/evaluation/metrics.py`, `rouge`): default tokenizer, no stemming, and " . "
    turned into " .\\n" in both texts first (T5 does that for rougeLsum; for ROUGE-2 a
    newline is whitespace like any other, so it changes nothing, but we keep the same
    input). With several references the best one counts (`score_multi`).

    T5 reports the median of a 1000-sample bootstrap of this mean (`BootstrapAggregator`,
    `.mid`), which differs from the mean only by resampling noise; we report the mean so
    that a rerun gives the same number."""
    scorer = rouge_scorer.RougeScorer(["rouge2"])

    def prepare(s):
        return s.replace(" . ", " .\n")

    scores = [
        scorer.score_multi([prepare(r) for r in refs], prepare(p))["rouge2"].fmeasure
        for p, refs in zip(predictions, references)
    ]
    return 100.0 * _mean(scores)


METRICS = {"accuracy": accuracy, "exact_match": exact_match, "bleu": bleu, "rouge2": rouge2}


def compute_metric(name, predictions, references):
    """Score `predictions` against `references` with the metric called `name` (0-100).

    `references` holds one list of acceptable answers per example; a plain string per
    example is accepted as a single reference."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; known metrics: {', '.join(METRICS)}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError(f"cannot compute {name} on zero examples")
    references = [[r] if isinstance(r, str) else list(r) for r in references]
    return METRICS[name](list(predictions), references)


def normalized_average(scores):
    """The paper's "Norm. Avg." (Sec. 5.1): the mean of the evaluation tasks' scores, each
    normalized to [0, 100] (BIG-bench's "normalized preferred metric").

    Every metric here already lives on 0-100 with 0 the worst and 100 the best, so the
    normalization is the identity and the average is a plain mean; this reproduces the
    paper's numbers from its per-task scores (Tables 3, 4, 5, 10, 11; see the tests).
    `scores` is a list of numbers or a dict task -> number."""
    values = list(scores.values()) if isinstance(scores, dict) else list(scores)
    if not values:
        raise ValueError("normalized average of zero tasks")
    for v in values:
        if not -1e-6 <= v <= 100.0 + 1e-6:  # sacrebleu can return 100.00000000000004
            raise ValueError(f"score {v} is outside [0, 100]; every metric here is on 0-100")
    return sum(values) / len(values)


def format_ratio(predictions, label_words):
    """Percent of predictions whose first word is one of `label_words`: how often a model
    answers in the fine-tuned task's format on another task (paper Fig. 2, the share of
    "True"/"False" answers on 1-shot TriviaQA while fine-tuning on RTE)."""
    if not predictions:
        raise ValueError("format ratio of zero predictions")
    labels = set(label_words)
    return 100.0 * _mean([first_word(p) in labels for p in predictions])


def _mean(values):
    values = list(values)
    return sum(values) / len(values) if values else 0.0


# ---------------------------------------------------------------------------------------
# Scoring a task, routing the prompt
# ---------------------------------------------------------------------------------------

# Longest answer generated, per metric, unless max_new_tokens is given. A classifier answers
# "<extra_id_0> True <extra_id_1>" (a few tokens); translations and summaries need room.
MAX_NEW_TOKENS = {"accuracy": 16, "exact_match": 32, "bleu": 256, "rouge2": 128}


@torch.no_grad()
def score_task(
    model,
    tokenizer,
    task,
    examples,
    pool=None,
    shots=0,
    prompt=None,
    batch_size=16,
    seed=0,
    max_input_tokens=None,
    truncation="end",
    format_label_words=None,
    distributed=False,
    progress=None,
    max_new_tokens=None,
    **decoding,
):
    """Decode `examples` of `task` with `shots` demonstrations and score them.

    Returns a dict: task, shots, metric, score (0-100), num_examples, prompt (whether one
    was prepended), truncation (the cut and what it removed: `data.TruncationStats`),
    format_ratio (percent of predictions whose first word is in `format_label_words`, when
    given), and examples: each one's input, raw output, prediction and references, in the
    order of `examples`.

    Demonstrations come from `pool` (default: `examples`; never the query itself). Inputs
    longer than `data.input_budget` are fitted by `data.fit_input` under `truncation` (T5X's
    "end" cut, the paper's, or our "fair" one). `decoding` (num_beams, length_penalty,
    length_rule) goes to `generate`: the paper's decoding unless given, as on evaluate.py's
    command line; `max_new_tokens` defaults to the metric's. `distributed` and `progress`:
    see `decode_inputs`.
    """
    task = data.get_task(task)
    if not examples:
        raise BadInput(f"task {task.name}: no examples to score")
    rank = torch.distributed.get_rank() if distributed else 0
    quiet = (lambda message: None) if rank else None  # truncation warnings once, from rank 0
    budget = data.input_budget(task, max_input_tokens)
    stats = data.TruncationStats()
    fit = dict(tokenizer=tokenizer, max_input_tokens=budget, warn=quiet, truncation=truncation)
    fit["stats"] = stats
    pool = examples if pool is None else pool  # never the query itself (data.kshot_inputs)
    pairs = data.kshot_inputs(task, examples, pool, shots, seed, **fit)
    texts = [text for text, _ in pairs]
    decoding["max_new_tokens"] = max_new_tokens or MAX_NEW_TOKENS[task.metric]
    outputs = decode_inputs(
        model, tokenizer, texts, budget, batch_size, prompt, distributed, progress, **decoding
    )
    records = [
        {
            "input": text,
            "raw_output": raw,
            "prediction": postprocess(raw, task.label_words),
            "references": references,
        }
        for (text, references), raw in zip(pairs, outputs)
    ]
    predictions = [r["prediction"] for r in records]
    result = {
        "task": task.name,
        "shots": shots,
        "metric": task.metric,
        "score": compute_metric(task.metric, predictions, [r["references"] for r in records]),
        "num_examples": len(records),
        "prompt": prompt is not None,
        "truncation": {"rule": truncation, "max_input_tokens": budget, **vars(stats)},
    }
    if format_label_words:
        result["format_ratio"] = format_ratio(predictions, format_label_words)
    result["examples"] = records
    return result


def decode_inputs(
    model,
    tokenizer,
    texts,
    budget,
    batch_size,
    prompt=None,
    distributed=False,
    progress=None,
    **generating,
):
    """Each text's raw output (`generate`, sentinels written out), its input cut to `budget`
    tokens; batched by length, longest first. With `distributed=True` (under torchrun) each rank
    decodes every world-th batch and the outputs are gathered; every rank must hold the whole
    model. `progress(done, total)` is called after each batch (counts of this rank's share)."""
    rank, world = (
        (torch.distributed.get_rank(), torch.distributed.get_world_size())
        if distributed
        else (0, 1)
    )
    encoded = [data.encode_cut(tokenizer, text, budget) for text in texts]
    mine = data.eval_batches([len(ids) for ids in encoded], batch_size)[rank::world]
    device = next(model.parameters()).device
    prompt = prompt.to(device) if prompt is not None else None
    outputs, done, total = {}, 0, sum(len(b) for b in mine)
    for batch in mine:
        ids, mask = data.pad_batch(
            [encoded[i] for i in batch], left=getattr(tokenizer, "causal", False)
        )
        out = generate(model, ids.to(device), mask.to(device), prompt=prompt, **generating)
        for i, row in zip(batch, out.tolist()):
            outputs[i] = (
                tokenizer.decode(row)
                if getattr(tokenizer, "causal", False)
                else decode_with_sentinels(tokenizer, row)
            )
        done += len(batch)
        if progress is not None:
            progress(done, total)
    if distributed:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, outputs)
        outputs = {i: r for part in parts for i, r in part.items()}
    return [outputs[i] for i in range(len(texts))]


ROUTES = ("same_format", "same_answers", "fine_tuned_only", "always", "never")


def same_format(task, fine_tuned_task, route="same_format"):
    """Whether the stage-1 module of `fine_tuned_task` goes to `task` under the reading `route`
    of the rule (`route_prompt`): the task itself always; then the same `data.Task.format_group`
    (same_format: RTE, CB, WiC and SNLI share one), the same answer format `data.Task.format`
    (same_answers: RTE and WiC, not CB), or no other task (fine_tuned_only)."""
    task, tuned = data.get_task(task), data.get_task(fine_tuned_task)
    if route == "fine_tuned_only" or task.name == tuned.name:
        return task.name == tuned.name
    if route == "same_answers":
        return task.format == tuned.format
    return task.format_group == tuned.format_group


def route_prompt(task, prompts, route="same_format"):
    """The soft prompt ({fine-tuned task: prompt}) for `task`, or None: the one routing rule, also
    for LoRA adapters (`prompts` = {fine-tuned task: True}) and the probes.

    Paper §4: "we only use this prompt during inference when the inference task has the same
    format as the fine-tuned target task. Otherwise, we remove the learned prompt", and §5.3:
    CB and WiC "share the same format as the RTE fine-tuning task". So by default the prompt goes
    to the tasks of the fine-tuned task's format group (`data.FORMAT_GROUPS`): RTE's to RTE, CB
    and WiC. Other readings, by name: "same_answers" (the same answer set: RTE -> WiC) and
    "fine_tuned_only" (the task alone, as the prompt-tuning columns of Tables 10 and 12-14 are
    reported; evaluate.py's reading for a stage-1 prompt, `route_by_stage`); "always" or "never"
    force it (ablations; "always" prefers a prompt of the same format).
    """
    if route not in ROUTES:
        raise BadInput(f"route must be one of {', '.join(ROUTES)}, not {route!r}")
    if route == "never" or not prompts:
        return None
    for name, prompt in prompts.items():
        if same_format(task, name, "same_format" if route == "always" else route):
            return prompt
    return next(iter(prompts.values())) if route == "always" else None


def route_by_stage(stage):
    """The reading of `route_prompt` that scores a prompt trained by promot.py's `stage`
    (training.json's "stage"): evaluate.py's default, --route by_stage.

    A stage-1 prompt (the prompt-tuning baseline, on the pretrained model it left unchanged) is
    removed on every task but its own: §5.1 compares prompt tuning with the pretrained model
    "when the prompt is removed", and Tables 10 and 12-14 report its columns equal to the
    pretrained ones on every unseen task, CB and WiC included. A prompt tuned with its model
    (ProMoT's stage 2, the joint and random-prompt ablations) keeps §4's same-format rule.
    """
    return "fine_tuned_only" if str(stage) == "1" else "same_format"


# ---------------------------------------------------------------------------------------
# Results: JSON and the paper's table
# ---------------------------------------------------------------------------------------

RESULTS_FORMAT = "promot-evaluate-results/1"


def norm_avg_by_shots(runs):
    """{shots: normalized average over the evaluation runs with that many shots}."""
    by_shots = {}
    for run in runs:
        if run["role"] == "evaluation":
            by_shots.setdefault(str(run["shots"]), []).append(run["score"])
    return {shots: normalized_average(scores) for shots, scores in by_shots.items()}


def results_table(results, baseline=None):
    """Markdown in the paper's layout (Tables 3-5): the fine-tuned task(s) scored 0-shot (and
    k-shot for a "+1-shot" run, marked where its score chose the checkpoint), then Norm. Avg.
    (with its difference from `baseline`'s, as the paper's parentheses), then one row per
    evaluation task; one column per number of shots, and the split each row scored. A row
    scored with the prompt (or LoRA) says so, and a note names the rule that routed it."""
    runs = results["runs"]
    shots = sorted({r["shots"] for r in runs if r["role"] == "evaluation"})
    head = "| | " + " | ".join(f"{k}-shot" for k in shots) + " | split |"
    lines = [head, "|---" * (len(shots) + 2) + "|"]
    blank = [""] * max(len(shots) - 1, 0)
    for run in runs:  # "chose the checkpoint": its validation score picked best/ (training.json)
        if run["role"] == "fine-tuned":
            chose = "; chose the checkpoint" if run.get("chose_checkpoint") else ""
            chose = routed(run) + chose
            lines.append(
                f"| Fine-tuning {run['task']} ({run['shots']}-shot, {run['metric']}{chose}) | "
                + " | ".join([f"{run['score']:.2f}"] + blank + [run.get("split", "")])
                + " |"
            )
    cells = []
    for k in shots:
        avg = results["norm_avg"].get(str(k))
        cell = "" if avg is None else f"{avg:.2f}"
        base = (baseline or {}).get("norm_avg", {}).get(str(k))
        if avg is not None and base is not None:
            cell += f" ({avg - base:+.2f})"
        cells.append(cell)
    lines.append("| Norm. Avg. | " + " | ".join(cells) + " | |")
    scores = {(r["task"], r["shots"]): r for r in runs if r["role"] == "evaluation"}
    for task in dict.fromkeys(r["task"] for r in runs if r["role"] == "evaluation"):
        row = [f"{scores[task, k]['score']:.2f}" if (task, k) in scores else "" for k in shots]
        first = next(r for r in runs if r["task"] == task)
        row.append(first.get("split", ""))
        lines.append(f"| {task} ({first['metric']}{routed(first)}) | " + " | ".join(row) + " |")
    if any(routed(r) for r in runs):
        rule = next(r.get("route") for r in runs if routed(r))
        rule = route_named(results.get("settings", {}).get("route", rule), rule)
        lines.append(f"\nNote: rows marked prompt or LoRA were scored with it ({rule}).")
    if results.get("skipped_tasks"):
        lines.append(f"\nNot scored (no folder): {', '.join(results['skipped_tasks'])}")
    if baseline is not None:
        mine = {r["task"] for r in runs if r["role"] == "evaluation"}
        theirs = {r["task"] for r in baseline["runs"] if r["role"] == "evaluation"}
        if mine != theirs:
            lines.append(
                f"\nNote: the baseline averages other tasks ({', '.join(sorted(theirs))}); "
                "the differences compare unlike averages."
            )
    return "\n".join(lines)


def route_named(flag, route):
    """The rule as the log and the table name it: --route, and the reading by_stage chose."""
    return f"--route {flag}" if flag == route else f"--route {flag}: {route}"


def routed(run):
    """The mark of a results row scored with the stage-1 module: "; prompt", "; LoRA" or ""."""
    return "; prompt" if run.get("prompt") else "; LoRA" if run.get("lora") else ""


# ---------------------------------------------------------------------------------------
# The evaluation run (command line)
# ---------------------------------------------------------------------------------------

Settings = flags.Settings  # every flag: in flags.py, without torch, so --help answers at once


def parse_args(argv=None):
    """Command line -> Settings. Without --model and --data-dir: the miniature lab (docs/lab.md,
    `lab_settings`)."""
    s = Settings(**vars(flags.evaluate_parser().parse_args(argv)))
    if not s.model and not s.data_dir:
        lab_settings(s)
    if s.model and not s.out and os.path.isfile(os.path.join(s.model, "training.json")):
        s.out = os.path.join(os.path.dirname(os.path.normpath(s.model)), "eval.json")  # RUN/stage
    missing = [
        f"--{n.replace('_', '-')}" for n in ("model", "data_dir", "out") if not getattr(s, n)
    ]
    if missing:
        raise BadInput(
            f"the following arguments are required: {', '.join(missing)} (omit both "
            "--model and --data-dir to evaluate the miniature lab)"
        )
    return s


def lab_settings(s):
    """The flagless run: what the flagless promot.py --stage 1 and --stage 2 trained (RUN/stage2/
    best/), against the pretrained lab model as --baseline (scored once into RUN/, then reused);
    the pretrained model alone while there is none. Said in one line."""
    trained, lab = os.path.join(flags.LAB["out"], "stage2", "best"), flags.LAB
    s.data_dir, s.task = lab["data_dir"], s.task or lab["task"]
    s.out = s.out or os.path.join(lab["out"], "eval.json")
    s.model = trained if os.path.isdir(trained) else lab["model"]
    what = f"{trained}, what promot.py --stage 1 and 2 trained, against --baseline "
    if s.model == lab["model"]:
        what = f"the pretrained {s.model} (after promot.py --stage 1 and 2: {trained})"
    elif s.baseline:
        what += s.baseline
    else:
        s.baseline = os.path.join(lab["out"], "eval_pretrained.json")
        s.baseline_model = lab["model"]
        what += f"{s.baseline}, the pretrained {lab['model']}'s (scored once, reused while the "
        what += "flags match)"
    if os.environ.get("RANK", "0") == "0":
        print(f"evaluate.py: no --model/--data-dir: the miniature lab; scoring {what}", flush=True)


def task_names(text, data_dir):
    """The tasks a comma-separated flag names, each registered from the --data-dir folder that
    holds it (checks.task_folder; its task.json may define the task)."""
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    folders = {n: checks.task_folder(data_dir, n) for n in names}
    for folder in dict.fromkeys(folders.values()):
        data.register_tasks([n for n in names if folders[n] == folder], folder)
    return names


def stage1_files(s, training, route):
    """Settle which prompt and LoRA files score the model; returns the line that names them and
    the reading of the rule (`route`) that routes them.

    --prompt and --lora, else the files that promot.py exports beside a model it tuned
    (RUN/stage2/best/prompt.safetensors or lora.safetensors): a ProMoT checkpoint is scored as
    ProMoT, with the rule of `route_prompt`, unless --bare-model. The fine-tuned task defaults
    to the one training.json names."""
    for name in () if s.bare_model else ("prompt", "lora"):
        path = os.path.join(s.model, f"{name}.safetensors")
        if not getattr(s, name) and os.path.isfile(path):
            setattr(s, name, path)
    s.task = s.task or (training.get("task", "") if s.prompt or s.lora else "")
    checks.check_stage1_files(s)
    files = [
        f"{what} {path}" for what, path in (("the prompt", s.prompt), ("LoRA", s.lora)) if path
    ]
    if not files:
        return "scoring the model alone" + (" (--bare-model)" if s.bare_model else "")
    return f"scoring with {' and '.join(files)}, routed by {route_named(s.route, route)}"


def open_checkpoint(path, check_memory):
    """(model.py or causal_lm.py, config, tokenizer) of a checkpoint folder, checked before
    anything is loaded or written: `check_memory(config)` (before building even on the meta
    device), the weight files by name and shape from their headers, the tokenizer against the
    embedding rows."""
    lm = model_family(path)
    config = lm.read_config(path)
    check_memory(config)
    meta = lm.build(config)  # no memory: the tensors config.json implies, by name
    hf = model_lib.ours_to_hf if lm is model_lib else str  # causal_lm's names are the HF ones
    files = model_lib.checkpoint_files(path) if lm is model_lib else (lm.checkpoint_files(path),)
    checks.check_weight_files(path, {hf(n): p.shape for n, p in meta.named_parameters()}, *files)
    tokenizer = data.load_tokenizer(path)
    checks.check_tokenizer_fits(tokenizer, config.vocab_size)
    return lm, config, tokenizer


def load(s, device):
    """(model, tokenizer, {fine-tuned task: prompt}, fine-tuned tasks) as the settings say."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[s.dtype]
    memory = lambda config: checks.check_evaluation_memory(s, config, device)  # noqa: E731
    lm, config, tokenizer = open_checkpoint(s.model, memory)
    t5 = lm.load_pretrained(s.model, dtype=dtype, device=device).eval()
    fine_tuned = task_names(s.task, s.data_dir)
    prompts = {}
    if s.prompt:
        prompts = prompt_formats.read_prompts(s.prompt, t5.config.d_model, fine_tuned or None)
        prompts = dict(zip(task_names(",".join(prompts), s.data_dir), prompts.values()))
    if s.lora:
        lora.load_lora(t5, s.lora)
    return t5, tokenizer, prompts, fine_tuned or list(prompts)


def read_splits(s, plan, say):
    """Each (task, role, shots) of `plan` with its split's name, examples and demonstration
    pool: every file read and checked before any scoring, each from its --data-dir folder."""
    loaded = []
    for name, role, shot_list in plan:
        folder = checks.task_folder(s.data_dir, name)
        task = data.get_task(name, folder)
        split, examples = data.load_eval_split(task, folder, warn=say)
        pool = None
        if any(shot_list):
            pool = data.load_split(task, folder, task.demo_split, limit=s.demo_pool, seed=s.seed)
        checks.check_pool(task, pool, max(shot_list) if pool is not None else 0)
        examples = examples[: s.eval_examples]
        checks.check_template(task, examples, split)  # every input it fills, before scoring
        checks.check_template(task, pool or [], task.demo_split)
        loaded.append((task, role, shot_list, split, examples, pool))
    return loaded


def run(s):
    """The whole evaluation; returns the results dict (written and printed on rank 0)."""
    if s.baseline_model:  # the flagless run: the pretrained lab model first, as the baseline
        lab = dict(model=s.baseline_model, out=s.baseline, baseline="", baseline_model="")
        lab = dataclasses.replace(s, **lab)
        if not checks.results_match(s.baseline, lab, RESULTS_FORMAT):  # else scored before
            run(lab)
    training = checks.read_training_record(s.model, s.prompt, s.lora)
    chosen = ""
    if s.eval_tasks is None:  # the paper's eight, else --data-dir's own tasks
        tuned = checks.names(s.task) + checks.names(training.get("task", ""))
        s.eval_tasks, chosen = checks.default_eval_tasks(s.data_dir, tuned, data.EVALUATION_TASKS)
    tasks, skipped = checks.check_tasks_in_folders(s, data.TASKS)  # unknown/missing at once
    tasks = task_names(",".join(tasks), s.data_dir)
    checks.check_evaluation(s, tasks, RESULTS_FORMAT)
    baseline = checks.read_results(s.baseline, RESULTS_FORMAT) if s.baseline else None
    # The default, --route by_stage: a stage-1 prompt alone on its task, ProMoT's by format. A
    # prompt with no training.json was given for a model promot did not tune: prompt tuning's.
    route = route_by_stage(training.get("stage", "1")) if s.route == "by_stage" else s.route
    using = stage1_files(s, training, route)
    task_shots = s.task_shots or sorted({0, training.get("shots", 0)})  # "+1-shot" runs (§5.3)
    ctx = fsdp.setup_distributed(s.device)
    t5, tokenizer, prompts, fine_tuned = load(s, ctx.device)
    say = (lambda m: print(m, file=sys.stderr)) if ctx.main else (lambda m: None)
    plan = [(n, "fine-tuned", task_shots) for n in fine_tuned] + [
        (n, "evaluation", s.shots) for n in tasks
    ]
    loaded = read_splits(s, plan, say)  # every split read and checked before the first score
    warnings = checks.input_warnings([(t, split, x) for t, _, _, split, x, _ in loaded], tokenizer)
    for line in [f"evaluate.py: {using}", chosen, *warnings]:
        if line:
            say(line)
    if skipped:
        say(f"--skip-missing-tasks: no folder in --data-dir for {', '.join(skipped)}; not scored")
    routing = (prompts, fine_tuned, route)
    runs = score_all(s, t5, tokenizer, loaded, routing, training, ctx, say)
    for line in checks.score_warnings(runs, training, s.model):
        warnings.append(line)
        say(line)
    results = {
        "format": RESULTS_FORMAT,
        "model": s.model,
        "settings": dict(vars(s), world_size=ctx.world),
        "norm_avg": norm_avg_by_shots(runs),
        "skipped_tasks": skipped,  # --skip-missing-tasks: no folder in --data-dir
        "warnings": warnings,
        "runs": runs,
    }
    if ctx.main:
        os.makedirs(os.path.dirname(os.path.abspath(s.out)), exist_ok=True)
        run_checkpoints.write_json(s.out, results, indent=1)
        print(results_table(results, baseline) + f"\nresults, every example included: {s.out}")
    return results


def score_all(s, t5, tokenizer, loaded, routing, training, ctx, say):
    """The result of each (task, shots) read (`read_splits`), with the prompt or LoRA where
    `routing` ({fine-tuned task: prompt}, the fine-tuned tasks, the rule) sends them."""
    prompts, fine_tuned, route = routing
    label_words = sorted({w for n in fine_tuned for w in (data.get_task(n).label_words or ())})
    common = dict(
        num_beams=s.num_beams,
        max_new_tokens=s.max_new_tokens,
        length_penalty=s.length_penalty,
        length_rule=s.length_rule,
        batch_size=s.eval_batch_size,
        seed=s.seed,
        max_input_tokens=s.max_input_tokens,
        truncation=s.truncation,
        distributed=ctx.world > 1,
    )
    runs = []
    for task, role, shot_list, split, examples, pool in loaded:
        prompt = route_prompt(task, prompts, route)
        # LoRA adapters follow the same rule as the prompt: one function decides both
        use_lora = bool(s.lora and route_prompt(task, dict.fromkeys(fine_tuned, True), route))
        lora.set_lora_enabled(t5, use_lora)
        for k in shot_list:
            label = f"{task.name} {k}-shot{' +prompt' if prompt is not None else ''}"
            result = score_task(
                t5,
                tokenizer,
                task,
                examples,
                pool=pool,
                shots=k,
                prompt=prompt,
                format_label_words=label_words if role == "evaluation" else None,
                progress=cli.progress_printer(label) if ctx.main else None,
                **common,
            )
            chose = role == "fine-tuned" and k == training.get("chosen_at_shots")  # training.json
            result.update(role=role, split=split, lora=use_lora, route=route)
            result.update(chose_checkpoint=chose)
            say(f"{label}: {task.metric} {result['score']:.2f} on {len(examples)} {split} examples")
            runs.append(result)
    return runs


def main(argv=None):
    """Exit 0 when done; 2, with one line and nothing written, on the user's error."""
    errors = {BadInput: 2, DamagedFile: 2}
    return fsdp.main("evaluate.py", lambda: run(parse_args(argv)), errors)


if __name__ == "__main__":
    fsdp.exit(main())  # under torchrun: without the interpreter's teardown (see support/fsdp.py)
