"""Data for promot: tokenizer, the paper's tasks, k-shot prompts, batching.

This room turns data files on disk into the exact token ids the model sees.
It holds
  * `Tokenizer`: SentencePiece with T5's conventions (pad 0, EOS 1, unk 2,
    100 sentinels `<extra_id_N>` at the top of the vocabulary), id-for-id
    equal to `transformers`' T5Tokenizer on the same spiece.model;
  * `Task` / `TASKS`: the paper's twelve tasks, templates copied from its
    Table 7, metric names, label words, the App. B.2 prefix token;
  * readers for each data set's published files (`load_split`);
  * prompt building: k-shot inputs, the mT5 sentinel rule, truncation,
    label shuffling (paper §3.3), "+1-shot" training inputs (paper §5.3);
  * batching: dynamic padding, length-sorted evaluation batches and a
    deterministic, resumable multi-task mixture;
  * a small CLI: `python data.py show ...` and `python data.py check ...`.
Decoding, post-processing and metrics live in evaluate.py; the model in
model.py; training in promot.py.
"""

from __future__ import annotations

import re

import sentencepiece


class DataError(ValueError):
    """A problem with the user's data or arguments; the message says where and what."""


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------

NUM_SENTINELS = 100  # T5 and mT5 reserve 100 <extra_id_N> ids above the SentencePiece pieces.
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2

# Characters with the Unicode White_Space property (what Rust's char::is_whitespace,
# and so transformers' WhitespaceSplit pre-tokenizer, splits on). Python's str.split()
# differs slightly (it also splits on \x1c-\x1f), so the set is spelled out.
_WHITESPACE = re.compile(
    "[\u0009-\u000d\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


class Tokenizer:
    """SentencePiece tokenizer with T5's special ids.

    Reproduces `transformers.T5Tokenizer.from_pretrained(dir)` (transformers 5):
      * `<pad>`, `</s>`, `<unk>` and `<extra_id_0>` ... `<extra_id_99>` written in
        the text are special tokens; `<extra_id_N>` has id piece_count + 99 - N, so
        `<extra_id_0>` is the highest id (T5's convention).
      * Between special tokens the text is split on whitespace and every word is
        encoded on its own with a leading "▁" -- so whitespace around a sentinel
        never produces a token, and the text right after a sentinel starts a new
        word ("a<extra_id_0>b" -> ▁a, <extra_id_0>, ▁b).
      * `encode` appends EOS (id 1), like T5's preprocessing and the oracle.
    """

    def __init__(self, spiece_model_path):
        self.path = str(spiece_model_path)
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        except (OSError, RuntimeError) as err:
            raise DataError(f"{self.path}: cannot read a SentencePiece model ({err})") from None
        self.piece_count = self.sp.get_piece_size()
        self.vocab_size = self.piece_count + NUM_SENTINELS
        self.special = {"<pad>": PAD_ID, "</s>": EOS_ID, "<unk>": UNK_ID}
        self.special.update({f"<extra_id_{n}>": self.sentinel_id(n) for n in range(NUM_SENTINELS)})
        # One regex alternation over the special strings; longest first so that
        # "<extra_id_10>" is never read as "<extra_id_1>" followed by "0>".
        alternatives = sorted(self.special, key=len, reverse=True)
        self._special_re = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")

    def sentinel_id(self, n: int) -> int:
        """Id of `<extra_id_n>`: sentinels count down from the top of the vocabulary."""
        if not 0 <= n < NUM_SENTINELS:
            raise ValueError(f"sentinel index {n} outside 0..{NUM_SENTINELS - 1}")
        return self.piece_count + NUM_SENTINELS - 1 - n

    def check_fits(self, model_vocab_size: int) -> None:
        """Raise DataError unless every id we can produce has an embedding row.

        Checkpoints pad their vocabulary (mT5: 250100 ids used, 250112 rows), so
        <= is the test, not ==.
        """
        if self.vocab_size > model_vocab_size:
            raise DataError(
                f"tokenizer {self.path} has {self.piece_count} pieces + {NUM_SENTINELS} sentinels = "
                f"{self.vocab_size} ids, but the model's vocab_size is {model_vocab_size}; "
                "is the spiece.model from the same checkpoint?")

    def encode(self, text: str, add_eos: bool = True) -> list[int]:
        ids = []
        for i, chunk in enumerate(self._special_re.split(text)):
            if i % 2 == 1:  # re.split puts the captured special strings at odd positions
                ids.append(self.special[chunk])
                continue
            words = [w for w in _WHITESPACE.split(chunk) if w]
            for word_ids in self.sp.encode(words):
                ids.extend(word_ids)
        if add_eos:
            ids.append(EOS_ID)
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text of `ids`. By default drops pad, EOS, unk and sentinels (transformers'
        `skip_special_tokens=True`); with False they are written out as
        `<pad>`, `</s>`, `<unk>`, `<extra_id_N>`, which is what App. B.2's
        post-processing needs to find the answer span. Ids past the tokenizer's
        vocabulary (checkpoints pad to a multiple of 128) are dropped.
        """
        pieces = []
        for i in ids:
            i = int(i)
            if i < 0 or i >= self.vocab_size:
                continue
            special = i in (PAD_ID, EOS_ID, UNK_ID) or i >= self.piece_count
            if special and skip_special_tokens:
                continue
            if i >= self.piece_count:
                pieces.append(f"<extra_id_{self.piece_count + NUM_SENTINELS - 1 - i}>")
            elif i in (PAD_ID, EOS_ID, UNK_ID):
                pieces.append(("<pad>", "</s>", "<unk>")[i])
            else:
                pieces.append(self.sp.id_to_piece(i))
        # transformers' Metaspace decoder: "▁" becomes a space, except in the first
        # piece, where it is dropped (it was the prepended word marker).
        return "".join(p.replace("▁", "") if k == 0 else p.replace("▁", " ")
                       for k, p in enumerate(pieces))
