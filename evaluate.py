"""Evaluation for ProMoT: decoding, the paper's post-processing, metrics, the results table.

This room holds everything between a trained model and the paper's Tables 3-5:

* decoding -- greedy and beam search over `model.T5` with its KV cache: T5X's (the paper's) or,
  token for token, `transformers`' `generate(..., early_stopping=False, do_sample=False)`;
* post-processing -- App. B.2 of the paper: keep the text between `<extra_id_0>` and
  `<extra_id_1>`, cut where the model starts writing a new example, read the first word
  for classification;
* metrics -- accuracy, TriviaQA exact match, BLEU and ROUGE-2 computed the way T5's own
  evaluation code (`t5/evaluation/metrics.py`) computes them, the paper's normalized
  average and the format-specialization ratio of its Fig. 2;
* the evaluation run -- `python evaluate.py --model DIR ...` prints the paper's table
  and writes every example's input, raw output, prediction and reference to JSON.

It leaves the model to `model.py`, task templates and data files to `data.py`, and
training (which calls `score_task` to pick the best checkpoint) to `promot.py`. It reads top
to bottom: decoding, post-processing, metrics, scoring and prompt routing, results, and the
command line last.
"""

import argparse
import json
import os
import re
import string
import subprocess
import sys

import sacrebleu
import torch
from rouge_score import rouge_scorer

import data
import model as model_lib
from support import cli, dataset_files, fsdp, lora, run_checkpoints


# ---------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------

@torch.inference_mode()
def generate(model, input_ids, attention_mask, prompt=None, num_beams=1, max_new_tokens=128,
             length_penalty=1.0, brevity_penalty="hf"):
    """Greedy (num_beams=1) or beam search; returns (batch, length) generated ids without
    the decoder start token.

    Token for token equal to `transformers`' `generate(num_beams=..., length_penalty=...,
    early_stopping=False, do_sample=False, max_new_tokens=...)` on the same weights, with
    `prompt` (p x d_model) in the place of `inputs_embeds=[P; embed(x)]`. Rows are padded
    like transformers pads them: greedy with pad (0) after EOS, beam search with EOS (its
    fill value is `pad_token_id or eos_token_id`, and T5's pad id 0 is falsy).

    `brevity_penalty` picks the beam search: "hf" (default, the oracle we test against) divides a
    finished hypothesis' summed log-prob by length ** length_penalty; "t5x" is T5X's, which the
    paper decoded with: ((5 + length) / 6) ** length_penalty (T5X's alpha: 0.6) and T5X's
    finishing and stopping rules (`beam_search`; README, Evaluation).
    """
    was_training = model.training
    model.eval()  # dropout off: decoding is deterministic
    try:
        encoder_hidden, encoder_mask = model.encode(input_ids, attention_mask, prompt)
        if num_beams == 1:
            return greedy_search(model, encoder_hidden, encoder_mask, max_new_tokens)
        return beam_search(model, encoder_hidden, encoder_mask, num_beams, max_new_tokens,
                           length_penalty, brevity_penalty)
    finally:
        model.train(was_training)


def greedy_search(model, encoder_hidden, encoder_mask, max_new_tokens):
    """The most likely next token at every step, until every row has written EOS. A row that
    has leaves the batch and the KV cache, so the cost follows the rows still writing."""
    cfg, batch = model.config, encoder_hidden.shape[0]
    cache = model_lib.KVCache()
    last = encoder_hidden.new_full((batch, 1), cfg.decoder_start_token_id, dtype=torch.long)
    live = torch.arange(batch, device=encoder_hidden.device)  # the rows still writing
    out = last.new_full((batch, max_new_tokens), cfg.pad_token_id)  # pad after EOS, like transformers
    for step in range(max_new_tokens):
        last = model.decode(last, encoder_hidden, encoder_mask, cache)[:, -1].float().argmax(-1, keepdim=True)
        out[live, step] = last[:, 0]
        writing = last[:, 0] != cfg.eos_token_id
        if not writing.all():
            if not writing.any():
                return out[:, : step + 1]
            rows = writing.nonzero()[:, 0]
            live, last, encoder_hidden, encoder_mask = live[rows], last[rows], encoder_hidden[rows], encoder_mask[rows]
            cache.reorder(rows, sources=True)
    return out


def beam_search(model, encoder_hidden, encoder_mask, num_beams, max_new_tokens,
                length_penalty=1.0, brevity_penalty="hf"):
    """Beam search with transformers' rules (`generation/utils.py`, `_beam_search`), or with
    brevity_penalty="t5x" T5X's (`t5x/decoding.py`, `beam_search`; see `generate`). An example
    closed by the stopping rule leaves the batch and the KV cache, so the cost follows the open
    examples (transformers decodes every example until the last one closes; same tokens)."""
    cfg, K = model.config, num_beams
    B, device = encoder_hidden.shape[0], encoder_hidden.device
    NEG = -1.0e9  # transformers' score for "impossible"
    divisor, t5x = brevity_divisor(brevity_penalty, length_penalty), brevity_penalty == "t5x"
    cache = model_lib.KVCache()
    # Step 1 decodes one row per example (its K beams share the start token), then K adjacent rows.
    last = torch.full((B, 1), cfg.decoder_start_token_id, dtype=torch.long, device=device)
    # Running beams of the examples still open (`live`: their index in the batch). Only beam 0
    # is live at first, so step 1 does not pick K copies of one token.
    live = torch.arange(B, device=device)
    seqs = torch.empty((B, K, 0), dtype=torch.long, device=device)
    scores = torch.zeros((B, K), device=device)
    scores[:, 1:] = NEG
    # The K best finished hypotheses per open example ("slots"), padded with EOS like transformers.
    slots = dict(ids=torch.full((B, K, max_new_tokens), cfg.eos_token_id, dtype=torch.long, device=device),
                 score=torch.full((B, K), NEG, device=device), real=torch.zeros((B, K), dtype=torch.bool,
                 device=device), length=torch.zeros((B, K), dtype=torch.long, device=device))
    answer, answer_len = slots["ids"][:, 0].clone(), slots["length"][:, 0].clone()  # set as examples close
    in_top_k = torch.arange(2 * K, device=device) < K
    some_slots_full = False  # until one example has K finished slots, every example stays open
    for step in range(1, max_new_tokens + 1):  # step = tokens generated, EOS included
        logp = model.decode(last, encoder_hidden, encoder_mask, cache)[:, -1].float().log_softmax(-1)
        logp = logp.repeat_interleave(K, 0) if step == 1 else logp
        n, V = live.numel(), logp.shape[-1]
        # The 2K best continuations over all beams by summed log-prob, so that K survive even
        # if K of them end in EOS (transformers: beams_to_keep = 2 * num_beams).
        cand_scores, flat = (logp.view(n, K, V) + scores[:, :, None]).view(n, K * V).topk(2 * K)
        beam, token = flat // V, flat % V
        # A candidate ends with EOS or, in transformers only, at max_new_tokens. transformers lets
        # only those ranked in the top K finish (top_num_beam_mask), T5X all 2K; a finished one
        # scores sum / divisor(length), the length counting every generated token, EOS included.
        ends = (token == cfg.eos_token_id) | (step == max_new_tokens and not t5x)
        finishing = ends if t5x else ends & in_top_k
        if finishing.any():  # skipped on most steps: nothing to merge
            cand = torch.cat([seqs.gather(1, beam[:, :, None].expand(-1, -1, step - 1)), token[:, :, None]], 2)
            slots = merge_finished(slots, dict(
                ids=torch.nn.functional.pad(cand, (0, max_new_tokens - step), value=cfg.eos_token_id),
                score=torch.where(finishing, cand_scores / divisor(step), NEG), real=finishing,
                length=torch.full_like(token, step)))
            some_slots_full = bool(slots["real"].all(1).any())
        # The next running beams: the K best candidates that did not end.
        scores, keep = (cand_scores + ends * NEG).topk(K)
        parent = beam.gather(1, keep)
        seqs = torch.cat([seqs.gather(1, parent[:, :, None].expand(-1, -1, step - 1)),
                          token.gather(1, keep)[:, :, None]], 2)
        # The cache row each running beam continues (step 1's cache has one row per example).
        rows = (parent + K * torch.arange(n, device=device)[:, None]) // (K if step == 1 else 1)
        # early_stopping=False: an example closes for good once all K slots are finished and
        # the best running beam cannot beat the worst slot, scored at its current length
        # (transformers) or at max_new_tokens + 1, the bound of T5X's loop condition.
        # (transformers also stops when every candidate ended; at most K of the 2K can be EOS,
        # so that happens only at max_new_tokens, where the loop ends anyway.)
        worst = torch.where(slots["real"], slots["score"].min(1, keepdim=True).values, NEG)
        best = scores[:, :1] / divisor(max_new_tokens + 1 if t5x else step)
        is_open = (best >= worst if t5x else best > worst).any(1)
        closing = some_slots_full and not bool(is_open.all())  # a GPU sync only once it can fire
        if closing:  # the best slot is the answer; the example's rows leave the batch
            closed = live[~is_open]
            answer[closed], answer_len[closed] = slots["ids"][~is_open, 0], slots["length"][~is_open, 0]
            slots = {key: t[is_open] for key, t in slots.items()}
            live, seqs, scores, rows = live[is_open], seqs[is_open], scores[is_open], rows[is_open]
            if live.numel() == 0:
                break
        if closing or step == 1:  # the encoder side moves with the rows too
            encoder_hidden, encoder_mask = encoder_hidden[rows.view(-1)], encoder_mask[rows.view(-1)]
        cache.reorder(rows.view(-1), sources=closing or step == 1)
        last = seqs[:, :, -1].reshape(-1, 1)
    if t5x and live.numel():  # T5X: an example with no finished hypothesis answers with its best running beam
        none = ~slots["real"][:, 0]
        slots["ids"][none, 0], slots["length"][none, 0] = seqs[none, 0], max_new_tokens
    answer[live], answer_len[live] = slots["ids"][:, 0], slots["length"][:, 0]  # open until the end
    return answer[:, : int(answer_len.max())]


def merge_finished(slots, new):
    """Each example's K best finished hypotheses once `new` ones join its slots, old ones first
    (transformers' order, so ties break the same way). Both map ids, score, real (a finished
    hypothesis, not padding) and length to (examples, hypotheses, ...) tensors."""
    pick = torch.cat([slots["score"], new["score"]], 1).topk(slots["score"].shape[1]).indices
    examples = torch.arange(pick.shape[0], device=pick.device)[:, None]
    return {key: torch.cat([t, new[key]], 1)[examples, pick] for key, t in slots.items()}


def brevity_divisor(brevity_penalty, length_penalty):
    """What a finished hypothesis' summed log-prob is divided by, as a function of its length."""
    if brevity_penalty == "hf":
        return lambda n: n ** length_penalty
    if brevity_penalty == "t5x":
        return lambda n: ((5 + n) / 6) ** length_penalty
    raise ValueError(f"brevity_penalty must be 'hf' or 't5x', got {brevity_penalty!r}")


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
       first one, and "IQ:" or "Translated" inside an answer is no prefix.
    3. Classification (`label_words` given, e.g. True/False/Neither, or OpenbookQA's
       A/B/C/D): the first word, with punctuation around it removed ("True." -> "True",
       "B)" -> "B"). Case is kept: the references are the label words themselves.
    """
    if "<extra_id_0>" in text:
        text = text.split("<extra_id_0>", 1)[1]
    text = text.split("<extra_id_1>", 1)[0]
    text = text.strip()
    # A prefix is a whole word after whitespace (the start itself never cuts, it was stripped).
    cuts = [m.start() for p in cut_prefixes for m in [re.search(rf"(?<=\s){re.escape(p)}(?=\s|$)", text)] if m]
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
    hits = [normalize_answer(p) in {normalize_answer(r) for r in refs}
            for p, refs in zip(predictions, references)]
    return 100.0 * _mean(hits)


def bleu(predictions, references):
    """Corpus BLEU as T5 computes it for WMT (`t5/evaluation/metrics.py`, `bleu`):
    sacrebleu's `corpus_bleu` on detokenized text with the `intl` tokenizer, exponential
    smoothing, case-sensitive, no effective order. Examples with fewer references than
    others leave a gap (None) in the extra reference streams, which sacrebleu skips."""
    n_streams = max(len(refs) for refs in references)
    streams = [[refs[i] if i < len(refs) else None for refs in references]
               for i in range(n_streams)]
    return sacrebleu.corpus_bleu(
        predictions, streams, smooth_method="exp", smooth_value=0.0, force=False,
        lowercase=False, tokenize="intl", use_effective_order=False).score


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
    prepare = lambda s: s.replace(" . ", " .\n")
    scores = [scorer.score_multi([prepare(r) for r in refs], prepare(p))["rouge2"].fmeasure
              for p, refs in zip(predictions, references)]
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

class EvaluationError(ValueError):
    """A problem with the user's files or flags; the message says which and what was expected."""


# Longest answer generated, per metric, unless max_new_tokens is given. A classifier answers
# "<extra_id_0> True <extra_id_1>" (a few tokens); translations and summaries need room.
MAX_NEW_TOKENS = {"accuracy": 16, "exact_match": 32, "bleu": 256, "rouge2": 128}


@torch.no_grad()
def score_task(model, tokenizer, task, examples, pool=None, shots=0, prompt=None, num_beams=4,
               max_new_tokens=None, length_penalty=1.0, brevity_penalty="hf", batch_size=16,
               seed=0, max_input_tokens=None, format_label_words=None, distributed=False,
               progress=None, truncation="fair"):
    """Decode `examples` of `task` with `shots` demonstrations and score them.

    Returns a dict: task, shots, metric, score (0-100), num_examples, prompt (whether one
    was prepended), format_ratio (percent of predictions whose first word is in
    `format_label_words`, when given), and examples: each one's input, raw output,
    prediction and references, in the order of `examples`.

    Demonstrations come from `pool` (default: `examples`; never the query itself). Inputs
    longer than `data.input_budget` are fitted by `data.fit_input` under `truncation` ("fair"
    or T5X's "end" cut); they are batched by length (longest first). With `distributed=True` (under torchrun) each
    rank decodes every world-th batch and the records are gathered; every rank must hold
    the whole model. `progress(done, total)` is called after each batch (counts of this
    rank's share).
    """
    task = data.get_task(task)
    if not examples:
        raise EvaluationError(f"task {task.name}: no examples to score")
    rank, world = ((torch.distributed.get_rank(), torch.distributed.get_world_size())
                   if distributed else (0, 1))
    quiet = (lambda message: None) if rank else None  # truncation warnings once, from rank 0
    budget = data.input_budget(task, max_input_tokens)
    pairs = data.kshot_inputs(task, examples, examples if pool is None else pool, shots, seed, tokenizer=tokenizer,
                              max_input_tokens=budget, warn=quiet, truncation=truncation)
    encoded = [data.cut_ids(tokenizer.encode(text), budget) for text, _ in pairs]
    batches = data.eval_batches([len(ids) for ids in encoded], batch_size)
    mine = batches[rank::world]
    device = next(model.parameters()).device
    prompt = prompt.to(device) if prompt is not None else None
    max_new_tokens = max_new_tokens or MAX_NEW_TOKENS[task.metric]
    records, done, total = {}, 0, sum(len(b) for b in mine)
    for batch in mine:
        ids, mask = data.pad_batch([encoded[i] for i in batch])
        out = generate(model, ids.to(device), mask.to(device), prompt=prompt, num_beams=num_beams,
                       max_new_tokens=max_new_tokens, length_penalty=length_penalty,
                       brevity_penalty=brevity_penalty)
        for i, row in zip(batch, out.tolist()):
            raw = decode_with_sentinels(tokenizer, row)
            records[i] = {"input": pairs[i][0], "raw_output": raw,
                          "prediction": postprocess(raw, task.label_words), "references": pairs[i][1]}
        done += len(batch)
        if progress is not None:
            progress(done, total)
    if distributed:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, records)
        records = {i: r for part in parts for i, r in part.items()}
    records = [records[i] for i in range(len(examples))]
    predictions = [r["prediction"] for r in records]
    result = {"task": task.name, "shots": shots, "metric": task.metric,
              "score": compute_metric(task.metric, predictions, [r["references"] for r in records]),
              "num_examples": len(records), "prompt": prompt is not None}
    if format_label_words:
        result["format_ratio"] = format_ratio(predictions, format_label_words)
    result["examples"] = records
    return result


ROUTES = ("fine_tuned_only", "same_format", "same_answers", "always", "never")


def same_format(task, fine_tuned_task, route="fine_tuned_only"):
    """Whether the stage-1 module of `fine_tuned_task` goes to `task`, under one reading of the
    rule (`route_prompt`): the task itself; or an equal `data.Task.format` (same_answers); or
    that, or one label-word set holding the other (same_format: RTE's True/False in CB's)."""
    task, tuned = data.get_task(task), data.get_task(fine_tuned_task)
    if route == "fine_tuned_only" or task.name == tuned.name:
        return task.name == tuned.name
    if route == "same_answers" or task.format == tuned.format:
        return task.format == tuned.format
    mine, theirs = set(task.label_words or ()), set(tuned.label_words or ())
    return bool(mine and theirs and (mine <= theirs or theirs <= mine))


def route_prompt(task, prompts, route="fine_tuned_only"):
    """The soft prompt ({fine-tuned task: prompt}) for `task`, or None: the one routing rule, also
    for LoRA adapters (`prompts` = {fine-tuned task: True}) and the probes.

    Paper §4: "we only use this prompt during inference when the inference task has the same
    format as the fine-tuned target task". Its tables give it to the fine-tuned task alone:
    every prompt-tuning column equals the pretrained one on all eight unseen tasks (Tables 10,
    12-14), CB and WiC too, which §5.3 says "share the same format as the RTE fine-tuning task"
    (SNLI's template is CB's). So the default is "fine_tuned_only"; "same_answers" (RTE -> WiC)
    and "same_format" (RTE -> WiC, CB, SNLI) are the other readings (`same_format`); "always" or
    "never" force it (ablations; "always" prefers a prompt of the same format).
    """
    if route not in ROUTES:
        raise EvaluationError(f"route must be one of {', '.join(ROUTES)}, not {route!r}")
    if route == "never" or not prompts:
        return None
    for name, prompt in prompts.items():
        if same_format(task, name, "same_format" if route == "always" else route):
            return prompt
    return next(iter(prompts.values())) if route == "always" else None


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
    evaluation task; one column per number of shots."""
    runs = results["runs"]
    shots = sorted({r["shots"] for r in runs if r["role"] == "evaluation"})
    head = "| | " + " | ".join(f"{k}-shot" for k in shots) + " |"
    lines = [head, "|---" * (len(shots) + 1) + "|"]
    blank = [""] * max(len(shots) - 1, 0)
    for run in runs:  # "chose the checkpoint": the shots whose validation score picked best/ (training.json)
        if run["role"] == "fine-tuned":
            chose = "; chose the checkpoint" if run.get("chose_checkpoint") else ""
            lines.append(f"| Fine-tuning {run['task']} ({run['shots']}-shot, {run['metric']}{chose}) | "
                         + " | ".join([f"{run['score']:.2f}"] + blank) + " |")
    cells = []
    for k in shots:
        avg = results["norm_avg"].get(str(k))
        cell = "" if avg is None else f"{avg:.2f}"
        base = (baseline or {}).get("norm_avg", {}).get(str(k))
        if avg is not None and base is not None:
            cell += f" ({avg - base:+.2f})"
        cells.append(cell)
    lines.append("| Norm. Avg. | " + " | ".join(cells) + " |")
    scores = {(r["task"], r["shots"]): r for r in runs if r["role"] == "evaluation"}
    for task in dict.fromkeys(r["task"] for r in runs if r["role"] == "evaluation"):
        row = [f"{scores[task, k]['score']:.2f}" if (task, k) in scores else "" for k in shots]
        metric = next(r["metric"] for r in runs if r["task"] == task)
        lines.append(f"| {task} ({metric}) | " + " | ".join(row) + " |")
    if baseline is not None:
        mine = {r["task"] for r in runs if r["role"] == "evaluation"}
        theirs = {r["task"] for r in baseline["runs"] if r["role"] == "evaluation"}
        if mine != theirs:
            lines.append(f"\nNote: the baseline averages other tasks ({', '.join(sorted(theirs))}); "
                         "the differences compare unlike averages.")
    return "\n".join(lines)


def read_results(path):
    """A results file written by this program (for --baseline), checked for its format."""
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except OSError as err:
        raise EvaluationError(f"{path}: cannot read the baseline results ({err.strerror})") from None
    except json.JSONDecodeError as err:
        raise EvaluationError(f"{path}: not JSON (line {err.lineno}: {err.msg}); expected a results "
                              "file written by evaluate.py --out") from None
    if not isinstance(results, dict) or results.get("format") != RESULTS_FORMAT:
        found = results.get("format") if isinstance(results, dict) else type(results).__name__
        raise EvaluationError(f"{path}: not an evaluate.py results file (format {found!r}, expected "
                              f"{RESULTS_FORMAT!r})")
    return results


# ---------------------------------------------------------------------------------------
# The evaluation run (command line)
# ---------------------------------------------------------------------------------------

# Old flag -> new flag: the same setting has the same name in promot.py and evaluate.py.
RENAMED = {"--fine-tuned-tasks": "--task", "--prompt-tasks": "--task", "--tasks": "--eval-tasks",
           "--limit": "--eval-examples", "--batch-size": "--eval-batch-size",
           "--demo-pool-limit": "--train-examples", "--max-input-length": "--max-input-tokens",
           "--use-prompt": "--route"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="evaluate.py", formatter_class=cli.HelpFormatter,
        description="Score a (ProMoT-)fine-tuned T5/mT5 on the paper's tasks and print its table "
                    "(README: Evaluation). Without --model and --data-dir: the miniature lab.")
    p.add_argument("--model", default=None,
                   help="checkpoint folder: config.json, weights, spiece.model [lab: lab/tiny-t5]")
    p.add_argument("--data-dir", default=None, help="folder with one sub-folder per task [lab: lab/data]")
    p.add_argument("--out", default=None,
                   help="results JSON to write, every example included [lab: runs/lab/eval.json]")
    p.add_argument("--task", default=None, help="fine-tuned task(s), scored 0-shot in the first rows "
                   "[the prompt file's 'prompt.<task>' keys]")
    p.add_argument("--eval-tasks", default=None, help="unseen tasks, comma-separated: the table's rows "
                   "[the paper's eight; lab: its tasks but lab_owns]")
    p.add_argument("--shots", default="1,4", help="numbers of demonstrations, comma-separated (columns)")
    p.add_argument("--task-shots", default=None, help="numbers of demonstrations for the fine-tuned task(s) "
                   "[0, and the training's --shots as training.json beside the checkpoint records: '+1-shot' runs]")
    p.add_argument("--prompt", default=None, help="soft prompt file: prompt.safetensors from promot.py, or a T5X .npy")
    p.add_argument("--lora", default=None, help="LoRA adapter file from promot.py --stage1-module lora (App. C.7)")
    p.add_argument("--route", choices=ROUTES, default="fine_tuned_only", help="which tasks get the prompt (or "
                   "LoRA): the fine-tuned task(s) only, as the paper's tables; other readings of §4 (README)")
    p.add_argument("--baseline", default=None, help="results JSON of another run: Norm. Avg. differences")
    p.add_argument("--eval-examples", type=int, default=None, help="score only the first N examples of each task")
    p.add_argument("--num-beams", type=int, default=4, help="beam width (App. B.4: 4); 1 = greedy")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest answer [per metric: " + ", ".join(f"{k} {v}" for k, v in MAX_NEW_TOKENS.items()) + "]")
    p.add_argument("--length-penalty", type=float, default=0.6, help="alpha (T5X's 0.6; transformers' is 1.0)")
    p.add_argument("--brevity-penalty", choices=("t5x", "hf"), default="t5x", help="t5x: T5X's beam search, "
                   "score / ((5+length)/6)**alpha (the paper's); hf: transformers', score / length**alpha")
    p.add_argument("--eval-batch-size", type=int, default=16, help="examples per rank per decoding batch")
    p.add_argument("--max-input-tokens", type=int, default=None, help="input tokens kept, EOS included [the "
                   f"task's: 1024 for summarization; else {data.MAX_INPUT_TOKENS}, promot.py's default]")
    p.add_argument("--truncation", choices=data.TRUNCATIONS, default="fair", help="fair: trim every text to a "
                   "fair share, all demonstrations kept; end: T5X's cut, the first N-1 tokens and EOS")
    p.add_argument("--seed", type=int, default=0, help="seed for choosing demonstrations")
    p.add_argument("--train-examples", type=int, default=None,
                   help="draw demonstrations from a --seed sample of N training examples [all]")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="auto: bfloat16 on GPU, float32 on CPU")
    args = p.parse_args(cli.renamed_flags(sys.argv[1:] if argv is None else argv, RENAMED, "evaluate.py"))
    if not args.model and not args.data_dir:  # the miniature lab (README): the bundled model and suite
        lab = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lab")
        args.model, args.data_dir = os.path.join(lab, "tiny-t5"), os.path.join(lab, "data")
        args.out = args.out or os.path.join("runs", "lab", "eval.json")
        args.task = args.task or "lab_owns"
        if args.eval_tasks is None and os.path.isdir(args.data_dir):
            args.eval_tasks = ",".join(sorted(set(os.listdir(args.data_dir)) - {"lab_owns"}))
    missing = [flag for flag, value in (("--model", args.model), ("--data-dir", args.data_dir), ("--out", args.out))
               if not value]
    if missing:
        p.error(f"the following arguments are required: {', '.join(missing)} "
                "(omit both --model and --data-dir to evaluate the miniature lab)")
    if args.eval_tasks is None:
        args.eval_tasks = ",".join(data.EVALUATION_TASKS)
    return args


def _task_list(text, data_dir):
    names = [t.strip() for t in (text or "").split(",") if t.strip()]
    return [data.get_task(name, data_dir).name for name in names]


def check_args(args):
    """(shots, evaluation tasks, baseline results): the flags checked before any work."""
    shots = cli.numbers(args.shots, "--shots", EvaluationError)
    task_shots = cli.numbers(args.task_shots or "0", "--task-shots", EvaluationError)
    for flag in ("eval_examples", "num_beams", "max_new_tokens", "eval_batch_size", "train_examples",
                 "max_input_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise EvaluationError(f"--{flag.replace('_', '-')} {value}: expected a positive number")
    if args.lora and not args.task:
        raise EvaluationError("--lora needs --task (the adapters are routed from it, --route)")
    if not os.path.isdir(args.model):
        raise EvaluationError(f"--model {args.model}: not a checkpoint directory (config.json, weights, spiece.model)")
    if os.path.isdir(args.out) or not os.access(os.path.dirname(os.path.abspath(args.out)) or ".", os.W_OK) \
            and os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise EvaluationError(f"--out {args.out}: expected a results file in a writable folder")
    tasks = _task_list(args.eval_tasks, args.data_dir)
    if not tasks and not args.task and not args.prompt:
        raise EvaluationError(f"--eval-tasks {args.eval_tasks!r} names no task and there is no --task: "
                              "nothing to score")
    baseline = read_results(args.baseline) if args.baseline else None
    return shots, task_shots, tasks, baseline


def training_record(args):
    """training.json (promot.py's export: stage, task, shots, how best/ was chosen) beside the
    checkpoint, the prompt or the LoRA file; {} for a checkpoint promot did not write."""
    folders = [f for f in (args.model, os.path.dirname(args.prompt or ""), os.path.dirname(args.lora or "")) if f]
    path = next((p for p in (os.path.join(f, "training.json") for f in folders) if os.path.isfile(p)), None)
    record = dataset_files.read_json(path) if path else {}  # bad JSON: a DataError naming the line
    if not isinstance(record, dict) or not isinstance(record.get("shots", 0), int) or record.get("shots", 0) < 0:
        raise EvaluationError(f"{path}: expected promot.py's training.json, an object with \"shots\" a number >= 0 "
                              "(delete it to evaluate without it)")
    return record


def load(args, device):
    """(model, tokenizer, {fine-tuned task: prompt}, fine-tuned tasks) as the flags say."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
             "auto": torch.bfloat16 if device.type == "cuda" else torch.float32}[args.dtype]
    t5 = model_lib.load_pretrained(args.model, dtype=dtype, device=device).eval()
    spiece = os.path.join(args.model, "spiece.model")
    if not os.path.isfile(spiece):
        raise EvaluationError(f"{args.model}: no spiece.model beside the checkpoint")
    tokenizer = data.Tokenizer(spiece)
    tokenizer.check_fits(t5.config.vocab_size)
    fine_tuned = _task_list(args.task, args.data_dir)  # (through the data folder: it may define tasks by task.json)
    prompts = {}
    if args.prompt:
        prompts = model_lib.read_prompts(args.prompt, t5.config.d_model, fine_tuned or None)
        prompts = {data.get_task(name, args.data_dir).name: p for name, p in prompts.items()}
    if args.lora:
        lora.load_lora(t5, args.lora)
    return t5, tokenizer, prompts, fine_tuned or list(prompts)


def run(args):
    """The whole evaluation; returns the results dict (written and printed on rank 0)."""
    shots, task_shots, tasks, baseline = check_args(args)
    training = training_record(args)
    if args.task_shots is None:  # a "+1-shot" run (§5.3) is reported 0-shot and 1-shot
        task_shots = sorted({0, training.get("shots", 0)})
    ctx = fsdp.setup_distributed("auto")
    t5, tokenizer, prompts, fine_tuned = load(args, ctx.device)
    label_words = sorted({w for name in fine_tuned for w in (data.get_task(name).label_words or ())})
    settings = dict(vars(args), dtype=str(next(t5.parameters()).dtype).replace("torch.", ""), world_size=ctx.world)
    common = dict(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                  length_penalty=args.length_penalty, brevity_penalty=args.brevity_penalty,
                  batch_size=args.eval_batch_size, seed=args.seed, max_input_tokens=args.max_input_tokens,
                  truncation=args.truncation, distributed=ctx.world > 1)
    say = (lambda m: print(m, file=sys.stderr)) if ctx.main else (lambda m: None)
    runs = []
    plan = [(name, "fine-tuned", task_shots) for name in fine_tuned] + [(name, "evaluation", shots) for name in tasks]
    loaded = []  # every split read and checked before any scoring
    for name, role, shot_list in plan:
        task = data.get_task(name, args.data_dir)
        split, examples = data.load_eval_split(task, args.data_dir, warn=say)
        pool = (data.load_split(task, args.data_dir, task.demo_split, limit=args.train_examples, seed=args.seed)
                if any(shot_list) else None)
        data.check_pool(task, pool, max(shot_list) if pool is not None else 0)
        loaded.append((task, role, shot_list, split, examples[: args.eval_examples], pool))
    for task, role, shot_list, split, examples, pool in loaded:
        prompt = route_prompt(task, prompts, args.route)
        # LoRA adapters follow the same rule as the prompt: one function decides both
        use_lora = args.lora is not None and route_prompt(task, dict.fromkeys(fine_tuned, True), args.route)
        lora.set_lora_enabled(t5, bool(use_lora))
        for k in shot_list:
            label = f"{task.name} {k}-shot{' +prompt' if prompt is not None else ''}"
            result = score_task(t5, tokenizer, task, examples, pool=pool, shots=k, prompt=prompt,
                                format_label_words=label_words if role == "evaluation" else None,
                                progress=cli.progress_printer(label) if ctx.main else None, **common)
            result.update(role=role, split=split, lora=bool(use_lora), chose_checkpoint=role == "fine-tuned"
                          and k == training.get("shots") and "validation" in training.get("chosen_by", ""))
            say(f"{label}: {task.metric} {result['score']:.2f} on {len(examples)} {split} examples")
            runs.append(result)
    results = {"format": RESULTS_FORMAT, "model": args.model, "settings": settings,
               "norm_avg": norm_avg_by_shots(runs), "runs": runs}
    if ctx.main:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        run_checkpoints.write_json(args.out, results, indent=1)
        print(results_table(results, baseline))
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plot"]:  # the figures moved to diagnostics.py; this alias runs it
        print("evaluate.py: 'evaluate.py plot' is now 'diagnostics.py plot'; the old name will go away",
              file=sys.stderr)
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.call([sys.executable, os.path.join(here, "diagnostics.py"), *argv])
    args = parse_args(argv)
    try:
        run(args)
    except (EvaluationError, data.DataError, model_lib.CheckpointError, lora.LoRAError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    fsdp.exit(main())  # under torchrun: without the interpreter's teardown (see support/fsdp.py)
