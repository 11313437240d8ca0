"""Byte, character and byte-level BPE tokenizers behind one small interface.

All three encode straight to numpy arrays, because the dataset keeps whole splits as token arrays
and a Python loop per character would make the full corpus take seconds to encode. They save as
plain JSON (``tokenizer.json`` + ``tokenizer_meta.json``) so a run folder never holds a pickle.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lmlab.errors import LmlabError
from lmlab.files import atomic_write_text

KINDS = ("byte", "char", "bpe")
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "tokenizer_meta.json"
UNKNOWN_CHAR = "\ufffd"
"""What the char tokenizer's unknown id decodes to."""

_BPE_BOUNDARY = re.compile(r"(?= [!-~])|(?<=[!-~]\n)(?=[!-~])")
"""Places where a byte-level (GPT-2 regex) pre-token always starts and where cutting changes no
pre-token: before a space followed by a visible ASCII character, and after a newline that sits
between two visible ASCII characters. (After a newline that ends a longer whitespace run, such
as the second of "\n\nby", the whole text's run splits as "\n", "\n" while a piece ending
in it keeps "\n\n": no cut there.) BPE merges never cross a pre-token, so encoding the pieces
cut here gives exactly the ids of encoding the whole text."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id below ``vocab_size``."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class Tokenizer(ABC):
    """Maps text to ids and back; ``vocab_size`` is the size the model's embedding needs.

    Special tokens (a chat template's role markers) are strings that encode to one id each,
    appended after the base vocabulary: ``with_special_tokens`` adds them. One mechanism serves
    all three kinds (the byte and char tokenizers are lmlab's own, and HF's added tokens would
    give BPE another id layout), so a fine-tuned run's new ids are always the last rows of its
    embedding, after the parent's."""

    kind: str
    special_tokens: tuple[str, ...] = ()
    decodes_piecewise: bool = True
    """Whether the text of ``ids + more`` is always the text of ``ids`` followed by that of
    ``more`` once ``ids`` ends on a whole character (bytes, characters, byte-level BPE): a
    streaming server may then decode only the new tokens. Not so for a decoder that strips or
    rewrites (SentencePiece's leading space), which an imported tokenizer may have."""

    @property
    def vocab_size(self) -> int:
        return self.base_vocab_size + len(self.special_tokens)

    @property
    @abstractmethod
    def base_vocab_size(self) -> int:
        """The vocabulary without special tokens."""

    @abstractmethod
    def _encode_plain(self, text: str) -> np.ndarray:
        """Ids of text holding no special token."""

    @abstractmethod
    def _decode_plain(self, ids: Sequence[int] | np.ndarray) -> str: ...

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of ``text`` as a 1-D array of :attr:`dtype` (a special token's string
        anywhere in ``text`` becomes its one id)."""
        if not self.special_tokens:
            return self._encode_plain(text)
        pieces = self._special_pattern().split(text)
        parts = [
            np.array([self.special_id(piece)], dtype=self.dtype)
            if i % 2
            else self._encode_plain(piece).astype(self.dtype)
            for i, piece in enumerate(pieces)
            if piece
        ]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=self.dtype)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        ids = np.asarray(ids, dtype=np.int64)
        base = self.base_vocab_size
        special = np.flatnonzero(ids >= base)
        if not len(special):
            return self._decode_plain(ids)
        text, start = [], 0
        for index in special:
            text.append(self._decode_plain(ids[start:index]))
            text.append(self.special_tokens[ids[index] - base])
            start = index + 1
        text.append(self._decode_plain(ids[start:]))
        return "".join(text)

    def special_id(self, token: str) -> int:
        return self.base_vocab_size + self.special_tokens.index(token)

    def _special_pattern(self) -> re.Pattern:
        longest_first = sorted(self.special_tokens, key=len, reverse=True)
        return re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")

    def with_special_tokens(self, tokens: Sequence[str]) -> Tokenizer:
        """This tokenizer with ``tokens`` added (those it has already keep their ids)."""
        new = [t for t in dict.fromkeys(tokens) if t not in self.special_tokens]
        if any(not t for t in new):
            raise LmlabError("a special token cannot be the empty string")
        copy = type(self)._from_state(self._state())
        copy.special_tokens = (*self.special_tokens, *new)
        return copy

    @abstractmethod
    def _state(self) -> str:
        """The JSON text saved as ``tokenizer.json``; enough to rebuild the tokenizer."""

    @classmethod
    @abstractmethod
    def _from_state(cls, state: str) -> Tokenizer: ...

    @property
    def dtype(self) -> np.dtype:
        return token_dtype(self.vocab_size)

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def unknown_count(self, ids: np.ndarray) -> int:
        """How many of ``ids`` stand for text the tokenizer could not represent (lossless
        tokenizers: none)."""
        return 0

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / TOKENIZER_FILE, self._state())
        meta: dict = {"kind": self.kind, "vocab_size": self.vocab_size}
        if self.special_tokens:
            meta["special_tokens"] = list(self.special_tokens)
        atomic_write_text(directory / META_FILE, json.dumps(meta, indent=2) + "\n")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and tokenizer_state(other) == tokenizer_state(self)

    def __hash__(self) -> int:
        return hash(tokenizer_state(self))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids: no training, never an unknown token, but the longest sequences."""

    kind = "byte"

    @property
    def base_vocab_size(self) -> int:
        return 256

    def _encode_plain(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(self.dtype)

    def _decode_plain(self, ids: Sequence[int] | np.ndarray) -> str:
        return bytes(np.asarray(ids).tolist()).decode("utf-8", errors="replace")

    def _state(self) -> str:
        return json.dumps({"kind": self.kind})

    @classmethod
    def _from_state(cls, state: str) -> ByteTokenizer:
        return cls()


class CharTokenizer(Tokenizer):
    """One id per character seen in training; id 0 is reserved for any character not seen.

    Encoding goes through a numpy lookup table indexed by code point, so a whole corpus is
    encoded in one vectorised pass.
    """

    kind = "char"
    unknown_id = 0

    def __init__(self, chars: str) -> None:
        if len(set(chars)) != len(chars):
            raise LmlabError("char tokenizer vocabulary has repeated characters; retrain it")
        self.chars = "".join(sorted(chars))
        points = np.array([ord(c) for c in self.chars], dtype=np.int64)
        self._lookup = np.full(int(points.max(initial=0)) + 1, self.unknown_id, dtype=self.dtype)
        self._lookup[points] = np.arange(1, len(points) + 1)
        self._points = np.concatenate([[ord(UNKNOWN_CHAR)], points]).astype("<u4")

    @property
    def base_vocab_size(self) -> int:
        return len(self.chars) + 1

    def _encode_plain(self, text: str) -> np.ndarray:
        points = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        known = points < len(self._lookup)
        ids = self._lookup[np.where(known, points, 0)]
        ids[~known] = self.unknown_id
        return ids

    def _decode_plain(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._points[np.asarray(ids, dtype=np.int64)].tobytes().decode("utf-32-le")

    def unknown_count(self, ids: np.ndarray) -> int:
        return int(np.count_nonzero(np.asarray(ids) == self.unknown_id))

    def _state(self) -> str:
        return json.dumps({"kind": self.kind, "unknown_id": self.unknown_id, "chars": self.chars})

    @classmethod
    def _from_state(cls, state: str) -> CharTokenizer:
        return cls(json.loads(state)["chars"])


class BpeTokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style) from the HF ``tokenizers`` package: lossless on any text."""

    kind = "bpe"

    def __init__(self, hf_tokenizer) -> None:
        self._tok = hf_tokenizer
        state = json.loads(hf_tokenizer.to_str())
        self._splits_at_words = _is_gpt2_byte_level(state)
        self.decodes_piecewise = (state.get("decoder") or {}).get("type") == "ByteLevel"

    @property
    def base_vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def _encode_plain(self, text: str) -> np.ndarray:
        """Encode each distinct word once, then gather: text repeats words so much that this is
        several times faster than encoding the text itself. A tokenizer made elsewhere (an
        imported model's) whose pre-tokenizer may join those pieces encodes the whole text."""
        if not self._splits_at_words:
            ids = self._tok.encode(text, add_special_tokens=False).ids
            return np.asarray(ids, dtype=self.dtype)
        pieces = _BPE_BOUNDARY.split(text)
        unique: dict[str, int] = {}
        which = np.fromiter(
            (unique.setdefault(p, len(unique)) for p in pieces), dtype=np.int64, count=len(pieces)
        )
        encodings = self._tok.encode_batch_fast(list(unique), add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(unique))
        flat = np.fromiter((i for e in encodings for i in e.ids), dtype=self.dtype)
        piece_lengths = lengths[which]
        source_starts = (np.cumsum(lengths) - lengths)[which]
        out_starts = np.cumsum(piece_lengths) - piece_lengths
        positions = np.repeat(source_starts - out_starts, piece_lengths)
        return flat[positions + np.arange(len(positions))]

    def _decode_plain(self, ids: Sequence[int] | np.ndarray) -> str:
        return self._tok.decode(np.asarray(ids).tolist(), skip_special_tokens=False)

    def _state(self) -> str:
        return self._tok.to_str()

    @classmethod
    def _from_state(cls, state: str) -> BpeTokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(state))


def _is_gpt2_byte_level(state: dict) -> bool:
    """Whether a tokenizer's pre-tokens always start at :data:`_BPE_BOUNDARY`: no normaliser,
    and the byte-level pre-tokenizer with GPT-2's regex (what lmlab trains)."""
    pre = state.get("pre_tokenizer") or {}
    return (
        state.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space", False)
    )


_CLASSES: dict[str, type[Tokenizer]] = {
    "byte": ByteTokenizer,
    "char": CharTokenizer,
    "bpe": BpeTokenizer,
}


def warn_unknown(tokenizer: Tokenizer, encoded: Sequence[np.ndarray], what: str) -> None:
    """One stderr line when ``encoded`` (the arrays encoding ``what``) holds unknown ids: they
    would otherwise silently stand for every character the vocabulary lacks."""
    report_unknown(tokenizer, sum(tokenizer.unknown_count(ids) for ids in encoded), what)


def report_unknown(tokenizer: Tokenizer, count: int, what: str) -> None:
    """The line of :func:`warn_unknown` for ``count`` unknown characters (none: silent)."""
    if count:
        print(
            f"warning: {count} character(s) of {what} are not in the {tokenizer.kind} "
            "tokenizer's vocabulary; they all become its one unknown id",
            file=sys.stderr,
        )


def tokenizer_state(tokenizer: Tokenizer) -> tuple[str, str]:
    """``(kind, state)``: two strings that rebuild the tokenizer (for files that carry it); a
    tokenizer with special tokens wraps its base state with them."""
    if not tokenizer.special_tokens:
        return tokenizer.kind, tokenizer._state()
    return tokenizer.kind, json.dumps(
        {"base": tokenizer._state(), "special_tokens": list(tokenizer.special_tokens)}
    )


def tokenizer_checksum(tokenizer: Tokenizer) -> str:
    """SHA-256 of the tokenizer's saved state: equal checksums mean equal ids (a run's
    checkpoints, token shards, retrieval stores and drafts are checked with it)."""
    kind, state = tokenizer_state(tokenizer)
    return hashlib.sha256(f"{kind}\n{state}".encode()).hexdigest()


def tokenizer_from_state(kind: str, state: str) -> Tokenizer:
    """The tokenizer that ``tokenizer_state`` described; ValueError if it cannot be rebuilt."""
    if kind not in _CLASSES:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    wrapped = json.loads(state) if state.startswith('{"base"') else None
    if wrapped is None:
        return _CLASSES[kind]._from_state(state)
    return (
        _CLASSES[kind]._from_state(wrapped["base"]).with_special_tokens(wrapped["special_tokens"])
    )


def _train_bpe(texts: list[str], vocab_size: int) -> BpeTokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return BpeTokenizer(tok)


def train_tokenizer(kind: str, texts: list[str], vocab_size: int = 1000) -> Tokenizer:
    """A tokenizer of ``kind`` fitted to ``texts`` (``vocab_size`` is used by ``bpe`` only).

    A BPE vocabulary can come out smaller than ``vocab_size`` when the texts run out of merges.
    """
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        chars = set().union(*map(set, texts))
        if not chars:
            raise LmlabError("cannot train a char tokenizer on empty text; give data.path text")
        return CharTokenizer("".join(chars))
    if kind == "bpe":
        if vocab_size <= 256:
            raise LmlabError(
                f"data.vocab_size={vocab_size} is too small for BPE: the 256 byte tokens come "
                "first, so use at least 257 (e.g. 1000)"
            )
        return _train_bpe(texts, vocab_size)
    raise LmlabError(f"data.tokenizer={kind!r} is unknown; use {', '.join(KINDS)}")


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """The tokenizer saved by :meth:`Tokenizer.save` in ``directory``."""
    directory = Path(directory)
    meta_path, state_path = directory / META_FILE, directory / TOKENIZER_FILE
    if not meta_path.is_file() or not state_path.is_file():
        raise LmlabError(
            f"no saved tokenizer in {directory} (needs {META_FILE} and {TOKENIZER_FILE}); "
            "point at a run or shard folder written by lmlab"
        )
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        kind = meta["kind"]
        tokenizer = _CLASSES[kind]._from_state(state_path.read_text(encoding="utf-8"))
        tokenizer = tokenizer.with_special_tokens(meta.get("special_tokens", []))
    except Exception as e:  # the HF parser raises bare Exception on a damaged file
        raise LmlabError(f"the tokenizer in {directory} is damaged ({e!r}); re-create it") from None
    if tokenizer.vocab_size != meta.get("vocab_size"):
        raise LmlabError(
            f"the tokenizer in {directory} has {tokenizer.vocab_size} tokens but its "
            f"{META_FILE} says {meta.get('vocab_size')}; the folder is inconsistent, re-create it"
        )
    return tokenizer
