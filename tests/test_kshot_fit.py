"""k-shot inputs under the token budget (data.fit_input), counted with a real SentencePiece
model trained here: by default the paper's cut, T5X/seqio's first N-1 ids plus EOS (App. B.4,
"we cut each input to 1024 tokens"); with "fair" (ours) every demonstration keeps its template
and answer and only the long texts are cut, each to a fair share."""

import json
import random

import pytest

import data
from helpers import train_spiece
from support.errors import BadInput

XSUM, RTE = data.TASKS["xsum"], data.TASKS["rte"]
FAIR = "fair"  # our cut (--truncation fair); the default is the paper's "end"
VOCABULARY = (
    "the of and to in a is that for it was on with as he be at by this had not are but from or have "
    "an they which one you were her all she there would their we him been has when who will more no "
    "if out so said what up its about into than them can only other new some could time these two may "
    "then do first any my now such like our over man me even most made after also did many before "
    "must through back years where much your way well down should because each just those people "
    "storm coast power village council police minister government hospital school football club"
).split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A unigram SentencePiece model with T5's pad 0, EOS 1, unk 2, trained on English-like text."""
    d = tmp_path_factory.mktemp("spiece")
    rng = random.Random(0)
    lines = [
        " ".join(
            rng.choice(VOCABULARY) + rng.choice(["", "", "s", ",", "."])
            for _ in range(rng.randint(5, 25))
        )
        for _ in range(3000)
    ]
    train_spiece(d, lines, 250, character_coverage=1.0)
    return data.Tokenizer(d / "spiece.model")


def text(n_words, seed):
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCABULARY) + rng.choice(["", "s", ","]) for _ in range(n_words))


def article(n_words, seed, summary=None):
    return data.Example({"article": text(n_words, seed)}, [summary or f"summary number {seed}"])


def articles_in(input_text, shots):
    """The article of each demonstration and of the query, and each demonstration's summary."""
    parts = input_text.split("Article: ")[1:]
    assert len(parts) == shots + 1
    bodies = [p.split(" One sentence summary:")[0] for p in parts]
    summaries = [p.split(" One sentence summary: ")[1].strip() for p in parts[:-1]]
    return bodies, summaries


@pytest.mark.parametrize("shots", [1, 4])
def test_kshot_summaries_keep_every_demonstration_and_its_summary_under_1024_tokens(tok, shots):
    pool = [article(700, seed) for seed in range(1, 9)]
    query = article(700, 100)
    stats = data.TruncationStats()
    [(fitted, _)] = data.kshot_inputs(
        XSUM, [query], pool, shots, tokenizer=tok, stats=stats, warn=lambda m: None, truncation=FAIR
    )
    demos = data.choose_demonstrations(query, pool, shots, 0)
    full = tok.encode(data.make_input(XSUM, query, demos))
    assert (
        len(full) > (shots + 1) * 900
    )  # 700 words are ~1,000 tokens: the old rule dropped every demonstration
    ids = tok.encode(fitted)
    assert len(ids) <= 1024
    bodies, summaries = articles_in(fitted, shots)
    assert summaries == [d.targets[0] for d in demos]  # every demonstration keeps its summary
    assert fitted.endswith(" One sentence summary: <extra_id_0>")  # and the query its template
    for body, example in zip(bodies, demos + [query]):
        assert example.fields["article"].startswith(body) and len(body) < len(
            example.fields["article"]
        )
    # A fair share: every article is cut to the same number of tokens, up to one word.
    lengths = [len(tok.encode(body, add_eos=False)) for body in bodies]
    longest_word = max(len(tok.encode(w, add_eos=False)) for w in VOCABULARY) + 1
    assert max(lengths) - min(lengths) <= longest_word
    assert len(ids) > 1024 - (shots + 1) * longest_word  # and the budget is used
    assert (stats.inputs, stats.trimmed, stats.tokens_removed) == (1, 1, len(full) - len(ids))


def test_a_short_demonstration_stays_whole_and_the_long_ones_share_the_rest(tok):
    short, long_ = article(15, 1, "short one"), article(900, 2, "long one")
    query = article(900, 3)
    fitted = data.fit_input(XSUM, query, [short, long_], tok, 400, truncation=FAIR)
    bodies, summaries = articles_in(fitted, 2)
    assert bodies[0] == short.fields["article"] and summaries == ["short one", "long one"]
    share = [len(tok.encode(b, add_eos=False)) for b in bodies[1:]]
    assert abs(share[0] - share[1]) <= 4 and len(tok.encode(fitted)) <= 400


def test_inputs_that_fit_are_untouched(tok):
    query, demos = article(30, 1), [article(30, 2)]
    stats = data.TruncationStats()
    for truncation in data.TRUNCATIONS:
        fitted = data.fit_input(XSUM, query, demos, tok, 1024, stats, truncation)
        assert fitted == data.make_input(XSUM, query, demos)
    assert (stats.inputs, stats.trimmed, stats.tokens_removed) == (2, 0, 0)


def test_by_default_the_cut_is_t5x_seqio_first_n_minus_1_ids_plus_eos(tok):
    pool = [article(700, seed) for seed in range(1, 9)]
    query = article(700, 100)
    stats = data.TruncationStats()
    [(cut, _)] = data.kshot_inputs(
        XSUM, [query], pool, 4, tokenizer=tok, stats=stats, warn=lambda m: None
    )  # no truncation given: the paper's
    full_text = data.make_input(XSUM, query, data.choose_demonstrations(query, pool, 4, 0))
    full = tok.encode(full_text)
    assert data.cut_ids(tok.encode(cut), 1024) == full[:1023] + [data.EOS_ID]
    assert full_text.startswith(cut)
    # What it does to a 4-shot XSum input: the first demonstrations fill the budget, the query is gone.
    assert cut.count("Article:") < 5 and "<extra_id_0>" not in cut
    assert (stats.trimmed, stats.tokens_removed) == (1, len(full) - 1024)


def test_a_huge_demonstration_cannot_make_an_rte_input_unbounded(tok):
    def rte(premise, label):
        return data.Example({"premise": premise, "hypothesis": text(8, 7)}, [label])

    huge = rte(text(20000, 5), "True")  # ~100k characters
    assert len(huge.fields["premise"]) > 100_000
    pool = [huge, rte(text(20, 1), "False"), rte(text(20, 2), "True"), rte(text(20, 3), "False")]
    [(fitted, _)] = data.kshot_inputs(
        RTE,
        [rte(text(20, 9), "True")],
        pool,
        4,
        tokenizer=tok,
        warn=lambda m: None,
        truncation=FAIR,
    )  # no bound given: data.MAX_INPUT_TOKENS
    assert len(tok.encode(fitted)) <= data.MAX_INPUT_TOKENS == 1024
    assert fitted.count("Is it true or false? answer:") == 5  # four demonstrations and the query
    for demo in pool[1:]:
        assert data.make_demonstration(RTE, demo) in fitted  # the short ones are whole
    assert fitted.endswith(data.make_input(RTE, rte(text(20, 9), "True")))


def test_a_100k_character_query_is_cut_to_the_budget_of_every_task(tok):
    query = data.Example({"question": text(20000, 11)}, ["Paris"])
    for truncation in data.TRUNCATIONS:
        [(fitted, _)] = data.kshot_inputs(
            "trivia_qa", [query], [], 0, tokenizer=tok, warn=lambda m: None, truncation=truncation
        )
        assert len(tok.encode(fitted)) <= 1024 and fitted.startswith("Q: ")
        assert fitted.endswith(" A: <extra_id_0>") == (truncation == FAIR)  # "end" loses it
    assert data.input_budget(XSUM) == 1024 and data.input_budget(RTE) == data.MAX_INPUT_TOKENS
    assert data.input_budget(RTE, 300) == 300


def test_a_template_longer_than_the_budget_is_one_clear_error(tok):
    with pytest.raises(
        BadInput,
        match=r"task xsum: max_input_tokens=8 is too small for the template: "
        r"with every text field emptied its 1-shot input still has \d+ tokens",
    ):
        data.fit_input(XSUM, article(50, 1), [article(50, 2)], tok, 8, truncation=FAIR)


def test_data_py_show_prints_how_many_inputs_were_trimmed_and_by_how_much(tok, tmp_path, capsys):
    folder = tmp_path / "long_docs"
    folder.mkdir()
    (folder / "task.json").write_text(
        json.dumps({"template": "Article: {input} One sentence summary:", "metric": "rouge2"})
    )
    rows = [{"input": text(300, seed), "target": f"s{seed}"} for seed in range(6)]
    for split in ("train", "validation"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (
        data.main(
            [
                "show",
                "--task",
                "long_docs",
                "--data-dir",
                str(tmp_path),
                "--shots",
                "2",
                "--examples",
                "2",
                "--spiece",
                tok.path,
                "--max-input-tokens",
                "200",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert (
        "end truncation to 200 tokens: 2 of 2 inputs trimmed to fit," in out
        and "tokens removed" in out
    )
    assert out.count("input (") == 2 and all(
        int(n.split()[0]) <= 200 for n in out.split("input (")[1:]
    )


def write_xsum_layout(folder, n_words=700):
    """An XSum folder in its published layout (JSON Lines: document, summary, id), long articles."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        rows = [
            {"document": text(n_words, seed), "summary": f"summary {seed}", "id": str(seed)}
            for seed in range(6 if split == "train" else 1)
        ]
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def show_4_shot(tok, data_dir, capsys, *extra):
    argv = ["show", "--task", "xsum", "--data-dir", str(data_dir), "--shots", "4"]
    assert data.main(argv + ["--examples", "1", "--spiece", tok.path, *extra]) == 0
    return capsys.readouterr().out


def test_show_4_shot_xsum_cuts_the_end_by_default_and_keeps_4_demonstrations_when_fair(
    tok, tmp_path, capsys
):
    write_xsum_layout(tmp_path / "xsum")
    end = show_4_shot(tok, tmp_path, capsys)
    shown = end.split("input (")[1].split("\ntarget")[0]
    # App. B.4's cut, as seqio makes it: the first demonstrations fill 1024 tokens, the query is gone
    assert shown.startswith("1024 tokens):") and shown.count("Article:") < 5
    assert "<extra_id_0>" not in shown
    assert "end truncation to 1024 tokens: 1 of 1 inputs trimmed to fit" in end
    fair = show_4_shot(tok, tmp_path, capsys, "--truncation", "fair")
    shown = fair.split("input (")[1].split("\ntarget")[0]
    assert shown.count("Article:") == 5 and shown.count("One sentence summary:") == 5
    assert shown.endswith("One sentence summary: <extra_id_0>")
    assert "fair truncation to 1024 tokens: 1 of 1 inputs trimmed to fit" in fair


# --- issue 24: text is cut before it is tokenized (data.cut_text) ------------------------------


@pytest.mark.parametrize("max_tokens", [8, 64, 300])
def test_cutting_text_before_tokenizing_keeps_every_id(tok, max_tokens, monkeypatch):
    long_text = text(20 * max_tokens, seed=max_tokens)  # ~20 tokens a word: far past the cut
    assert len(long_text) > max_tokens * data.CHARS_PER_TOKEN  # the cut happens
    whole = data.cut_ids(tok.encode(long_text), max_tokens)
    assert data.encode_cut(tok, long_text, max_tokens) == whole
    query, pool = article(20 * max_tokens, 1), [article(20 * max_tokens, s) for s in (2, 3)]
    fitted = {}
    for chars in (data.CHARS_PER_TOKEN, 10**9):  # with the cut, and without it
        monkeypatch.setattr(data, "CHARS_PER_TOKEN", chars)
        for truncation in data.TRUNCATIONS:
            fit = data.fit_input(XSUM, query, pool, tok, max_tokens + 200, None, truncation)
            fitted.setdefault(truncation, []).append(data.encode_cut(tok, fit, max_tokens + 200))
    assert all(cut == uncut for cut, uncut in fitted.values())


def test_a_50_mb_example_is_tokenized_no_further_than_its_budget(tok, monkeypatch):
    huge = data.Example({"article": "storm coast " * 4_500_000}, ["a short summary"])
    longest, encode = [0], tok.encode

    def counting(text, add_eos=True):
        longest[0] = max(longest[0], len(text))
        return encode(text, add_eos)

    monkeypatch.setattr(tok, "encode", counting)
    budget = 1024 * data.CHARS_PER_TOKEN
    for truncation in data.TRUNCATIONS:
        data.fit_input(XSUM, huge, [huge], tok, 1024, None, truncation)
    data.encode_batch(tok, [(huge.fields["article"], "storm " * 9_000_000)], 1024, 256)
    assert 0 < longest[0] <= 2 * budget + 100  # two articles and an answer, not 50 MB
