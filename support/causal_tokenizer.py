"""support/causal_tokenizer.py: the tokenizer of a decoder-only checkpoint (Llama, Mistral, Qwen,
SmolLM2) in the Hugging Face layout, id for id what `transformers.AutoTokenizer` (5.x) gives on
the same folder.

* `tokenizer.json` (Llama 3, Qwen2/2.5/3, SmolLM2) is read with the `tokenizers` package, an
  optional dependency imported only here. BOS / EOS are what the file's post-processor adds
  (transformers 5 drops tokenizer_config.json's add_bos_token beside a tokenizer.json).
* `tokenizer.model` without a tokenizer.json (Llama 2, Mistral, TinyLlama folders saved without
  one) is read with `sentencepiece`, reproducing what transformers 5 converts it to: its
  `LlamaTokenizer`, or, for a Mistral config.json or no tokenizer_class, a tokenizer that
  follows SentencePiece's own settings. BOS / EOS as add_bos_token / add_eos_token say.
* bos_id, eos_id, pad_id: the tokenizer's named tokens (tokenizer_config.json, or
  special_tokens_map.json in older folders), else config.json's ids; eos_ids, the ids that end
  a generation: generation_config.json's eos_token_id (an id or a list) with the tokenizer's EOS.

`load(model_dir)` returns a `CausalTokenizer` with `encode`, `decode`, `bos_id`, `eos_id`,
`eos_ids`, `pad_id`, `vocab_size` and `path`. A leaf of promot: the standard library,
sentencepiece and (lazily) tokenizers; copied alone its errors are ValueErrors.
"""

import json
import re
from pathlib import Path

import sentencepiece

try:
    from support.errors import BadInput, DamagedFile
except ImportError:  # copied alone
    BadInput = DamagedFile = ValueError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")  # transformers' order
LIST_TOKENS = ("additional_special_tokens", "extra_special_tokens")
# The tokenizer_class values whose conversion of a tokenizer.model is reproduced below.
LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")


def load(model_dir):
    """The tokenizer of the checkpoint folder `model_dir` (see `CausalTokenizer.from_checkpoint`)."""
    return CausalTokenizer.from_checkpoint(model_dir)


class CausalTokenizer:
    """Text <-> ids for a decoder-only checkpoint, mirroring data.Tokenizer's small API.

    `encode(text)` is `AutoTokenizer(text)["input_ids"]`: BOS (and EOS) only where the
    checkpoint adds them (Llama: BOS; Qwen: nothing). `decode` is `AutoTokenizer.decode`.
    """

    causal = True  # data.py: no sentinels; input, then target and EOS, in one sequence

    def __init__(self, backend, path, ids, prefix, suffix):
        self.backend, self.path = backend, str(path)
        self.bos_id, self.eos_id, self.eos_ids, self.pad_id = ids
        self.vocab_size = backend.size  # len(AutoTokenizer): pieces plus added tokens
        self._prefix, self._suffix = prefix, suffix  # what the checkpoint adds by default

    @classmethod
    def from_checkpoint(cls, model_dir):
        """Reads tokenizer.json if the folder has one, else tokenizer.model, and the configs."""
        folder = Path(model_dir)
        files = [folder / name for name in TOKENIZER_FILES]
        if not any(f.is_file() for f in files):
            raise BadInput(f"{folder}: no tokenizer file; looked for {', '.join(TOKENIZER_FILES)}")
        config = _read_json(folder / "tokenizer_config.json")
        names = _token_names(folder, config)
        if files[0].is_file():
            backend = _TokenizerJson(files[0])
        else:
            model_type = _read_json(folder / "config.json").get("model_type")
            backend = _SentencePieceModel(files[1], config, names, model_type)
        named = {key: backend.token_id(names[key]) for key in NAMED_TOKENS if names.get(key)}
        ids = _special_ids(folder, names, named)
        prefix, suffix = backend.default_specials(config, named)
        return cls(backend, backend.path, ids, prefix, suffix)

    def encode(self, text: str, add_bos=None, add_eos=None) -> list[int]:
        """Ids of `text`. add_bos / add_eos None: as the checkpoint does (what
        `AutoTokenizer(text)["input_ids"]` holds); True or False force BOS / EOS on or off."""
        prefix = self._prefix if add_bos is None else self._need(self.bos_id, "BOS", add_bos)
        suffix = self._suffix if add_eos is None else self._need(self.eos_id, "EOS", add_eos)
        return prefix + self.backend.encode(text) + suffix

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids` as `AutoTokenizer.decode` writes it; ids outside the tokenizer's
        vocabulary (checkpoints pad their embeddings to a round number) are dropped."""
        kept = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self.backend.decode(kept, skip_special_tokens)

    def _need(self, token_id, what, wanted):
        if wanted and token_id is None:
            raise BadInput(f"{self.path}: the checkpoint names no {what} token to add")
        return [token_id] if wanted else []


# --------------------------------------------------------------------------
# Special tokens: which strings, which ids
# --------------------------------------------------------------------------


def _read_json(path):
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedFile(f"{path}: not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise DamagedFile(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _content(value):
    """A token as the configs write it: a string, or a serialized AddedToken {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _token_names(folder, config):
    """{key: string or None} for the named tokens the tokenizer files mention, plus the list of
    extra special tokens. As transformers 5 reads them: special_tokens_map.json overrides
    tokenizer_config.json only in older folders, whose config has no `added_tokens_decoder`."""
    values = dict(config)
    if "added_tokens_decoder" not in config:
        values.update(_read_json(folder / "special_tokens_map.json"))
    names = {key: _content(values[key]) for key in NAMED_TOKENS if key in values}
    extras = [_content(t) for key in LIST_TOKENS for t in values.get(key) or [] if _content(t)]
    names["extras"] = extras
    return names


def _special_ids(folder, names, named):
    """(bos_id, eos_id, eos_ids, pad_id). The tokenizer's own tokens decide; a token the tokenizer
    files do not mention at all (a key absent, not null: Qwen writes `"bos_token": null`) falls
    back to config.json's id. eos_ids: the ids that end a generation, generation_config.json's
    `eos_token_id` (an id or a list), else config.json's, plus the tokenizer's EOS."""
    model = _read_json(folder / "config.json")
    generation = _read_json(folder / "generation_config.json")

    def token_id(key, id_key):
        return named.get(key) if key in names else model.get(id_key)

    eos_ids = generation.get("eos_token_id", model.get("eos_token_id"))
    eos_ids = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    eos_id = token_id("eos_token", "eos_token_id")
    if isinstance(eos_id, list):  # config.json may hold the list too
        eos_id = eos_id[0] if eos_id else None
    if eos_id is None and eos_ids:
        eos_id = eos_ids[0]
    if eos_id is not None and eos_id not in eos_ids:
        eos_ids.append(eos_id)
    return (
        token_id("bos_token", "bos_token_id"),
        eos_id,
        eos_ids,
        token_id("pad_token", "pad_token_id"),
    )


# --------------------------------------------------------------------------
# tokenizer.json: the tokenizers package does the work
# --------------------------------------------------------------------------


class _TokenizerJson:
    """A tokenizer.json through `tokenizers`, as transformers' PreTrainedTokenizerFast loads it."""

    def __init__(self, path):
        self.path = path
        try:
            import tokenizers
        except ImportError:
            raise BadInput(
                f"{path}: reading a tokenizer.json needs the tokenizers package: pip install tokenizers"
            ) from None
        try:
            self.tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # noqa: BLE001  the Rust parser raises a bare Exception
            raise DamagedFile(f"{path}: cannot read it as a tokenizers file ({err})") from None
        # transformers encodes without the truncation or padding a file may carry
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()

    @property
    def size(self):
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, content):
        """Id of a named special token; one the file lacks is added, as transformers does."""
        if self.tokenizer.token_to_id(content) is None:
            self.tokenizer.add_special_tokens([content])
        return self.tokenizer.token_to_id(content)

    def default_specials(self, config, named):
        """(ids before, ids after) the text that the file's post-processor adds (Llama 3:
        <|begin_of_text|> before; Qwen: nothing), found by encoding a probe with and without.
        transformers 5 ignores tokenizer_config.json's add_bos_token beside a tokenizer.json."""
        body = self.tokenizer.encode("a", add_special_tokens=False).ids
        full = self.tokenizer.encode("a").ids
        for start in range(len(full) - len(body) + 1):
            if full[start : start + len(body)] == body:
                return full[:start], full[start + len(body) :]
        return full, []

    def encode(self, text):
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens):
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


# --------------------------------------------------------------------------
# tokenizer.model: what transformers 5 builds from it, reproduced over sentencepiece
# --------------------------------------------------------------------------

CONTROL, USER_DEFINED = 3, 4  # SentencePiece piece types
# NormalizerSpec {name: "identity", add_dummy_prefix: false, remove_extra_whitespaces: false,
# escape_whitespaces: true}: the text given to SentencePiece is already as the BPE must see it.
PLAIN_NORMALIZER = b"\x1a\x10\x0a\x08identity\x18\x00\x20\x00\x28\x01"
# config.json model types that transformers 5 gives a tokenizer class of their own
# (TokenizersBackend), which converts a tokenizer.model following SentencePiece's own settings.
OWN_SETTINGS_MODEL_TYPES = ("mistral", "mixtral")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class _SentencePieceModel:
    """A tokenizer.model read the way transformers 5 converts it, in one of its two ways:

    * `LlamaTokenizer` (tokenizer_config.json names it; config.json's model_type is llama or
      absent): no normalization; " " becomes "▁"; the text gets one "▁" in front unless it
      already starts with one (Metaspace, prepend_scheme "first"), so "hi" and " hi" encode
      alike. `legacy: true`: the text after each added token gets it too ("always");
      `add_prefix_space: false`: nothing gets it. User-defined pieces are added tokens.
    * SentencePiece's own settings (TokenizersBackend: a Mistral or Mixtral config.json, or no
      tokenizer_class): its normalizer (NFKC, extra spaces) and its dummy "▁" before every
      stretch of text (`legacy`, the default here) or, with `legacy: false`, only before the
      first, and only where that stretch does not start with "▁" already.
    Both: control pieces (<s>, </s>), the named special tokens and `added_tokens_decoder` are
    matched in the raw text first, longest first; BPE with byte fallback encodes each stretch
    between them (SentencePiece runs the merges: transformers ranks them by piece score, or by
    id for LlamaTokenizer, the same order in a trained BPE model). decode: "▁" -> " ", runs of
    <0xNN> pieces -> UTF-8 (one U+FFFD per byte if invalid), then the text's first space dropped
    (the prefix added at encode).
    """

    def __init__(self, path, config, names, model_type):
        self.path = path
        tokenizer_class = config.get("tokenizer_class")
        self.own_settings = tokenizer_class is None or model_type in OWN_SETTINGS_MODEL_TYPES
        if not self.own_settings and tokenizer_class not in LLAMA_CLASSES:
            raise BadInput(
                f"{path.parent / 'tokenizer_config.json'}: tokenizer_class is {tokenizer_class!r}; "
                f"a tokenizer.model is read as {' or '.join(LLAMA_CLASSES)} (Llama 2, Mistral, "
                "TinyLlama); give the folder a tokenizer.json instead"
            )
        proto = path.read_bytes()
        try:
            fields = list(_fields(proto))
            types = [_field(piece, 3, 1) for field, piece, _ in fields if field == 1]
            spec = next((value for field, value, _ in fields if field == 3), b"")
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=_plain_normalizer(fields))
            self.sp_own = sentencepiece.SentencePieceProcessor(model_proto=proto)
        except (IndexError, ValueError, RuntimeError) as err:
            raise DamagedFile(f"{path}: cannot read a SentencePiece model ({err})") from None
        self.tokens = [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())]
        self.legacy = bool(config.get("legacy", self.own_settings))  # each way's default
        if self.own_settings:
            self.dummy_prefix = bool(_field(spec, 3, 1))  # NormalizerSpec.add_dummy_prefix
            own = {
                "bos_token": self.sp.bos_id(),
                "eos_token": self.sp.eos_id(),
                "unk_token": self.sp.unk_id(),
            }
            defaults = {key: self.tokens[i] for key, i in own.items() if i >= 0}
        else:
            self.dummy_prefix = config.get("add_prefix_space") is not False
            defaults = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        # the class's defaults count as named by the tokenizer (no config.json fallback)
        names.update({key: value for key, value in defaults.items() if key not in names})
        self._add_tokens(types, config, names)

    def _add_tokens(self, types, config, names):
        """The added tokens, in transformers' order (new ones take the next ids)."""
        self.added, self.special = {}, set()  # added token text -> id; ids skipped by decode
        for i, kind in enumerate(types):
            if kind == CONTROL or (kind == USER_DEFINED and not self.own_settings):
                self._add(self.tokens[i], special=kind == CONTROL)
        decoder = config.get("added_tokens_decoder") or {}
        for i in sorted(decoder, key=int):
            self._add(_content(decoder[i]), special=bool(decoder[i].get("special", False)))
        for token in [names.get(key) for key in NAMED_TOKENS] + names["extras"]:
            if token:
                self._add(token, special=True)
        alternatives = sorted(self.added, key=len, reverse=True)
        self._added_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    def _add(self, text, special):
        """An added token: its piece's id if the model has it, else the next id (transformers)."""
        if text not in self.added:
            index = self.sp.piece_to_id(text)
            if index == self.sp.unk_id() and text != self.tokens[index]:
                index = len(self.tokens)
                self.tokens.append(text)
            self.added[text] = index
        if special:
            self.special.add(self.added[text])

    @property
    def size(self):
        return len(self.tokens)

    def token_id(self, content):
        return self.added[content]

    def default_specials(self, config, named):
        """(ids before, ids after) the text: transformers builds `BOS $A EOS` from
        tokenizer_config.json's add_bos_token and add_eos_token, both off when absent."""
        flags = (("add_bos_token", "bos_token"), ("add_eos_token", "eos_token"))
        return [[named[key]] if config.get(flag) and key in named else [] for flag, key in flags]

    def encode(self, text):
        ids = []
        for k, chunk in enumerate(self._added_re.split(text)):
            if k % 2 == 1:  # re.split puts the matched added tokens at odd positions
                ids.append(self.added[chunk])
            elif chunk:
                ids.extend(self.sp.encode(self._escaped(chunk, first=k == 0)))
        return ids

    def _escaped(self, chunk, first):
        """The text the BPE sees: spaces as "▁", and the "▁" prefix where transformers adds it."""
        if self.own_settings:
            text = self.sp_own.normalize(chunk)  # SentencePiece's "▁" + normalized chunk
            if self.legacy or not (self.dummy_prefix and text):
                return text
            # Metaspace "first" prefixes the text at offset 0 of the input: not if normalizing
            # dropped the first character (a leading space removed as extra whitespace)
            first = first and bool(self.sp_own.normalize(chunk[0]))
            return text if first and not text[1:].startswith("▁") else text[1:]
        text = chunk.replace(" ", "▁")
        if self.dummy_prefix and (first or self.legacy) and not text.startswith("▁"):
            text = "▁" + text
        return text

    def decode(self, ids, skip_special_tokens):
        tokens = [self.tokens[i] for i in ids if not (skip_special_tokens and i in self.special)]
        text, run = [], bytearray()
        for token in tokens:
            byte = _BYTE_PIECE.fullmatch(token)
            if byte:
                run.append(int(byte.group(1), 16))
                continue
            text.append(_utf8(run))
            run.clear()
            text.append(token.replace("▁", " "))
        text = "".join(text) + _utf8(run)
        if self.dummy_prefix and text.startswith(" "):
            text = text[1:]
        return text


def _utf8(run):
    """A run of byte-fallback pieces as tokenizers' ByteFallback decoder writes it."""
    try:
        return bytes(run).decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(run)


# SentencePiece's model file is a protobuf ModelProto; reading the piece types and swapping the
# normalizer spec needs only its wire format (field numbers from sentencepiece_model.proto).


def _varint(buf, i):
    value = shift = 0
    while True:
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        shift, i = shift + 7, i + 1
        if byte < 0x80:
            return value, i


def _fields(buf):
    """Yields (field number, value, raw bytes) for each field of one protobuf message."""
    i = 0
    while i < len(buf):
        start = i
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire in (1, 5):
            value, i = buf[i : i + (8 if wire == 1 else 4)], i + (8 if wire == 1 else 4)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i : i + size], i + size
        else:
            raise ValueError(f"protobuf wire type {wire} at byte {start}")
        if i > len(buf):
            raise ValueError("truncated protobuf message")
        yield key >> 3, value, buf[start:i]


def _field(message, number, default):
    """A varint field of a message (SentencePiece.type is 3, NormalizerSpec.add_dummy_prefix 3)."""
    return next((value for field, value, _ in _fields(message) if field == number), default)


def _plain_normalizer(fields):
    """The model (its top-level fields) with PLAIN_NORMALIZER as its normalizer_spec (field 3)
    and no self_test_data (field 4, which the new normalizer could fail)."""
    return b"".join(raw for field, _, raw in fields if field not in (3, 4)) + PLAIN_NORMALIZER
