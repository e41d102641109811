"""evaluate.generate with length_rule="transformers" equals transformers' generate token for
token (the oracle); by default it decodes as the paper did (beam 4, T5X's rule, alpha 0.6).

The oracle is `AutoModelForSeq2SeqLM.from_pretrained` on the same tiny checkpoint, called
with `early_stopping=False, do_sample=False`; a soft prompt reaches it as
`inputs_embeds=[P; embed(x)]` with the attention mask extended by ones.
"""

import inspect

import pytest
import torch
from safetensors.torch import load_file, save_file

import decode
import evaluate
import model as t5
from helpers import load_oracle, make_checkpoint, random_batch

VOCAB = 96


def checkpoint_that_stops(path, kind="t5v1_1", seed=0):
    """A random checkpoint whose EOS logit is the sum of two tokens' logits, so beams end
    with EOS at different lengths instead of always running to max_new_tokens."""
    make_checkpoint(path, kind=kind, seed=seed, vocab_size=VOCAB)
    state = load_file(str(path / "model.safetensors"))
    head = "shared.weight" if "lm_head.weight" not in state else "lm_head.weight"
    state[head][1] = state[head][5] + state[head][6]
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return t5.load_pretrained(str(path)), load_oracle(str(path))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny matrices: threads only add contention on a shared CPU (50x slower with 2 busy cores).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(one_thread, tmp_path_factory):
    return checkpoint_that_stops(tmp_path_factory.mktemp("ckpt"))


def oracle_generate(oracle, ids, mask, prompt=None, **kwargs):
    kwargs = dict(do_sample=False, early_stopping=False, **kwargs)
    if prompt is None:
        out = oracle.generate(input_ids=ids, attention_mask=mask, **kwargs)
    else:
        prompt = prompt.expand(ids.shape[0], -1, -1) if prompt.dim() == 2 else prompt
        embeds = torch.cat([prompt, oracle.get_input_embeddings()(ids)], 1)
        mask = torch.cat([torch.ones(ids.shape[0], prompt.shape[1], dtype=mask.dtype), mask], 1)
        out = oracle.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
    return out[:, 1:]  # drop the decoder start token


def hf_generate(model_, ids, mask, **kwargs):
    """evaluate.generate under transformers' length rule, asked for by name, with the oracle's
    default alpha (1.0) unless `kwargs` give one."""
    return evaluate.generate(
        model_, ids, mask, **{"length_rule": "transformers", "length_penalty": 1.0, **kwargs}
    )


def inputs(seed, batch=6, src_len=12):
    return random_batch(VOCAB, batch=batch, src_len=src_len, seed=seed)[:2]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_greedy_equals_transformers_on_a_padded_batch(models, seed):
    ours_model, oracle = models
    ids, mask = inputs(seed)
    ours = hf_generate(ours_model, ids, mask, num_beams=1, max_new_tokens=20)
    torch.testing.assert_close(
        ours, oracle_generate(oracle, ids, mask, num_beams=1, max_new_tokens=20), rtol=0, atol=0
    )


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0, -0.5])
@pytest.mark.parametrize("seed", [1, 2])
def test_beam_4_equals_transformers_for_several_length_penalties(models, seed, length_penalty):
    ours_model, oracle = models
    ids, mask = inputs(seed)
    kwargs = dict(num_beams=4, max_new_tokens=20, length_penalty=length_penalty)
    ours = hf_generate(ours_model, ids, mask, **kwargs)
    torch.testing.assert_close(ours, oracle_generate(oracle, ids, mask, **kwargs), rtol=0, atol=0)


def test_the_checkpoint_makes_beams_end_at_different_lengths(models):
    # Guards the other tests: they would prove little if every row ran to max_new_tokens.
    ours_model, _ = models
    out = hf_generate(ours_model, *inputs(1), num_beams=4, max_new_tokens=20)
    lengths = {int((row != 1).sum()) for row in out}
    assert len(lengths) >= 3 and min(lengths) < 20


@pytest.mark.parametrize("num_beams", [1, 4])
def test_generation_with_a_soft_prompt_equals_transformers_with_inputs_embeds(models, num_beams):
    ours_model, oracle = models
    ids, mask = inputs(4)
    prompt = torch.randn(5, ours_model.config.d_model, generator=torch.Generator().manual_seed(0))
    kwargs = dict(num_beams=num_beams, max_new_tokens=16)
    ours = hf_generate(ours_model, ids, mask, prompt=prompt, **kwargs)
    without = hf_generate(ours_model, ids, mask, **kwargs)
    torch.testing.assert_close(
        ours, oracle_generate(oracle, ids, mask, prompt=prompt, **kwargs), rtol=0, atol=0
    )
    assert ours.shape != without.shape or not torch.equal(ours, without)  # the prompt matters


def test_a_different_prompt_per_row_equals_transformers(models):
    # Multi-task ProMoT: every example carries its own task's prompt, (batch, p, d_model).
    ours_model, oracle = models
    ids, mask = inputs(7)
    prompt = torch.randn(
        ids.shape[0], 4, ours_model.config.d_model, generator=torch.Generator().manual_seed(1)
    )
    ours = hf_generate(ours_model, ids, mask, prompt=prompt, num_beams=4, max_new_tokens=12)
    torch.testing.assert_close(
        ours,
        oracle_generate(oracle, ids, mask, prompt=prompt, num_beams=4, max_new_tokens=12),
        rtol=0,
        atol=0,
    )


def test_bfloat16_model_decodes(tmp_path):
    make_checkpoint(tmp_path, kind="mt5", vocab_size=VOCAB)
    ours_model = t5.load_pretrained(str(tmp_path), dtype=torch.bfloat16)
    ids, mask = inputs(1)
    for num_beams in (1, 4):
        out = hf_generate(
            ours_model, ids, mask, prompt=torch.randn(3, 32), num_beams=num_beams, max_new_tokens=6
        )
        assert out.dtype == torch.long and out.shape == (ids.shape[0], 6)


@pytest.mark.parametrize("max_new_tokens", [1, 3])
@pytest.mark.parametrize("num_beams", [1, 2, 4, 5])
def test_max_new_tokens_reached_without_eos_equals_transformers(models, num_beams, max_new_tokens):
    ours_model, oracle = models
    ids, mask = inputs(5)
    ours = hf_generate(ours_model, ids, mask, num_beams=num_beams, max_new_tokens=max_new_tokens)
    assert ours.shape[1] == max_new_tokens
    expected = oracle_generate(
        oracle, ids, mask, num_beams=num_beams, max_new_tokens=max_new_tokens
    )
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["t5", "mt5"])
def test_beam_search_equals_transformers_on_other_architectures(tmp_path, kind):
    ours_model, oracle = checkpoint_that_stops(tmp_path, kind=kind, seed=3)
    ids, mask = inputs(6)
    kwargs = dict(num_beams=4, max_new_tokens=15, length_penalty=0.6)
    ours = hf_generate(ours_model, ids, mask, **kwargs)
    torch.testing.assert_close(ours, oracle_generate(oracle, ids, mask, **kwargs), rtol=0, atol=0)


def test_generate_leaves_a_training_model_in_training_mode(models):
    ours_model, _ = models
    ours_model.train()
    try:
        first = evaluate.generate(ours_model, *inputs(1), num_beams=2, max_new_tokens=5)
        second = evaluate.generate(ours_model, *inputs(1), num_beams=2, max_new_tokens=5)
        assert ours_model.training and torch.equal(first, second)
    finally:
        ours_model.eval()


def test_t5x_brevity_penalty_is_five_plus_length_over_six_to_the_alpha():
    # T5X's decoding.brevity_penalty; transformers' is length ** alpha
    # (tests/test_t5x_decoding.py: the search)
    t5x, hf = decode.brevity_divisor("t5x", 0.6), decode.brevity_divisor("transformers", 0.6)
    assert t5x(1) == 1.0 and t5x(7) == pytest.approx(2**0.6) and hf(7) == pytest.approx(7**0.6)


def decoded_rows(model_, monkeypatch):
    """The batch size of every decode call of `model_`, recorded."""
    rows, decode = [], model_.decode
    monkeypatch.setattr(
        model_, "decode", lambda ids, *a, **k: rows.append(ids.shape[0]) or decode(ids, *a, **k)
    )
    return rows


def test_beam_search_drops_closed_examples_and_still_equals_transformers(models, monkeypatch):
    # Step 1 decodes one row per example (its beams share the start token); then K rows per
    # open example, fewer as examples close. length_penalty 0 lets short answers close early.
    ours_model, oracle = models
    ids, mask = inputs(1)
    kwargs = dict(num_beams=4, max_new_tokens=20, length_penalty=0.0)
    rows = decoded_rows(ours_model, monkeypatch)
    ours = hf_generate(ours_model, ids, mask, **kwargs)
    assert rows[0] == 6 and rows[1] == 6 * 4 and rows[-1] < 6 * 4
    assert all(a >= b for a, b in zip(rows[1:], rows[2:]))
    torch.testing.assert_close(ours, oracle_generate(oracle, ids, mask, **kwargs), rtol=0, atol=0)


def test_greedy_drops_finished_rows_and_still_equals_transformers(models, monkeypatch):
    ours_model, oracle = models
    ids, mask = inputs(2)
    rows = decoded_rows(ours_model, monkeypatch)
    ours = hf_generate(ours_model, ids, mask, num_beams=1, max_new_tokens=20)
    assert rows[0] == 6 and rows[-1] < 6
    torch.testing.assert_close(
        ours, oracle_generate(oracle, ids, mask, num_beams=1, max_new_tokens=20), rtol=0, atol=0
    )


def test_the_library_and_the_command_line_default_to_the_papers_decoding():
    # App. B.4: beam 4; T5X's rule with its alpha 0.6 (issue 22: one default everywhere).
    paper = {"num_beams": 4, "length_penalty": 0.6, "length_rule": "t5x"}
    for function in (evaluate.generate, decode.generate, decode.beam_search):
        defaults = {
            k: p.default for k, p in inspect.signature(function).parameters.items() if k in paper
        }
        assert defaults == paper, function
    settings = evaluate.parse_args(["--model", "m", "--data-dir", "d", "--out", "r.json"])
    assert {k: getattr(settings, k) for k in paper} == paper


def test_score_task_leaves_the_decoding_to_generates_defaults(models, monkeypatch):
    # score_task passes on only what its caller gave, so it decodes as `generate` and the CLI do.
    calls = []
    monkeypatch.setattr(
        evaluate,
        "generate",
        lambda model_, ids, mask, **kw: (
            calls.append(kw) or torch.ones((len(ids), 1), dtype=torch.long)
        ),
    )
    tokenizer = type(
        "T",
        (),
        {
            "encode": lambda self, t: [5, 6, 1],
            "decode": lambda self, ids: "True",
            "sentinel_id": lambda self, n: 95 - n,
        },
    )()
    import data

    examples = [data.Example({"premise": "a", "hypothesis": "b"}, ["True"])]
    evaluate.score_task(models[0], tokenizer, "rte", examples)
    evaluate.score_task(
        models[0], tokenizer, "rte", examples, num_beams=1, length_rule="transformers"
    )
    assert calls == [
        {"prompt": None, "max_new_tokens": 16},
        {"prompt": None, "max_new_tokens": 16, "num_beams": 1, "length_rule": "transformers"},
    ]


def test_the_default_decoding_is_t5x_beam_4_with_alpha_0_6(models):
    ours_model, _ = models
    ids, mask = inputs(3)
    paper = evaluate.generate(
        ours_model, ids, mask, num_beams=4, length_penalty=0.6, length_rule="t5x", max_new_tokens=20
    )
    assert torch.equal(evaluate.generate(ours_model, ids, mask, max_new_tokens=20), paper)
