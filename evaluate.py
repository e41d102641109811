"""Evaluation for ProMoT: decoding, the paper's post-processing, metrics, the results table.

This room holds everything between a trained model and the paper's Tables 3-5:

* decoding -- greedy and beam search over `model.T5` with its KV cache, token for token
  equal to `transformers`' `generate(..., early_stopping=False, do_sample=False)`;
* post-processing -- App. B.2 of the paper: keep the text between `<extra_id_0>` and
  `<extra_id_1>`, cut where the model starts writing a new example, read the first word
  for classification;
* metrics -- accuracy, TriviaQA exact match, BLEU and ROUGE-2 computed the way T5's own
  evaluation code (`t5/evaluation/metrics.py`) computes them, the paper's normalized
  average and the format-specialization ratio of its Fig. 2;
* the evaluation run -- `python evaluate.py --model DIR ...` prints the paper's table
  and writes every example's input, raw output, prediction and reference to JSON.

It leaves the model to `model.py`, task templates and data files to `data.py`, and
training (which calls `score_task` to pick the best checkpoint) to `promot.py`.
"""

import re
import string

import sacrebleu
import torch
from rouge_score import rouge_scorer

from model import KVCache


# ---------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def generate(model, input_ids, attention_mask, prompt=None, num_beams=1, max_new_tokens=128,
             length_penalty=1.0, brevity_penalty="hf"):
    """Greedy (num_beams=1) or beam search; returns (batch, length) generated ids without
    the decoder start token.

    Token for token equal to `transformers`' `generate(num_beams=..., length_penalty=...,
    early_stopping=False, do_sample=False, max_new_tokens=...)` on the same weights, with
    `prompt` (p x d_model) in the place of `inputs_embeds=[P; embed(x)]`. Rows are padded
    like transformers pads them: greedy with pad (0) after EOS, beam search with EOS (its
    fill value is `pad_token_id or eos_token_id`, and T5's pad id 0 is falsy).

    `brevity_penalty` picks what a finished hypothesis' summed log-prob is divided by:
    "hf" (default, the oracle we test against): length ** length_penalty;
    "t5x": ((5 + length) / 6) ** length_penalty, the penalty of T5X's beam search that the
    paper decoded with (T5X's default alpha is 0.6). Only the divisor changes; the search
    itself stays transformers'.
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
    """The most likely next token at every step, until every row has written EOS."""
    cfg, batch = model.config, encoder_hidden.shape[0]
    cache = KVCache()
    last = encoder_hidden.new_full((batch, 1), cfg.decoder_start_token_id, dtype=torch.long)
    finished = torch.zeros(batch, dtype=torch.bool, device=encoder_hidden.device)
    out = []
    for _ in range(max_new_tokens):
        logits = model.decode(last, encoder_hidden, encoder_mask, cache)[:, -1].float()
        last = logits.argmax(-1, keepdim=True).masked_fill(finished[:, None], cfg.pad_token_id)
        out.append(last)
        finished |= last[:, 0] == cfg.eos_token_id
        if finished.all():
            break
    return torch.cat(out, dim=1)


def beam_search(model, encoder_hidden, encoder_mask, num_beams, max_new_tokens,
                length_penalty=1.0, brevity_penalty="hf"):
    """Beam search with transformers' rules (`generation/utils.py`, `_beam_search`)."""
    cfg, K = model.config, num_beams
    B, device = encoder_hidden.shape[0], encoder_hidden.device
    NEG = -1.0e9  # transformers' score for "impossible"
    if brevity_penalty == "hf":
        divisor = lambda n: n ** length_penalty
    elif brevity_penalty == "t5x":
        divisor = lambda n: ((5 + n) / 6) ** length_penalty
    else:
        raise ValueError(f"brevity_penalty must be 'hf' or 't5x', got {brevity_penalty!r}")
    # The K beams of an example sit in adjacent rows and read the same encoder output.
    encoder_hidden = encoder_hidden.repeat_interleave(K, dim=0)
    encoder_mask = encoder_mask.repeat_interleave(K, dim=0)
    cache = KVCache()
    last = torch.full((B * K, 1), cfg.decoder_start_token_id, dtype=torch.long, device=device)
    # Running beams. Only beam 0 is live at first, so step 1 does not pick K copies of one token.
    seqs = torch.empty((B, K, 0), dtype=torch.long, device=device)
    scores = torch.zeros((B, K), device=device)
    scores[:, 1:] = NEG
    # The K best finished hypotheses per example ("slots"), padded with EOS like transformers.
    done = torch.full((B, K, max_new_tokens), cfg.eos_token_id, dtype=torch.long, device=device)
    done_scores = torch.full((B, K), NEG, device=device)
    done_real = torch.zeros((B, K), dtype=torch.bool, device=device)
    done_len = torch.zeros((B, K), dtype=torch.long, device=device)
    is_open = torch.ones((B, 1), dtype=torch.bool, device=device)
    in_top_k = torch.arange(2 * K, device=device) < K
    row0 = torch.arange(B, device=device)[:, None] * K
    for step in range(1, max_new_tokens + 1):  # step = tokens generated, EOS included
        logp = model.decode(last, encoder_hidden, encoder_mask, cache)[:, -1].float().log_softmax(-1)
        V = logp.shape[-1]
        # 2K best continuations over all beams by summed log-prob, so that K survive even if
        # K of them end in EOS (transformers: beams_to_keep = 2 * num_beams).
        cand_scores, flat = (logp.view(B, K, V) + scores[:, :, None]).view(B, K * V).topk(2 * K)
        beam, token = flat // V, flat % V
        cand = torch.cat([seqs.gather(1, beam[:, :, None].expand(-1, -1, step - 1)), token[:, :, None]], 2)
        # A candidate ends with EOS or when it reaches max_new_tokens (the stopping criteria).
        ends = (token == cfg.eos_token_id) | (step == max_new_tokens)
        # The next running beams: the K best candidates that did not end.
        scores, keep = (cand_scores + ends * NEG).topk(K)
        seqs = cand.gather(1, keep[:, :, None].expand(-1, -1, step))
        # Only candidates ranked in the top K may finish (top_num_beam_mask), and only while
        # the example is open; a finished hypothesis scores sum / length ** length_penalty,
        # the length counting every generated token, EOS included.
        finishing = ends & in_top_k & is_open
        new_scores = torch.where(finishing, cand_scores / divisor(step), NEG)
        # Merge with the slots, old ones first, and keep the K best (same order as transformers,
        # so ties break the same way).
        pick = torch.cat([done_scores, new_scores], 1).topk(K).indices
        cand = torch.nn.functional.pad(cand, (0, max_new_tokens - step), value=cfg.eos_token_id)
        done = torch.cat([done, cand], 1).gather(1, pick[:, :, None].expand(-1, -1, max_new_tokens))
        done_scores = torch.cat([done_scores, new_scores], 1).gather(1, pick)
        done_real = torch.cat([done_real, finishing], 1).gather(1, pick)
        done_len = torch.cat([done_len, torch.full_like(token, step)], 1).gather(1, pick)
        # The cache follows each running beam to the row it came from.
        cache.reorder((beam.gather(1, keep) + row0).view(-1))
        last = seqs[:, :, -1].reshape(B * K, 1)
        # early_stopping=False: an example closes for good once all K slots are finished and
        # the best running beam, scored at its current length, cannot beat the worst slot.
        worst = torch.where(done_real, done_scores.min(1, keepdim=True).values, NEG)
        is_open &= (scores[:, :1] / divisor(step) > worst).any(1, keepdim=True)
        if not is_open.any() or ends.all():
            break
    # The best slot of each example, cut to the longest of them.
    return done[:, 0, : int(done_len[:, 0].max())]


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
       `Article:`) that is not at the very start. B.2 says "the second prefix": an output
       that begins by echoing a prefix keeps that first one.
    3. Classification (`label_words` given, e.g. True/False/Neither, or OpenbookQA's
       A/B/C/D): the first word, with punctuation around it removed ("True." -> "True",
       "B)" -> "B"). Case is kept: the references are the label words themselves.
    """
    if "<extra_id_0>" in text:
        text = text.split("<extra_id_0>", 1)[1]
    text = text.split("<extra_id_1>", 1)[0]
    text = text.strip()
    cuts = [text.find(p, 1) for p in cut_prefixes]
    cuts = [c for c in cuts if c > 0]
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

    `tokenizer.decode` drops sentinels (data.py), so the ids are split at each sentinel and
    the pieces decoded one by one. Works with any tokenizer that has `decode(ids)` and
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
        if not 0.0 <= v <= 100.0:
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
