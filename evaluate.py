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

import collections
import re
import string

import sacrebleu
from rouge_score import rouge_scorer


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
