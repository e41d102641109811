"""decode.beam_search with length_rule="t5x" (the default) follows T5X's beam search
(`t5x/decoding.py`, `beam_search`), which the paper decoded with: checked by hand on small
trees of next-token probabilities, and against a plain transcription of T5X's loop on random
ones. Where T5X differs from transformers: any of the 2K candidates ending in EOS may finish,
no beam finishes at the length limit (the best running beam answers only when nothing
finished), and the search stops on a bound scored at max_new_tokens + 1."""

import math
import random
import pytest
import torch

import decode

EOS, A, B, C, D = 1, 2, 3, 4, 5
V = 6


class TreeModel:
    """A decoder whose next-token log-probs depend only on (example, prefix): `table` maps a
    prefix (generated tokens, start token excluded) to {token: probability}; prefixes not in
    it get `fallback(example, prefix)`. The prefix is the decoding state, so beam search
    reorders it like real keys and values (decode.py's step/reorder interface)."""

    def __init__(self, table=None, fallback=None):
        self.table, self.fallback = table or {}, fallback

    def log_probs(self, example, prefix):
        if prefix in self.table:
            p = torch.full((V,), 1e-9)
            for token, prob in self.table[prefix].items():
                p[token] = prob
            return p.log()
        return self.fallback(example, prefix)

    def step(self, tokens, state):
        examples, prefixes = state[0], torch.cat([state[1], tokens], 1)
        rows = [
            self.log_probs(int(examples[r]), tuple(prefixes[r, 1:].tolist()))
            for r in range(len(tokens))
        ]
        return torch.stack(rows), (examples, prefixes)

    @staticmethod
    def reorder(state, rows, moved):
        return state[0][rows], state[1][rows]


def search(model, num_beams, max_new_tokens, alpha, length_rule="t5x", examples=1):
    state = (torch.arange(examples), torch.zeros((examples, 0), dtype=torch.long))
    start = torch.zeros(examples, dtype=torch.long)
    out = decode.beam_search(
        model.step,
        model.reorder,
        state,
        start,
        max_new_tokens,
        EOS,
        pad_id=EOS,
        num_beams=num_beams,
        length_penalty=alpha,
        length_rule=length_rule,
    )
    return [row[: row.index(EOS) + 1] if EOS in row else row for row in out.tolist()]


def bp(length, alpha):
    return ((5 + length) / 6) ** alpha  # T5X's brevity_penalty


def test_t5x_lets_a_candidate_ranked_below_k_finish_and_never_finishes_a_beam_at_the_limit():
    # Step 1: a .5, b .3, EOS .15, c .05. EOS ranks 3rd of the 2K = 4 candidates: T5X finishes
    # it, score log .15 / bp(1) = -1.897; transformers only lets the top K = 2 finish.
    # Step 2 (the limit): no EOS among the 4 best (a c .25, a d .24, b c .15, b d .144).
    # transformers finishes the running beams there: a c scores log .25 / 2**0.6 = -0.915 and wins.
    # T5X finishes none: the finished "EOS" answers, although a c would score
    # log .25 / bp(2) = -1.264.
    step2 = {C: 0.5, D: 0.48, EOS: 0.02}
    model = TreeModel({(): {A: 0.5, B: 0.3, EOS: 0.15, C: 0.05}, (A,): step2, (B,): step2})
    assert search(model, 2, 2, 0.6) == [[EOS]]
    assert search(model, 2, 2, 0.6, "transformers") == [[A, C]]
    assert math.log(0.15) / bp(1, 0.6) == pytest.approx(-1.897, abs=1e-3)


def test_t5x_answers_with_the_best_running_beam_when_nothing_finished():
    # No EOS ever ranks among the 2K = 4 best: a, b, c, d at step 1, then a c (.42) beats
    # b c (.315), a d (.18), b d (.035).
    model = TreeModel(
        {(): {A: 0.6, B: 0.35, C: 0.03, D: 0.02}, (A,): {C: 0.7, D: 0.3}, (B,): {C: 0.9, D: 0.1}}
    )
    assert search(model, 2, 2, 0.6) == [[A, C]]


def test_t5x_keeps_searching_while_a_running_beam_could_win_at_the_longest_length():
    # alpha 2, bp(1..5) = 1, 1.361, 1.778, 2.25, 2.778.
    # Step 1: a .55, EOS .4, b .05 -> finished "EOS": log .4 = -0.916.
    # Step 2: a EOS .3025 finishes, log .3025 / 1.361 = -0.878; a c .2475 and b d .03 run on.
    #   transformers' rule (running beam at its current length): log .2475 / 1.361 = -1.026,
    #   below the worst finished (-0.916): stop, answer "a EOS".
    #   T5X's bound (running beam at max_new_tokens + 1 = 4): log .2475 / 2.25 = -0.621: go on.
    # Step 3: a c EOS .245 scores log .245 / 1.778 = -0.791, the best: T5X answers "a c EOS".
    model = TreeModel(
        {
            (): {A: 0.55, EOS: 0.4, B: 0.05},
            (A,): {EOS: 0.55, C: 0.45},
            (B,): {EOS: 0.4, D: 0.6},
            (A, C): {EOS: 0.99, C: 0.01},
            (B, D): {EOS: 0.4, D: 0.6},
        }
    )
    assert search(model, 2, 3, 2.0) == [[A, C, EOS]]
    assert math.log(0.2475) / bp(2, 2.0) < math.log(0.4) < math.log(0.2475) / bp(4, 2.0)
    assert math.log(0.245) / bp(3, 2.0) > math.log(0.3025) / bp(2, 2.0) > math.log(0.4)


def t5x_transcription(log_probs, K, max_len, alpha, neg=-1.0e7):
    """T5X's decoding.beam_search for one example, loop for loop, in plain Python: returns the
    best finished sequence, or the best live one when none finished."""
    live = [((), 0.0)] + [((), neg)] * (K - 1)
    finished = [((), neg, False)] * K
    for cur in range(max_len):
        best_live = max(score for _, score in live) / bp(max_len + 1, alpha)
        if all(flag and min(s for _, s, _ in finished) > best_live for _, _, flag in finished):
            break  # the loop condition: no live beam can beat the worst finished one
        candidates = [
            (score + float(log_probs(seq)[tok]), seq + (tok,))
            for seq, score in live
            for tok in range(V)
        ]
        top = sorted(candidates, key=lambda c: -c[0])[: 2 * K]
        live = sorted([(seq, s) for s, seq in top if seq[-1] != EOS], key=lambda c: -c[1])[:K]
        new = [(seq, s / bp(cur + 1, alpha), True) for s, seq in top if seq[-1] == EOS]
        finished = sorted(finished + new, key=lambda f: -f[1])[:K]
    if any(flag for _, _, flag in finished):
        return list(max((f for f in finished if f[2]), key=lambda f: f[1])[0])
    return list(max(live, key=lambda c: c[1])[0])


@pytest.mark.parametrize(
    "num_beams, max_new_tokens, alpha", [(2, 4, 0.6), (3, 6, 0.6), (4, 5, 0.0), (2, 7, 2.0)]
)
def test_t5x_search_equals_a_transcription_of_t5x_on_random_trees(num_beams, max_new_tokens, alpha):
    def fallback(example, prefix):
        rng = random.Random(hash((example, prefix)))
        logits = torch.tensor([-30.0] + [rng.gauss(0, 1.5) for _ in range(V - 1)])
        logits[EOS] += rng.choice([-2.0, 0.0, 1.0])  # beams end at different lengths
        return logits.log_softmax(-1)

    model, examples = TreeModel(fallback=fallback), 40
    got = search(model, num_beams, max_new_tokens, alpha, examples=examples)
    for example in range(examples):
        want = t5x_transcription(
            lambda seq: fallback(example, seq), num_beams, max_new_tokens, alpha
        )
        assert got[example] == want, example
