"""Specification of data.py: tokenizer (vs transformers' T5Tokenizer as oracle), task
templates (vs the paper's Table 7), readers, prompts, batching and the CLI."""

import random

import pytest
import sentencepiece

import data

# ---------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------

WORDS = ["the", "cat", "sat", "on", "mat", "premise", "question", "hypothesis", "True", "False",
         "answer:", "Translate", "English", "French", "Article:", "summary", "Q:", "A:", "Neither",
         "über", "café", "naïve", "日本語", "hello", "world", "1984", "don't", "(list", "x-y"]


@pytest.fixture(scope="module")
def spiece_dir(tmp_path_factory):
    """A tiny SentencePiece model trained here, with T5's pad=0, eos=1, unk=2 layout."""
    d = tmp_path_factory.mktemp("spiece")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) + rng.choice(["", "s", ",", ".", "?"])
                      for _ in range(rng.randint(3, 15))) for _ in range(1500)]
    (d / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "spiece"), vocab_size=100,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        minloglevel=2)
    return d


@pytest.fixture(scope="module")
def tok(spiece_dir):
    return data.Tokenizer(spiece_dir / "spiece.model")


@pytest.fixture(scope="module")
def oracle(spiece_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.T5Tokenizer.from_pretrained(str(spiece_dir))


ODD_TEXTS = [
    "", " ", "hello world", "  hello   world  ", "\thello\nworld\r\n", "hello\u3000world\u00a0!",
    "hello<extra_id_0>world", "hello <extra_id_0> world", "hello  <extra_id_0>  world",
    "<extra_id_0>", " <extra_id_0> ", "answer: <extra_id_0>", "<extra_id_0> True <extra_id_1>",
    "a<extra_id_0>.", "<extra_id_99>a<extra_id_100>", "<extra_id_10><extra_id_1>0>",
    "<extra_id_0><extra_id_1>", "</s> <pad> <unk> text", "Ωμέγα zz 🙂 hello", "ｈｅｌｌｏ ﬁ",
    "x\u1680y\u2028z\u0085w\x1cv", "soft\u00adhyphen zero\u200bwidth", "a\u00a8b ´", "▁hello ▁ ▁▁",
    "<extra_id_5 > <extra_id_-1> < extra_id_0>",
]


def random_text(rng):
    alphabet = WORDS + ["<extra_id_0>", "<extra_id_1>", "<extra_id_42>", "</s>", "<unk>", "\n", "\t",
                        "  ", "ñ", "Ж", "🙂", "\u3000", "?!", "'", '"', "\u00a0", "0", "ß"]
    return "".join(rng.choice(alphabet) + rng.choice(["", " ", ""]) for _ in range(rng.randint(0, 30)))


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
    ids = [0, tok.sentinel_id(0)] + tok.encode("hello world", add_eos=False) + [tok.sentinel_id(1), 1, 0]
    assert tok.decode(ids) == "hello world"
    assert tok.decode(ids, skip_special_tokens=False) == "<pad><extra_id_0> hello world<extra_id_1></s><pad>"
    assert tok.decode(ids, skip_special_tokens=False) == oracle.decode(ids)


def test_decode_drops_ids_in_the_models_vocabulary_padding(tok):
    # mT5 has 250100 real ids and 250112 embedding rows; a model can emit the extras.
    assert tok.decode(tok.encode("hello", add_eos=False) + [tok.vocab_size + 3]) == "hello"


def test_check_fits_accepts_padded_model_vocab_and_rejects_small_one(tok):
    tok.check_fits(tok.vocab_size)
    tok.check_fits(tok.vocab_size + 12)  # like mT5: 250100 ids <= 250112 rows
    with pytest.raises(data.DataError, match=r"100 pieces \+ 100 sentinels = 200 ids.*vocab_size is 199"):
        tok.check_fits(tok.vocab_size - 1)


def test_tokenizer_on_a_missing_file_raises_data_error(tmp_path):
    with pytest.raises(data.DataError, match="nope.model"):
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
TABLE_7_ROWS = {"rte": "RTE", "cb": "CB & SNLI", "snli": "CB & SNLI", "wic": "WiC",
                "openbookqa": "OpenbookQA", "trivia_qa": "QA", "web_questions": "QA",
                "xsum": "Summarization", "wiki_lingua_en": "Summarization"}
PLACEHOLDERS = {"option_a": "[option A]", "option_b": "[option B]", "option_c": "[option C]",
                "option_d": "[option D]", "sentence": "[sentence 1]"}


def table_7_form(task, **extra):
    text = task.template.format(**{f: PLACEHOLDERS.get(f, f"[{f}]") for f in task.fields()}, **extra)
    if task.label_words and task.name != "openbookqa":  # Table 7 lists the answer set after the template
        text += " {" + ", ".join(task.label_words) + "}"
    return text


@pytest.mark.parametrize("name", sorted(TABLE_7_ROWS))
def test_template_is_table_7(name):
    assert table_7_form(data.TASKS[name]) == TABLE_7[TABLE_7_ROWS[name]]


def test_translation_template_is_table_7_with_languages():
    generic = data.TEMPLATE_TRANSLATION.format(source_language="[source language]",
                                               target_language="[target language]", sentence="[sentence 1]")
    assert generic == TABLE_7["Translation"]
    for name, language in [("wmt14_enfr", "French"), ("wmt16_ende", "German"), ("wmt16_enro", "Romanian")]:
        assert table_7_form(data.TASKS[name]) == f"Translate English to {language}: [sentence 1]"


def test_paper_tasks_metrics_and_splits():
    # §5.1: accuracy / exact match / BLEU / ROUGE-2; SuperGLUE scored on dev, the rest on test.
    expected = {"rte": "accuracy", "cb": "accuracy", "wic": "accuracy", "snli": "accuracy",
                "openbookqa": "accuracy", "trivia_qa": "exact_match", "web_questions": "exact_match",
                "wmt14_enfr": "bleu", "wmt16_ende": "bleu", "wmt16_enro": "bleu",
                "xsum": "rouge2", "wiki_lingua_en": "rouge2"}
    assert {n: data.TASKS[n].metric for n in expected} == expected
    assert set(data.FINE_TUNING_TASKS) | set(data.EVALUATION_TASKS) == set(expected)
    for name in expected:
        assert data.TASKS[name].eval_split == ("validation" if name in ("rte", "cb", "wic") else "test")


def test_prefix_tokens_are_app_b2s():
    assert {data.TASKS[n].prefix for n in ("trivia_qa", "web_questions", "openbookqa")} == {"Q:"}
    assert {data.TASKS[n].prefix for n in ("wmt14_enfr", "wmt16_ende", "wmt16_enro")} == {"Translate"}
    assert {data.TASKS[n].prefix for n in ("xsum", "wiki_lingua_en")} == {"Article:"}


def test_summarization_inputs_are_cut_at_1024_tokens_by_default():
    assert data.TASKS["xsum"].max_input_tokens == data.TASKS["wiki_lingua_en"].max_input_tokens == 1024


def test_table_8_sizes_are_recorded_for_check():
    assert data.TASKS["rte"].paper_sizes == {"train": 2490, "validation": 277, "test": 3000}
    assert data.TASKS["web_questions"].paper_sizes == {"train": 3778, "test": 2032}


def test_unknown_task_lists_known_ones():
    with pytest.raises(data.DataError, match=r"unknown task 'rtee'; known tasks: cb, .*rte.*xsum"):
        data.get_task("rtee")
