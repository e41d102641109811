"""Specification of data.py: tokenizer (vs transformers' T5Tokenizer as oracle), task
templates (vs the paper's Table 7), readers, prompts, batching and the CLI."""

import json
import random

import pytest

import checks
import data
from helpers import train_spiece
from support.errors import BadInput

# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

WORDS = [
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    "premise",
    "question",
    "hypothesis",
    "True",
    "False",
    "answer:",
    "Translate",
    "English",
    "French",
    "Article:",
    "summary",
    "Q:",
    "A:",
    "Neither",
    "über",
    "café",
    "naïve",
    "日本語",
    "hello",
    "world",
    "1984",
    "don't",
    "(list",
    "x-y",
]


@pytest.fixture(scope="module")
def spiece_dir(tmp_path_factory):
    """A tiny SentencePiece model trained here, with T5's pad=0, eos=1, unk=2 layout."""
    d = tmp_path_factory.mktemp("spiece")
    rng = random.Random(0)
    lines = [
        " ".join(
            rng.choice(WORDS) + rng.choice(["", "s", ",", ".", "?"])
            for _ in range(rng.randint(3, 15))
        )
        for _ in range(1500)
    ]
    train_spiece(d, lines, 100, character_coverage=1.0)
    return d


@pytest.fixture(scope="module")
def tok(spiece_dir):
    return data.Tokenizer(spiece_dir / "spiece.model")


@pytest.fixture(scope="module")
def oracle(spiece_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.T5Tokenizer.from_pretrained(str(spiece_dir))


ODD_TEXTS = [
    "",
    " ",
    "hello world",
    "  hello   world  ",
    "\thello\nworld\r\n",
    "hello\u3000world\u00a0!",
    "hello<extra_id_0>world",
    "hello <extra_id_0> world",
    "hello  <extra_id_0>  world",
    "<extra_id_0>",
    " <extra_id_0> ",
    "answer: <extra_id_0>",
    "<extra_id_0> True <extra_id_1>",
    "a<extra_id_0>.",
    "<extra_id_99>a<extra_id_100>",
    "<extra_id_10><extra_id_1>0>",
    "<extra_id_0><extra_id_1>",
    "</s> <pad> <unk> text",
    "Ωμέγα zz 🙂 hello",
    "ｈｅｌｌｏ ﬁ",
    "x\u1680y\u2028z\u0085w\x1cv",
    "soft\u00adhyphen zero\u200bwidth",
    "a\u00a8b ´",
    "▁hello ▁ ▁▁",
    "<extra_id_5 > <extra_id_-1> < extra_id_0>",
]


def random_text(rng):
    alphabet = WORDS + [
        "<extra_id_0>",
        "<extra_id_1>",
        "<extra_id_42>",
        "</s>",
        "<unk>",
        "\n",
        "\t",
        "  ",
        "ñ",
        "Ж",
        "🙂",
        "\u3000",
        "?!",
        "'",
        '"',
        "\u00a0",
        "0",
        "ß",
    ]
    return "".join(
        rng.choice(alphabet) + rng.choice(["", " ", ""]) for _ in range(rng.randint(0, 30))
    )


def test_sentinel_ids_count_down_from_the_top_of_the_vocabulary(tok, oracle):
    assert tok.piece_count == 100 and tok.vocab_size == 200 == len(oracle)
    assert tok.sentinel_id(0) == 199 == oracle.convert_tokens_to_ids("<extra_id_0>")
    assert tok.sentinel_id(99) == 100 == oracle.convert_tokens_to_ids("<extra_id_99>")
    with pytest.raises(ValueError):
        tok.sentinel_id(100)


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_encode_equals_transformers_on_odd_text(tok, oracle, text):
    assert tok.encode(text) == oracle(text)["input_ids"]


def test_encode_equals_transformers_on_random_text(tok, oracle):
    rng = random.Random(1)
    for _ in range(300):
        text = random_text(rng)
        assert tok.encode(text) == oracle(text)["input_ids"], repr(text)


UNICODE_CHARS = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"()-–—éèüößçñ"
    "日本語中文한국어Ωμέγαабв  \t\n\u00a0\u3000\u200b\u00ad¨´ﬁ①㎏Ⅷ½…™℃"
)


@pytest.mark.parametrize("normalization", ["nmt_nfkc", "identity"])
def test_encode_and_decode_equal_transformers_on_random_unicode(tmp_path, normalization):
    # A second model, trained on random multilingual text, with T5's normalization
    # (nmt_nfkc) and with none: compatibility characters, zero-width and soft
    # hyphen characters, every kind of whitespace and sentinels in between.
    transformers = pytest.importorskip("transformers")
    rng = random.Random(normalization)

    def text(n):
        return "".join(rng.choice(UNICODE_CHARS) for _ in range(n))

    corpus = [
        " ".join(text(rng.randint(1, 8)).replace("\n", " ") for _ in range(rng.randint(2, 12)))
        for _ in range(1500)
    ]
    train_spiece(
        tmp_path, corpus, 300, character_coverage=0.98, normalization_rule_name=normalization
    )
    ours = data.Tokenizer(tmp_path / "spiece.model")
    oracle = transformers.T5Tokenizer.from_pretrained(str(tmp_path))
    for _ in range(300):
        s = text(rng.randint(0, 60))
        if rng.random() < 0.3:
            s = s.replace(" ", f" <extra_id_{rng.randint(0, 120)}> ", 1)
        ids = oracle(s)["input_ids"]
        assert ours.encode(s) == ids, repr(s)
        assert ours.decode(ids) == oracle.decode(ids, skip_special_tokens=True), repr(s)


def test_encode_appends_eos_like_t5(tok):
    assert tok.encode("hello")[-1] == 1
    assert tok.encode("hello", add_eos=False)[-1] != 1
    assert tok.encode("") == [1]


def test_decode_equals_transformers(tok, oracle):
    rng = random.Random(2)
    texts = ODD_TEXTS + [random_text(rng) for _ in range(200)]
    for text in texts:
        ids = oracle(text)["input_ids"]
        assert tok.decode(ids) == oracle.decode(ids, skip_special_tokens=True), repr(text)
        assert tok.decode(ids, skip_special_tokens=False) == oracle.decode(ids), repr(text)


def test_decode_drops_pad_eos_and_sentinels(tok, oracle):
    # What a decoder emits: start token (pad), <extra_id_0>, the answer, <extra_id_1>, EOS.
    ids = (
        [0, tok.sentinel_id(0)]
        + tok.encode("hello world", add_eos=False)
        + [tok.sentinel_id(1), 1, 0]
    )
    assert tok.decode(ids) == "hello world"
    assert (
        tok.decode(ids, skip_special_tokens=False)
        == "<pad><extra_id_0> hello world<extra_id_1></s><pad>"
    )
    assert tok.decode(ids, skip_special_tokens=False) == oracle.decode(ids)


def test_decode_drops_ids_in_the_models_vocabulary_padding(tok):
    # mT5 has 250100 real ids and 250112 embedding rows; a model can emit the extras.
    assert tok.decode(tok.encode("hello", add_eos=False) + [tok.vocab_size + 3]) == "hello"


def test_check_fits_accepts_padded_model_vocab_and_rejects_small_one(tok):
    checks.check_tokenizer_fits(tok, tok.vocab_size)
    checks.check_tokenizer_fits(tok, tok.vocab_size + 12)  # like mT5: 250100 ids <= 250112 rows
    with pytest.raises(BadInput, match=r"100 pieces \+ 100 sentinels = 200 ids.*vocab_size is 199"):
        checks.check_tokenizer_fits(tok, tok.vocab_size - 1)


def test_check_fits_warns_only_when_the_tokenizer_reaches_under_90_percent_of_the_rows(tok, capsys):
    checks.check_tokenizer_fits(tok, 222)  # 200 ids of 222 rows: 90.1%, like T5's 32,100 of 32,128
    assert capsys.readouterr().err == ""
    checks.check_tokenizer_fits(tok, 32128)  # the issue's 315-piece spiece.model beside T5's table
    err = capsys.readouterr().err
    assert err.startswith("warning: tokenizer ") and "200 ids for the model's 32128 " in err


def test_tokenizer_on_a_missing_file_is_a_bad_input(tmp_path):
    with pytest.raises(BadInput, match="nope.model"):
        data.Tokenizer(tmp_path / "nope.model")


# ---------------------------------------------------------------------------
# Tasks: templates are the paper's Table 7, character for character
# ---------------------------------------------------------------------------

# Copied from the paper's Table 7 (App. B.1); the WiC row is wrapped over two lines
# in the PDF and joined here with one space.
TABLE_7 = {
    "RTE": "[premise] question: [hypothesis] Is it true or false? answer: {True, False}",
    "CB & SNLI": "[premise] question: [hypothesis] Is it true or false or neither? answer: "
    "{True, False, Neither}",
    "WiC": "[sentence1] [sentence2] question: The word [word] is used in the same way in the two "
    "sentences. Is it true or False? answer: {True, False}",
    "OpenbookQA": "Q: [question] A) [option A] B) [option B] C) [option C] D) [option D] A:",
    "QA": "Q: [question] A:",
    "Translation": "Translate [source language] to [target language]: [sentence 1]",
    "Summarization": "Article: [article] One sentence summary:",
}
TABLE_7_ROWS = {
    "rte": "RTE",
    "cb": "CB & SNLI",
    "snli": "CB & SNLI",
    "wic": "WiC",
    "openbookqa": "OpenbookQA",
    "trivia_qa": "QA",
    "web_questions": "QA",
    "xsum": "Summarization",
    "wiki_lingua_en": "Summarization",
}
PLACEHOLDERS = {
    "option_a": "[option A]",
    "option_b": "[option B]",
    "option_c": "[option C]",
    "option_d": "[option D]",
    "sentence": "[sentence 1]",
}


def table_7_form(task, **extra):
    text = task.template.format(
        **{f: PLACEHOLDERS.get(f, f"[{f}]") for f in task.fields()}, **extra
    )
    if (
        task.label_words and task.name != "openbookqa"
    ):  # Table 7 lists the answer set after the template
        text += " {" + ", ".join(task.label_words) + "}"
    return text


@pytest.mark.parametrize("name", sorted(TABLE_7_ROWS))
def test_template_is_table_7(name):
    assert table_7_form(data.TASKS[name]) == TABLE_7[TABLE_7_ROWS[name]]


def test_translation_template_is_table_7_with_languages():
    generic = data.TEMPLATE_TRANSLATION.format(
        source_language="[source language]",
        target_language="[target language]",
        sentence="[sentence 1]",
    )
    assert generic == TABLE_7["Translation"]
    for name, language in [
        ("wmt14_enfr", "French"),
        ("wmt16_ende", "German"),
        ("wmt16_enro", "Romanian"),
    ]:
        assert table_7_form(data.TASKS[name]) == f"Translate English to {language}: [sentence 1]"


def test_paper_tasks_metrics_and_splits():
    # §5.1: accuracy / exact match / BLEU / ROUGE-2; SuperGLUE scored on dev, the rest on test.
    expected = {
        "rte": "accuracy",
        "cb": "accuracy",
        "wic": "accuracy",
        "snli": "accuracy",
        "openbookqa": "accuracy",
        "trivia_qa": "exact_match",
        "web_questions": "exact_match",
        "wmt14_enfr": "bleu",
        "wmt16_ende": "bleu",
        "wmt16_enro": "bleu",
        "xsum": "rouge2",
        "wiki_lingua_en": "rouge2",
    }
    assert {n: data.TASKS[n].metric for n in expected} == expected
    assert set(data.FINE_TUNING_TASKS) | set(data.EVALUATION_TASKS) == set(expected)
    for name in expected:
        assert data.TASKS[name].eval_split == (
            "validation" if name in ("rte", "cb", "wic") else "test"
        )


def test_prefix_tokens_are_app_b2s():
    assert {data.TASKS[n].prefix for n in ("trivia_qa", "web_questions", "openbookqa")} == {"Q:"}
    assert {data.TASKS[n].prefix for n in ("wmt14_enfr", "wmt16_ende", "wmt16_enro")} == {
        "Translate"
    }
    assert {data.TASKS[n].prefix for n in ("xsum", "wiki_lingua_en")} == {"Article:"}


def test_summarization_inputs_are_cut_at_1024_tokens_by_default():
    assert (
        data.TASKS["xsum"].max_input_tokens == data.TASKS["wiki_lingua_en"].max_input_tokens == 1024
    )


def test_table_8_sizes_are_recorded_for_check():
    assert data.TASKS["rte"].paper_sizes == {"train": 2490, "validation": 277, "test": 3000}
    assert data.TASKS["web_questions"].paper_sizes == {"train": 3778, "test": 2032}


def test_unknown_task_lists_known_ones():
    with pytest.raises(BadInput, match=r"unknown task 'rtee'; known tasks: cb, .*rte.*xsum"):
        data.get_task("rtee")


def test_a_misspelt_paper_task_gets_the_closest_name():
    with pytest.raises(BadInput, match=r"; did you mean 'trivia_qa'\?$"):
        data.get_task("trivia_q")


# ---------------------------------------------------------------------------
# Prompts: k-shot, the sentinel rule, truncation, label shuffling, +1-shot
# ---------------------------------------------------------------------------

RTE = data.TASKS["rte"]


def rte_examples(n, prefix="p"):
    return [
        data.Example(
            {"premise": f"{prefix}{i} the cat sat.", "hypothesis": f"h{i}"},
            ["True" if i % 3 else "False"],
        )
        for i in range(n)
    ]


def test_zero_shot_input_and_target_follow_the_sentinel_rule():
    example = rte_examples(1)[0]
    assert data.make_input(RTE, example) == (
        "p0 the cat sat. question: h0 Is it true or false? answer: <extra_id_0>"
    )
    assert data.make_target(RTE, example) == "<extra_id_0> False <extra_id_1>"


def test_sentinel_rule_tokenizes_like_t5_span_corruption(tok):
    # Input ends "... <extra_id_0> </s>"; target is "<extra_id_0> answer <extra_id_1> </s>".
    example = rte_examples(2)[1]
    assert tok.encode(data.make_input(RTE, example))[-2:] == [tok.sentinel_id(0), 1]
    target = tok.encode(data.make_target(RTE, example))
    assert target == [tok.sentinel_id(0)] + tok.encode("True", add_eos=False) + [
        tok.sentinel_id(1),
        1,
    ]


def test_demonstrations_carry_their_answer_and_only_the_query_the_sentinel():
    demos, query = rte_examples(3)[:2], rte_examples(3)[2]
    assert data.make_input(RTE, query, demos) == (
        "p0 the cat sat. question: h0 Is it true or false? answer: False "
        "p1 the cat sat. question: h1 Is it true or false? answer: True "
        "p2 the cat sat. question: h2 Is it true or false? answer: <extra_id_0>"
    )


@pytest.mark.parametrize("shots", [0, 1, 4])
def test_kshot_is_deterministic_per_seed_and_never_shows_the_query(shots):
    pool = rte_examples(12)
    queries = pool[
        :6
    ]  # evaluating on the pool itself: the query must still never be a demonstration
    first = data.kshot_inputs(RTE, queries, pool, shots, seed=3)
    assert first == data.kshot_inputs(RTE, queries, pool, shots, seed=3)
    for (text, references), query in zip(first, queries):
        assert references == query.targets
        assert text.count("Is it true or false?") == shots + 1
        assert text.count(query.fields["premise"]) == 1 and text.endswith(
            data.make_input(RTE, query)
        )
    if shots:
        assert first != data.kshot_inputs(RTE, queries, pool, shots, seed=4)


def test_kshot_demonstrations_do_not_depend_on_the_other_queries():
    pool = rte_examples(30)
    queries = rte_examples(5, prefix="q")
    alone = data.kshot_inputs(RTE, queries[3:4], pool, 4, seed=0)
    assert data.kshot_inputs(RTE, queries, pool, 4, seed=0)[3] == alone[0]


def test_kshot_with_a_tiny_pool_is_a_clear_error():
    pool = rte_examples(3)
    with pytest.raises(
        BadInput,
        match="task rte, split train: 4-shot inputs need 4 demonstrations but the "
        "demonstration pool has 3 examples",
    ):
        data.kshot_inputs(RTE, pool[:1], pool, 4, seed=0)
    with pytest.raises(BadInput, match="task rte, split train: need 3 demonstrations but the pool"):
        data.kshot_inputs(
            RTE, pool[:1], pool, 3, seed=0
        )  # the query itself is never its demonstration
    with pytest.raises(
        BadInput,
        match="^task rte, split train: need 1 demonstration but the pool has only 0 labeled "
        "examples other than the query$",
    ):
        data.kshot_inputs(RTE, pool[:1], pool[:1], 1, seed=0)


def test_plus_one_shot_training_pairs_prefix_one_demonstration():
    examples = rte_examples(8)
    pairs = data.training_pairs(RTE, examples, shots=1, seed=0)
    for (text, target), example in zip(pairs, examples):
        assert text.count("answer:") == 2 and text.endswith(data.make_input(RTE, example))
        assert text.count(example.fields["premise"]) == 1
        assert target == data.make_target(RTE, example)
    assert [x for x, _ in data.training_pairs(RTE, examples)] == [
        data.make_input(RTE, e) for e in examples
    ]


def test_plus_one_shot_draws_a_fresh_demonstration_each_time_an_example_is_seen():
    """Paper §5.3's "+1-shot": over epochs an example meets different demonstrations (not the
    same one every epoch), never itself, and the same ones again on a rerun or a resume."""
    examples = rte_examples(12)

    def epochs(mixture, n):
        rows = [
            data.rank_batch(mixture, [RTE], [examples], 4, shots=1, seed=0) for _ in range(3 * n)
        ]
        return [text for batch in rows for _, text, _ in batch]

    seen = epochs(data.Mixture({"rte": examples}, seed=0), 3)
    by_query = {}
    for text in seen:
        query = next(e for e in examples if text.endswith(data.make_input(RTE, e)))
        assert text.count(query.fields["premise"]) == 1  # never its own demonstration
        by_query.setdefault(query.fields["premise"], set()).add(text)
    assert (
        sum(len(texts) > 1 for texts in by_query.values()) >= 6
    )  # most examples saw another demonstration
    assert epochs(data.Mixture({"rte": examples}, seed=0), 3) == seen  # seeded
    resumed = data.Mixture({"rte": examples}, seed=0)
    first = [
        text
        for _ in range(4)
        for _, text, _ in data.rank_batch(resumed, [RTE], [examples], 4, shots=1, seed=0)
    ]
    again = data.Mixture({"rte": examples}, seed=0)
    again.load_state_dict(resumed.state_dict())
    rest = [
        text
        for _ in range(5)
        for _, text, _ in data.rank_batch(again, [RTE], [examples], 4, shots=1, seed=0)
    ]
    assert first + rest == seen


def test_shuffled_labels_keep_the_multiset_and_the_inputs():
    examples = rte_examples(60)
    shuffled = data.shuffle_labels(examples, seed=0)
    assert sorted(t for e in shuffled for t in e.targets) == sorted(
        t for e in examples for t in e.targets
    )
    assert [e.fields for e in shuffled] == [e.fields for e in examples]
    assert [e.targets for e in shuffled] != [e.targets for e in examples]
    assert (
        shuffled == data.shuffle_labels(examples, seed=0) != data.shuffle_labels(examples, seed=1)
    )


XSUM = data.TASKS["xsum"]


ARTICLE_WORDS = [w for w in WORDS if not w.endswith(":")]


def article(n_words, start=0):
    return " ".join(ARTICLE_WORDS[(start + i) % len(ARTICLE_WORDS)] for i in range(n_words))


def test_summarization_defaults_to_1024_tokens_and_short_inputs_are_untouched(tok):
    query = data.Example({"article": article(50)}, ["summary"])
    stats, warnings = data.TruncationStats(), []
    [(text, _)] = data.kshot_inputs(
        XSUM,
        [query],
        [query, data.Example({"article": "x"}, ["y"])],
        1,
        seed=0,
        tokenizer=tok,
        stats=stats,
        warn=warnings.append,
    )
    assert text == data.make_input(XSUM, query, [data.Example({"article": "x"}, ["y"])])
    assert stats.inputs == 1 and warnings == []
    long_query = data.Example({"article": article(3000)}, ["summary"])
    [(text, _)] = data.kshot_inputs(
        XSUM, [long_query], [query], 0, tokenizer=tok, warn=warnings.append
    )
    assert len(tok.encode(text)) <= 1024 and len(warnings) == 1


def test_fair_truncation_with_a_budget_below_the_template_is_an_error(tok):
    query = data.Example({"article": article(10)}, ["s"])
    fit = dict(tokenizer=tok, max_input_tokens=3, truncation="fair")
    with pytest.raises(BadInput, match="too small for the template"):
        data.kshot_inputs(XSUM, [query], [], 0, **fit)


# ---------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------


def test_pad_batch_pads_right_to_the_longest():
    ids, mask = data.pad_batch([[5, 6, 1], [7, 1]])
    assert ids.tolist() == [[5, 6, 1], [7, 1, 0]] and mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    labels, _ = data.pad_batch([[5, 1], [1]], pad_id=-100)
    assert labels.tolist() == [[5, 1], [1, -100]] and labels.dtype == data.torch.long


def test_encode_batch_encodes_inputs_and_labels(tok):
    pairs = data.training_pairs(RTE, rte_examples(3))
    batch = data.encode_batch(tok, pairs, tasks=["rte"] * 3)
    assert batch["input_ids"][0, : batch["attention_mask"][0].sum()].tolist() == tok.encode(
        pairs[0][0]
    )
    assert batch["labels"][1].tolist() == tok.encode(pairs[1][1])
    assert batch["tasks"] == ["rte"] * 3


def test_encode_batch_cuts_to_the_max_keeping_the_final_eos(tok):
    # seqio's append_eos_after_trim: ids[:max - 1] + [EOS]
    long_input, long_target = " ".join(["word"] * 20), " ".join(["answer"] * 10)
    batch = data.encode_batch(
        tok,
        [(long_input, long_target), ("a", "b")],
        max_input_tokens=8,
        max_target_tokens=5,
        device="cpu",
    )
    assert batch["input_ids"][0].tolist() == tok.encode(long_input)[:7] + [data.EOS_ID]
    assert batch["labels"][0].tolist() == tok.encode(long_target)[:4] + [data.EOS_ID]
    assert batch["input_ids"].shape == (2, 8) and batch["labels"].shape == (2, 5)
    assert batch["labels"][1, : len(tok.encode("b"))].tolist() == tok.encode(
        "b"
    )  # short rows are not cut
    assert "tasks" not in batch and batch["input_ids"].device.type == "cpu"


def test_eval_batches_sort_by_length_and_cover_every_index_once():
    lengths = [5, 50, 7, 49, 6, 48, 8]
    batches = data.eval_batches(lengths, batch_size=3)
    assert batches == [[1, 3, 5], [6, 2, 4], [0]]
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))


def test_mixture_proportions_follow_the_rates():
    mix = data.Mixture(
        {"a": list(range(10)), "b": list(range(1000))}, rates={"a": 1.0, "b": 3.0}, seed=0
    )
    names = [name for name, _ in mix.take(8000)]
    assert abs(names.count("a") / 8000 - 0.25) < 0.02
    equal = [n for n, _ in data.Mixture({"a": [1], "b": [2], "c": [3]}, seed=1).take(6000)]
    assert all(abs(equal.count(k) / 6000 - 1 / 3) < 0.03 for k in "abc")


def test_mixture_visits_every_item_once_per_epoch_and_tags_the_task():
    mix = data.Mixture({"rte": list(range(7))}, seed=5)
    first, second = mix.take(7), mix.take(7)
    assert all(name == "rte" for name, _ in first + second)
    assert sorted(x for _, x in first) == sorted(x for _, x in second) == list(range(7))
    assert [x for _, x in first] != [x for _, x in second]  # a new order each epoch


def test_mixture_is_deterministic_and_resumes_exactly():
    datasets = {"rte": list(range(13)), "wmt14_enfr": list(range(100, 131))}
    whole = data.Mixture(datasets, seed=7).take(100)
    assert (
        whole
        == data.Mixture(datasets, seed=7).take(100)
        != data.Mixture(datasets, seed=8).take(100)
    )
    mix = data.Mixture(datasets, seed=7)
    head = mix.take(37)
    state = json.loads(json.dumps(mix.state_dict()))  # survives a checkpoint file
    resumed = data.Mixture(datasets, seed=7)
    resumed.load_state_dict(state)
    assert head + resumed.take(63) == whole
    with pytest.raises(BadInput, match="seed 7"):
        data.Mixture(datasets, seed=9).load_state_dict(state)


def test_mixture_rejects_rates_for_other_tasks_and_empty_tasks():
    with pytest.raises(BadInput, match="rate to each of"):
        data.Mixture({"a": [1], "b": [2]}, rates={"a": 1.0})
    with pytest.raises(BadInput, match="every task at least one example"):
        data.Mixture({"a": []})
