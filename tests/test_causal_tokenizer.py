"""support/causal_tokenizer.py against transformers' AutoTokenizer (the oracle) on the same
folders, laid out like the public decoder-only checkpoints:
  * tokenizer.model only, like Llama 2 (LlamaTokenizer, legacy false, AddedToken dicts) and
    Mistral (legacy true, plain strings, special_tokens_map.json): a SentencePiece BPE model with
    byte fallback that the test trains (unk 0, BOS 1, EOS 2, identity normalizer, as Llama's);
  * tokenizer.json, like Llama 3 (byte-level BPE, Llama 3's split regex, <|begin_of_text|> added
    by the file's post-processor) and Qwen2.5 (NFC, Qwen's regex, no BOS, <|im_end|> as EOS),
    a BPE that the test trains with `tokenizers`.
Every text of TEXTS (k-shot prompts, blank lines, leading and trailing spaces, digits,
punctuation, é ß 日本語 emoji Cyrillic, special tokens written in the text) must encode to the
oracle's ids and decode to the oracle's text."""

import json
import random
import sys

import pytest
import sentencepiece
import transformers

from support import causal_tokenizer
from support.errors import BadInput, DamagedFile

WORDS = (
    "the quick brown fox jumps over a lazy dog question answer premise hypothesis true false "
    "yes no entailment café naïve straße Übermaß 日本語 東京 привет мир Ёж 😀 🦜 👍🏽 "
    "12 345 6789 3.14 1,000 , . ! ? : ; ' \" ( ) [ ] - — … % $ #"
).split(" ")
GLUE = [" ", " ", " ", "", "  ", "\n", "\n\n", "\t", " \n"]


def make_texts():
    """Hand-picked edge cases, k-shot prompts and random word soups: 360 texts."""
    texts = [
        "",
        " ",
        "  ",
        "\n",
        "\n\n",
        "hello",
        " hello",
        "  hello",
        "hello ",
        "hello\n",
        "Q: Is the sky blue?\nA: yes\n\nQ: Is fire cold?\nA: no\n\nQ: Is ice cold?\nA:",
        "Premise: A man sleeps.\nHypothesis: A man is awake.\nAnswer: false\n\n\n",
        "  leading and trailing  ",
        "digits 0123456789 and 3.14159, 1,000,000!",
        "Ünïcödé: café, straße, naïve — 日本語のテキスト, привет, мир! 😀🦜👍🏽",
        "tab\tseparated\tvalues",
        "carriage\r\nreturn",
        "it's we're they've I'm you'll he'd DON'T",
        "<s>",
        "<s>hello</s>",
        "a <s> b </s> c",
        "<unk> and <s><s>",
        "<|begin_of_text|>Q: x\nA:",
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
        "<|endoftext|> <|end_of_text|>",
        "\u2581already\u2581escaped",
        "x\x00y\x7f",
        "a user-defined piece: x<sep>y <sep> z<sep>",
        "\u3000ideographic space first, NFKC: ﬁne ①② Ｆｕｌｌ e\u0301",
        "\u3000<s>\u3000a",
    ]
    rng = random.Random(0)
    for _ in range(60):  # k-shot prompts: Q/A pairs separated by blank lines
        shots = [
            f"Q: {' '.join(rng.choices(WORDS, k=rng.randint(1, 8)))}?\n"
            f"A: {rng.choice(['yes', 'no', 'true', 'false', '42', 'café'])}"
            for _ in range(rng.randint(1, 4))
        ]
        texts.append(rng.choice(["", " "]) + "\n\n".join(shots) + rng.choice(["", "\n", " "]))
    while len(texts) < 360:
        words = rng.choices(WORDS, k=rng.randint(1, 14))
        text = "".join(w + rng.choice(GLUE) for w in words)
        texts.append(rng.choice(["", " ", "  ", "\n"]) + text + rng.choice(["", " ", "\n"]))
    return texts


TEXTS = make_texts()
CORPUS = [" ".join(random.Random(i).choices(WORDS[:40], k=12)) for i in range(400)]


def write_json(path, value):
    path.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")


def added_token(content):
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}  # fmt: skip


def named_token(content):
    """A named special token as tokenizer_config.json writes it (a serialized AddedToken)."""
    return {"__type": "AddedToken", **added_token(content)}


# --------------------------------------------------------------------------
# Checkpoint folders
# --------------------------------------------------------------------------


def train_llama_spiece(folder, nfkc=False):
    """A BPE tokenizer.model trained like Llama's: unk 0, BOS 1, EOS 2, byte fallback, no
    normalization, whitespace kept as it is, a user-defined piece <sep>. nfkc=True:
    SentencePiece's default normalizer instead (NFKC, extra spaces removed)."""
    plain = dict(normalization_rule_name="identity", remove_extra_whitespaces=False)
    own = {} if nfkc else plain
    (folder / "corpus.txt").write_text("\n".join(CORPUS), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=420,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        user_defined_symbols=["<sep>"],
        split_digits=True,
        character_coverage=0.99,  # the rarest characters go through byte fallback
        minloglevel=2,
        **own,
    )
    (folder / "corpus.txt").unlink()


def train_byte_level_bpe(split_regex, normalizer=None):
    """A byte-level BPE `tokenizers.Tokenizer` (GPT-2 bytes, the given split regex)."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(tokenizers.Regex(split_regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def add_specials(tokenizer, names):
    """Special tokens after the trained vocabulary (as Llama 3 and Qwen number them)."""
    tokenizer.add_special_tokens(names)
    ids = {name: tokenizer.token_to_id(name) for name in names}
    return ids, {str(i): added_token(name) for name, i in ids.items()}


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spiece")
    train_llama_spiece(folder)
    return (folder / "tokenizer.model").read_bytes()


def llama2_folder(folder, spiece):
    """Llama 2's tokenizer files, tokenizer.json left out. Its special_tokens_map.json here also
    names a pad token, which transformers 5 ignores beside an `added_tokens_decoder`."""
    (folder / "tokenizer.model").write_bytes(spiece)
    write_json(folder / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "legacy": False, "pad_token": None,
        "bos_token": named_token("<s>"), "eos_token": named_token("</s>"),
        "unk_token": named_token("<unk>"), "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {"0": added_token("<unk>"), "1": added_token("<s>"),
                                 "2": added_token("</s>")},
        "tokenizer_class": "LlamaTokenizer", "padding_side": "right",
    })  # fmt: skip
    write_json(
        folder / "config.json", {"model_type": "llama", "bos_token_id": 1, "eos_token_id": 2}
    )
    write_json(folder / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2})
    write_json(folder / "special_tokens_map.json", {"bos_token": "<s>", "pad_token": "</s>"})


def mistral_folder(folder, spiece):
    """Mistral 7B v0.1's: legacy true, plain strings, a special_tokens_map.json naming a pad
    token the model does not have (transformers adds it after the pieces). Its config.json's
    model_type makes transformers 5 read it with TokenizersBackend, not LlamaTokenizer."""
    (folder / "tokenizer.model").write_bytes(spiece)
    write_json(folder / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "legacy": True, "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>", "additional_special_tokens": [],
        "tokenizer_class": "LlamaTokenizer", "spaces_between_special_tokens": False,
    })  # fmt: skip
    write_json(folder / "special_tokens_map.json", {"bos_token": "<s>", "pad_token": "<pad>"})
    write_json(
        folder / "config.json", {"model_type": "mistral", "bos_token_id": 1, "eos_token_id": 2}
    )


def llama3_folder(folder):
    """Llama 3's: byte-level BPE, <|begin_of_text|> added by the file's TemplateProcessing,
    several generation EOS ids, `clean_up_tokenization_spaces: true` (ignored for a BPE)."""
    from tokenizers import processors

    tokenizer = train_byte_level_bpe(LLAMA3_REGEX)
    ids, decoder = add_specials(tokenizer, ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
    bos = ids["<|begin_of_text|>"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    tokenizer.enable_truncation(max_length=8)  # some files carry one; transformers ignores it
    tokenizer.save(str(folder / "tokenizer.json"))
    write_json(folder / "tokenizer_config.json", {
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "clean_up_tokenization_spaces": True, "added_tokens_decoder": decoder,
        "model_input_names": ["input_ids", "attention_mask"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    })  # fmt: skip
    eot, end = ids["<|eot_id|>"], ids["<|end_of_text|>"]
    write_json(
        folder / "config.json",
        {"model_type": "llama", "bos_token_id": bos, "eos_token_id": [end, eot]},
    )
    write_json(folder / "generation_config.json", {"bos_token_id": bos, "eos_token_id": [end, eot]})


def qwen_folder(folder):
    """Qwen2.5-Instruct's: NFC, Qwen's regex, a ByteLevel post-processor (no BOS although
    config.json names a bos_token_id), <|im_end|> as EOS, <|endoftext|> as pad."""
    from tokenizers import normalizers, processors

    tokenizer = train_byte_level_bpe(QWEN_REGEX, normalizers.NFC())
    ids, decoder = add_specials(tokenizer, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.save(str(folder / "tokenizer.json"))
    write_json(folder / "tokenizer_config.json", {
        "add_prefix_space": False, "added_tokens_decoder": decoder, "bos_token": None,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "errors": "replace",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "clean_up_tokenization_spaces": False, "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    })  # fmt: skip
    text_end, im_end = ids["<|endoftext|>"], ids["<|im_end|>"]
    write_json(
        folder / "config.json",
        {"model_type": "qwen2", "bos_token_id": text_end, "eos_token_id": im_end},
    )
    write_json(
        folder / "generation_config.json",
        {"bos_token_id": text_end, "eos_token_id": [im_end, text_end], "pad_token_id": text_end},
    )


def nfkc_folder(folder):
    """A tokenizer.model with SentencePiece's own normalizer (NFKC, extra spaces removed), read
    through TokenizersBackend (a Mistral config.json) with `legacy: false`."""
    train_llama_spiece(folder, nfkc=True)
    write_json(folder / "tokenizer_config.json", {
        "add_bos_token": True, "legacy": False, "tokenizer_class": "LlamaTokenizer",
    })  # fmt: skip
    write_json(
        folder / "config.json", {"model_type": "mistral", "bos_token_id": 1, "eos_token_id": 2}
    )


@pytest.fixture(scope="module", params=["llama2", "mistral", "nfkc", "llama3", "qwen"])
def folder(request, spiece, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    if request.param in ("llama2", "mistral"):
        {"llama2": llama2_folder, "mistral": mistral_folder}[request.param](folder, spiece)
    elif request.param == "nfkc":
        nfkc_folder(folder)
    else:
        {"llama3": llama3_folder, "qwen": qwen_folder}[request.param](folder)
    return folder


@pytest.fixture(scope="module")
def pair(folder):
    """(ours, the oracle) on one folder."""
    return causal_tokenizer.load(folder), transformers.AutoTokenizer.from_pretrained(folder)


# --------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------


def test_encode_equals_the_oracle_default(pair):
    ours, oracle = pair
    mismatched = [t for t in TEXTS if ours.encode(t) != oracle(t)["input_ids"]]
    assert mismatched == []


def test_encode_with_bos_and_eos_forced(pair):
    ours, oracle = pair
    bos = [oracle.bos_token_id] if oracle.bos_token_id is not None else []
    for text in TEXTS[:40]:
        body = oracle(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text, add_bos=False, add_eos=False) == body
        assert ours.encode(text, add_eos=True) == oracle(text)["input_ids"] + [oracle.eos_token_id]
        if bos:
            assert ours.encode(text, add_bos=True, add_eos=False) == bos + body


def test_decode_equals_the_oracle(pair):
    ours, oracle = pair
    for text in TEXTS:
        ids = oracle(text)["input_ids"]
        for skip in (True, False):
            assert ours.decode(ids, skip) == oracle.decode(ids, skip_special_tokens=skip), text


def test_decode_of_random_ids_equals_the_oracle(pair):
    """Any ids, ids past the vocabulary and broken UTF-8 byte runs included."""
    ours, oracle = pair
    rng = random.Random(1)
    for _ in range(300):
        ids = [rng.randrange(len(oracle) + 4) for _ in range(rng.randint(0, 12))]
        for skip in (True, False):
            assert ours.decode(ids, skip) == oracle.decode(ids, skip_special_tokens=skip), ids


def test_special_ids_and_size_equal_the_oracle(pair):
    ours, oracle = pair
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (
        oracle.bos_token_id,
        oracle.eos_token_id,
        oracle.pad_token_id,
    )
    assert ours.vocab_size == len(oracle)


def test_tokenizer_model_without_tokenizer_config(tmp_path, spiece):
    """No tokenizer_class: transformers 5 follows SentencePiece's own settings (legacy by
    default) and takes BOS, EOS and unk from the model's trainer spec."""
    llama2_folder(tmp_path, spiece)
    (tmp_path / "tokenizer_config.json").unlink()
    ours = causal_tokenizer.load(tmp_path)
    oracle = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert [ours.encode(t) for t in TEXTS] == [oracle(t)["input_ids"] for t in TEXTS]
    assert (ours.bos_id, ours.eos_id) == (oracle.bos_token_id, oracle.eos_token_id)


def test_eos_ids_keep_the_tokenizers_eos_when_generation_config_lists_others(tmp_path, spiece):
    """The EOS that encode(add_eos=True) appends must also end a generation."""
    llama2_folder(tmp_path, spiece)
    write_json(tmp_path / "generation_config.json", {"eos_token_id": [7, 8]})
    ours = causal_tokenizer.load(tmp_path)
    assert (ours.eos_id, ours.eos_ids) == (2, [7, 8, 2])


def test_eos_ids_are_generation_configs_list_with_the_tokenizers_eos(tmp_path):
    llama3_folder(tmp_path)
    ours = causal_tokenizer.load(tmp_path)
    end, eot = json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"]
    assert ours.eos_id == eot  # the tokenizer's eos_token, <|eot_id|>
    assert ours.eos_ids == [end, eot]
    assert ours.path == str(tmp_path / "tokenizer.json")


def test_qwen_has_no_bos_although_config_json_names_one(tmp_path):
    qwen_folder(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["bos_token_id"] is not None
    ours = causal_tokenizer.load(tmp_path)
    assert ours.bos_id is None
    with pytest.raises(BadInput, match="no BOS"):
        ours.encode("hi", add_bos=True)


def test_without_tokenizer_config_ids_come_from_config_json(tmp_path):
    """A bare tokenizer.json: the file's post-processor adds BOS; config.json names the ids."""
    llama3_folder(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "generation_config.json").unlink()
    config = json.loads((tmp_path / "config.json").read_text())
    ours = causal_tokenizer.load(tmp_path)
    oracle = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert [ours.encode(t) for t in TEXTS[:50]] == [oracle(t)["input_ids"] for t in TEXTS[:50]]
    assert (ours.bos_id, ours.eos_ids) == (config["bos_token_id"], config["eos_token_id"])
    assert ours.eos_id == config["eos_token_id"][0]


@pytest.mark.parametrize(
    "flags",
    [
        {"add_bos_token": False},
        {"add_eos_token": True},
        {"legacy": True},
        {"add_prefix_space": False},
    ],
)
def test_llama_tokenizer_options_of_a_tokenizer_model(tmp_path, spiece, flags):
    llama2_folder(tmp_path, spiece)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    write_json(tmp_path / "tokenizer_config.json", {**config, **flags})
    ours = causal_tokenizer.load(tmp_path)
    oracle = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert [ours.encode(t) for t in TEXTS[:50]] == [oracle(t)["input_ids"] for t in TEXTS[:50]]


@pytest.mark.parametrize("flags", [{"add_bos_token": False}, {"add_eos_token": True}])
def test_the_post_processor_decides_for_a_tokenizer_json_whatever_the_flags(tmp_path, flags):
    """transformers 5 drops add_bos_token / add_eos_token when it reads a tokenizer.json."""
    llama3_folder(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    write_json(tmp_path / "tokenizer_config.json", {**config, **flags})
    ours = causal_tokenizer.load(tmp_path)
    oracle = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert [ours.encode(t) for t in TEXTS[:50]] == [oracle(t)["input_ids"] for t in TEXTS[:50]]


def test_a_folder_without_a_tokenizer_file_is_one_line(tmp_path):
    write_json(tmp_path / "config.json", {"model_type": "llama"})
    with pytest.raises(BadInput) as error:
        causal_tokenizer.load(tmp_path)
    message = str(error.value)
    assert "tokenizer.json" in message and "tokenizer.model" in message and "\n" not in message


def test_tokenizer_json_without_the_tokenizers_package_is_one_line(tmp_path, monkeypatch):
    llama3_folder(tmp_path)
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` now fails
    with pytest.raises(BadInput) as error:
        causal_tokenizer.load(tmp_path)
    message = str(error.value)
    assert "pip install tokenizers" in message and "\n" not in message


def test_tokenizer_model_needs_no_tokenizers_package(tmp_path, monkeypatch, spiece):
    llama2_folder(tmp_path, spiece)
    oracle_ids = transformers.AutoTokenizer.from_pretrained(tmp_path)(TEXTS[10])["input_ids"]
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    assert causal_tokenizer.load(tmp_path).encode(TEXTS[10]) == oracle_ids


def test_tokenizer_json_is_read_before_tokenizer_model(tmp_path, spiece):
    qwen_folder(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(spiece)
    assert causal_tokenizer.load(tmp_path).path == str(tmp_path / "tokenizer.json")


def test_tokenizer_model_of_another_class_is_refused(tmp_path, spiece):
    llama2_folder(tmp_path, spiece)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    write_json(tmp_path / "tokenizer_config.json", {**config, "tokenizer_class": "T5Tokenizer"})
    with pytest.raises(BadInput, match="T5Tokenizer"):
        causal_tokenizer.load(tmp_path)


def test_truncated_tokenizer_model_is_a_damaged_file(tmp_path, spiece):
    llama2_folder(tmp_path, spiece)
    (tmp_path / "tokenizer.model").write_bytes(spiece[: len(spiece) // 2])
    with pytest.raises(DamagedFile, match="tokenizer.model"):
        causal_tokenizer.load(tmp_path)


def test_unreadable_tokenizer_json_is_a_damaged_file(tmp_path):
    llama3_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE"', encoding="utf-8")
    with pytest.raises(DamagedFile, match="tokenizer.json"):
        causal_tokenizer.load(tmp_path)


def test_a_named_pad_token_missing_from_tokenizer_json_is_added_as_the_oracle_adds_it(tmp_path):
    llama3_folder(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    write_json(tmp_path / "tokenizer_config.json", {**config, "pad_token": "<pad>"})
    ours = causal_tokenizer.load(tmp_path)
    oracle = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (ours.pad_id, ours.vocab_size) == (oracle.pad_token_id, len(oracle))
    assert ours.encode("a<pad>b") == oracle("a<pad>b")["input_ids"]
