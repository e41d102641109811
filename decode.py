"""Greedy and beam search over any autoregressive model, given as a step function.

A copy unit: it imports only torch, so it works pasted alone into another codebase. Like
t5x's `beam_search(tokens_to_logits, ...)`, it never sees a model, only two functions:

    step(tokens, state) -> (logits, state)
        tokens: (rows, 1) LongTensor, the last token of each row (at first its start token);
        logits: (rows, vocab) scores of the next token (any float dtype; softmax is taken here);
        state: whatever the model carries between steps (a KV cache, the encoder output).
    reorder(state, rows, moved) -> state
        Keep the rows `rows` (a 1-D LongTensor of row indices) of the state, in that order:
        new row i continues old row rows[i]. `moved` is False when every row continues a row of
        its own example (beams trading places), so what an example's rows share (the encoder
        output, cross-attention keys) may stay put; True when rows are repeated (beam search's
        first step: one row per example becomes num_beams) or dropped (finished examples).

The first call of `step` gets one row per example; beam search then has num_beams rows per
open example, example-major (the beams of example 0, then of example 1, ...). Finished rows
and examples leave the batch (`reorder(..., moved=True)`), so the cost follows the rows still
writing. A T5 plugs in through model.py's `start_decoding`; a table of bigram logits
`table[previous token, next token]` (tests/test_copy_decode.py) with two:

    step = lambda tokens, state: (table[tokens[:, 0]], state)
    ids = generate(step, lambda state, rows, moved: state, None, starts, 20, eos_id=1)

Two length rules, by name (`length_rule`): two small classes at the bottom, which the search
asks the same four questions. A finished hypothesis scores its summed log-probability divided
by a function of its length (EOS included), with alpha = `length_penalty`:
* "t5x" (the default; T5X's `decoding.beam_search`, which the ProMoT paper decoded with):
  ((5 + length) / 6) ** alpha; any of the 2K best candidates that ends in EOS finishes, none
  finishes by reaching max_new_tokens (the best running beam answers only when nothing
  finished), and the search stops on a bound scored at max_new_tokens + 1.
* "transformers" (token for token `generate(num_beams=..., length_penalty=...,
  early_stopping=False, do_sample=False)`): length ** alpha; only candidates ranked in the top K
  finish, beams finish at max_new_tokens, and the bound scores the best running beam at its
  current length.
The default decoding is the paper's (App. B.4): beam 4, the T5X rule, alpha 0.6.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

NEG = -1.0e9  # the score of "impossible" (transformers' value)


def generate(
    step,
    reorder,
    state,
    start_tokens,
    max_new_tokens,
    eos_id,
    pad_id=0,
    num_beams=4,
    length_penalty=0.6,
    length_rule="t5x",
):
    """Greedy search (num_beams=1) or beam search; returns (batch, length) generated ids, the
    start token not included, each row padded with `pad_id` after its EOS. `start_tokens` is
    the (batch,) LongTensor of each example's first decoder input."""
    common = (step, reorder, state, start_tokens, max_new_tokens, eos_id, pad_id)
    if num_beams == 1:
        return greedy_search(*common)
    return beam_search(*common, num_beams, length_penalty, length_rule)


def greedy_search(step, reorder, state, start_tokens, max_new_tokens, eos_id, pad_id=0):
    """The most likely next token at every step, until every row has written EOS. A row that
    has leaves the batch and the state, so the cost follows the rows still writing."""
    batch = start_tokens.shape[0]
    tokens = start_tokens.view(batch, 1)
    live = torch.arange(batch, device=tokens.device)  # the rows still writing
    out = tokens.new_full((batch, max_new_tokens), pad_id)
    for i in range(max_new_tokens):
        logits, state = step(tokens, state)
        tokens = logits.float().argmax(-1, keepdim=True)
        out[live, i] = tokens[:, 0]
        writing = tokens[:, 0] != eos_id
        if not writing.all():
            if not writing.any():
                return out[:, : i + 1]
            rows = writing.nonzero()[:, 0]
            live, tokens = live[rows], tokens[rows]
            state = reorder(state, rows, True)
    return out


def beam_search(
    step,
    reorder,
    state,
    start_tokens,
    max_new_tokens,
    eos_id,
    pad_id=0,
    num_beams=4,
    length_penalty=0.6,
    length_rule="t5x",
):
    """Beam search with T5X's rules (`t5x/decoding.py`, `beam_search`) or transformers'
    (`generation/utils.py`, `_beam_search`), see above; (batch, length) ids padded with `pad_id`.
    A closed example leaves the batch and the state (transformers decodes it to the end)."""
    K, B, device = num_beams, start_tokens.shape[0], start_tokens.device
    rule = rule_named(length_rule, length_penalty)
    tokens = start_tokens.view(B, 1)  # step 1: one row per example, its K beams share it
    # Running beams of the examples still open (`live`: their index in the batch). Only beam 0
    # is live at first, so step 1 does not pick K copies of one token.
    live = torch.arange(B, device=device)
    seqs = torch.empty((B, K, 0), dtype=torch.long, device=device)
    scores = torch.zeros((B, K), device=device)
    scores[:, 1:] = NEG
    # The K best finished hypotheses per open example ("slots"), padded like the output.
    slots = dict(
        ids=torch.full((B, K, max_new_tokens), pad_id, dtype=torch.long, device=device),
        score=torch.full((B, K), NEG, device=device),
        real=torch.zeros((B, K), dtype=torch.bool, device=device),
        length=torch.zeros((B, K), dtype=torch.long, device=device),
    )
    answer, answer_len = slots["ids"][:, 0].clone(), slots["length"][:, 0].clone()
    in_top_k = torch.arange(2 * K, device=device) < K
    some_slots_full = False  # until one example has K finished slots, every example stays open
    for length in range(1, max_new_tokens + 1):  # tokens generated, EOS included
        logits, state = step(tokens, state)
        logp = logits.float().log_softmax(-1)
        logp = logp.repeat_interleave(K, 0) if length == 1 else logp
        n, V = live.numel(), logp.shape[-1]
        # The 2K best continuations over all beams by summed log-prob, so that K survive even
        # if K of them end in EOS (transformers: beams_to_keep = 2 * num_beams).
        flat_scores = (logp.view(n, K, V) + scores[:, :, None]).view(n, K * V)
        cand_scores, flat = flat_scores.topk(2 * K)
        beam, token = flat // V, flat % V
        # The rule says which candidates finish (ending in EOS, or at max_new_tokens); a
        # finished one scores sum / divisor(length).
        is_eos = token == eos_id
        finishing = rule.finishing(is_eos, length == max_new_tokens, in_top_k)
        if finishing.any():  # skipped on most steps: nothing to merge
            ids = F.pad(extend(seqs, beam, token), (0, max_new_tokens - length), value=pad_id)
            score = torch.where(finishing, cand_scores / rule.divisor(length), NEG)
            new = dict(ids=ids, score=score, real=finishing, length=torch.full_like(token, length))
            slots = merge_finished(slots, new)
            some_slots_full = bool(slots["real"].all(1).any())
        # The next running beams: the K best candidates that did not end in EOS. (After
        # max_new_tokens none runs on; what they are then no longer matters.)
        scores, keep = (cand_scores + is_eos * NEG).topk(K)
        parent = beam.gather(1, keep)
        seqs = extend(seqs, parent, token.gather(1, keep))
        # The state row each running beam continues (step 1's state has one row per example).
        rows = (parent + K * torch.arange(n, device=device)[:, None]) // (K if length == 1 else 1)
        is_open = still_open(slots, scores, rule, length, max_new_tokens)
        closing = some_slots_full and not bool(is_open.all())  # a GPU sync only once it can fire
        if closing:  # the best slot is the answer; the example's rows leave the batch
            closed = live[~is_open]
            answer[closed] = slots["ids"][~is_open, 0]
            answer_len[closed] = slots["length"][~is_open, 0]
            slots = {key: t[is_open] for key, t in slots.items()}
            live, seqs, scores, rows = live[is_open], seqs[is_open], scores[is_open], rows[is_open]
            if live.numel() == 0:
                break
        state = reorder(state, rows.view(-1), closing or length == 1)
        tokens = seqs[:, :, -1].reshape(-1, 1)
    if live.numel():
        rule.answer_unfinished(slots, seqs, max_new_tokens)
    answer[live], answer_len[live] = slots["ids"][:, 0], slots["length"][:, 0]  # open to the end
    return answer[:, : int(answer_len.max())]


def extend(seqs, beams, tokens):
    """(examples, k, length + 1): the sequences of the chosen `beams`, each with its token."""
    parents = seqs.gather(1, beams[:, :, None].expand(-1, -1, seqs.shape[2]))
    return torch.cat([parents, tokens[:, :, None]], 2)


def still_open(slots, scores, rule, length, max_new_tokens):
    """Which examples stay open (early_stopping=False): an example closes for good once all K
    slots are finished and its best running beam, bounded as its rule says, cannot beat the
    worst slot. (transformers also stops when every candidate ended; at most K of the 2K can be
    EOS, so that happens only at max_new_tokens, where the loop ends anyway.)"""
    worst = torch.where(slots["real"], slots["score"].min(1, keepdim=True).values, NEG)
    return rule.may_still_win(scores[:, :1], worst, length, max_new_tokens).any(1)


def merge_finished(slots, new):
    """Each example's K best finished hypotheses once `new` ones join its slots, old ones first
    (transformers' order, so ties break the same way). Both map ids, score, real (a finished
    hypothesis, not padding) and length to (examples, hypotheses, ...) tensors."""
    pick = torch.cat([slots["score"], new["score"]], 1).topk(slots["score"].shape[1]).indices
    examples = torch.arange(pick.shape[0], device=pick.device)[:, None]
    return {key: torch.cat([t, new[key]], 1)[examples, pick] for key, t in slots.items()}


# ----------------------------------------------------------------------------
# The two length rules: the same four answers, T5X's and transformers'


@dataclass
class T5XRule:
    """T5X's `decoding.beam_search` (`t5x/decoding.py`), which the paper decoded with (App. B.5);
    T5X's default alpha is 0.6."""

    alpha: float

    def divisor(self, length):  # T5X's brevity_penalty
        return ((5 + length) / 6) ** self.alpha

    def finishing(self, is_eos, at_limit, in_top_k):
        """Any of the 2K best candidates that ends in EOS finishes; none at the length limit."""
        return is_eos

    def may_still_win(self, best, worst, length, max_new_tokens):
        """The bound of T5X's loop condition: the best running beam's sum (`best`) scored at
        max_new_tokens + 1, against the worst finished score, ties staying open."""
        return best / self.divisor(max_new_tokens + 1) >= worst

    def answer_unfinished(self, slots, seqs, max_new_tokens):
        """An example that finished nothing answers with its best running beam."""
        none = ~slots["real"][:, 0]
        slots["ids"][none, 0], slots["length"][none, 0] = seqs[none, 0], max_new_tokens


@dataclass
class TransformersRule:
    """transformers' `generate(num_beams=..., length_penalty=..., early_stopping=False)`
    (`generation/utils.py`, `_beam_search`)."""

    alpha: float

    def divisor(self, length):
        return length**self.alpha

    def finishing(self, is_eos, at_limit, in_top_k):
        """Only candidates ranked in the top K finish (`_update_finished_beams`'
        top_num_beam_mask): those ending in EOS and, at the length limit, all of them."""
        return (is_eos | at_limit) & in_top_k

    def may_still_win(self, best, worst, length, max_new_tokens):
        """The best running beam's sum (`best`) scored at its current length, against the
        worst finished score (`_check_early_stop_heuristic`)."""
        return best / self.divisor(length) > worst

    def answer_unfinished(self, slots, seqs, max_new_tokens):
        """Nothing to do: at the length limit every open example's best candidates finished."""


RULES = {"t5x": T5XRule, "transformers": TransformersRule}
LENGTH_RULES = tuple(RULES)  # the names, e.g. for a command line's choices


def rule_named(name, length_penalty):
    """The length rule called `name` ("t5x" or "transformers"), with alpha = length_penalty."""
    if name not in RULES:
        raise ValueError(f"length_rule must be one of {', '.join(RULES)}, got {name!r}")
    return RULES[name](length_penalty)


def brevity_divisor(length_rule, length_penalty):
    """What a finished hypothesis' summed log-prob is divided by, as a function of its length."""
    return rule_named(length_rule, length_penalty).divisor
