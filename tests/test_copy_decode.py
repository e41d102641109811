"""decode.py is a copy unit: copied alone into an empty folder, and run by a Python that cannot
see the project, it decodes a model that is not T5 -- a table of bigram logits per example --
through its step interface. Greedy search is checked against following the argmax by hand,
beam search against brute force: with enough beams to keep every prefix, beam search is exact
search, so its answer is the best of all sequences under the length rule asked for by name."""

import os
import shutil
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import itertools
import math

import torch

import decode

PAD, EOS, V = 0, 1, 4  # token 0 starts every sequence and pads; 2 and 3 are words
EXAMPLES, MAX_NEW = 6, 4
torch.manual_seed(0)
table = 2.0 * torch.randn(EXAMPLES, V, V)  # table[example, previous token, next token]
table[:, :, PAD] = -math.inf  # never generated
rows_seen = []


def step(tokens, state):  # state: the example of each row
    rows_seen.append(len(tokens))
    return table[state, tokens[:, 0]], state


def reorder(state, rows, moved):
    return state[rows]


def search(**kw):
    start = torch.full((EXAMPLES,), PAD)
    out = decode.generate(step, reorder, torch.arange(EXAMPLES), start, MAX_NEW, EOS, PAD, **kw)
    return [[t for t in row if t != PAD] for row in out.tolist()]


def logp(example, previous, token):
    row = table[example, previous].tolist()
    finite = [x for x in row if x > -math.inf]
    return row[token] - math.log(sum(math.exp(x) for x in finite))


def total(example, seq):
    return sum(logp(example, prev, tok) for prev, tok in zip((PAD,) + seq, seq))


def by_hand_greedy(example):
    seq = ()
    while len(seq) < MAX_NEW and EOS not in seq:
        previous = seq[-1] if seq else PAD
        seq += (max(range(1, V), key=lambda t: logp(example, previous, t)),)
    return list(seq)


def brute_force(example, rule, alpha):
    divisor = {"t5x": lambda n: ((5 + n) / 6) ** alpha, "transformers": lambda n: n ** alpha}[rule]
    best = None
    for n in range(1, MAX_NEW + 1):
        for seq in itertools.product(range(1, V), repeat=n):
            if EOS in seq[:-1]:
                continue
            # T5X finishes only on EOS; transformers also at the length limit
            if seq[-1] == EOS or (rule == "transformers" and n == MAX_NEW):
                score = total(example, seq) / divisor(n)
                best = max(best or (score, seq), (score, seq))
    return list(best[1])


greedy = search(num_beams=1)
assert greedy == [by_hand_greedy(e) for e in range(EXAMPLES)], greedy
assert rows_seen[0] == EXAMPLES and rows_seen[-1] < EXAMPLES, rows_seen  # finished rows leave

# 24 beams keep every prefix (at most 2**3 running x V = 24 candidates): exact search
answers = {}
for rule, alpha in (("t5x", 0.6), ("transformers", 0.6), ("transformers", 1.0), ("t5x", 2.0)):
    answers[rule, alpha] = search(num_beams=24, length_penalty=alpha, length_rule=rule)
    expected = [brute_force(e, rule, alpha) for e in range(EXAMPLES)]
    assert answers[rule, alpha] == expected, (rule, alpha, answers[rule, alpha], expected)
assert answers["t5x", 0.6] != answers["transformers", 0.6]  # the two rules, reachable by name

# The default is the paper's decoding: beam 4, T5X's rule, alpha 0.6
assert search() == search(num_beams=4, length_penalty=0.6, length_rule="t5x")
try:
    search(length_rule="hf")
except ValueError as err:
    assert "t5x, transformers" in str(err), err
else:
    raise AssertionError("an unknown length rule was accepted")
print("ok")
"""


def test_decode_copied_alone_runs_greedy_and_beam_search_on_a_bigram_table(tmp_path):
    shutil.copy(os.path.join(ROOT, "decode.py"), tmp_path)  # and nothing else of the project
    (tmp_path / "run_me.py").write_text(textwrap.dedent(SCRIPT))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-E", "run_me.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
