"""Byte, char and BPE tokenizers: round trips, unknown characters, saving and loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer

from lmlab.data.tokenizers import (
    META_FILE,
    TOKENIZER_FILE,
    CharTokenizer,
    load_tokenizer,
    token_dtype,
    train_tokenizer,
)
from lmlab.errors import LmlabError

TRAIN_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n"
) * 20
TRICKY = (
    "  Leading spaces,\ttabs,\n\n\n   indented\n  \nline's end 'tis 1234 numbers...\r\n"
    "caf\u00e9 \u00e6on \u4e2d\u6587 emoji \U0001f600!  \n\nx  y   z\n\u00a0nbsp \u2028sep"
)


def train_small(kind: str):
    return train_tokenizer(kind, [TRAIN_TEXT], 300)


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_lossless_kinds_round_trip_any_text(kind):
    tok = train_small(kind)
    for text in (TRAIN_TEXT, TRICKY, ""):
        ids = tok.encode_array(text)
        assert ids.dtype == np.uint16 and ids.ndim == 1
        assert tok.decode(ids) == text
        assert tok.encode(text) == ids.tolist()
        assert all(0 <= i < tok.vocab_size for i in ids.tolist())


def test_byte_tokenizer_is_utf8_bytes():
    tok = train_small("byte")
    assert tok.vocab_size == 256
    assert tok.encode("h\u00e9") == [104, 0xC3, 0xA9]
    assert tok.decode([104, 0xC3]) == "h\ufffd"


def test_char_tokenizer_vocabulary_is_training_characters():
    tok = train_small("char")
    assert tok.chars == "".join(sorted(set(TRAIN_TEXT)))
    assert tok.vocab_size == len(tok.chars) + 1
    assert tok.decode(tok.encode_array(TRAIN_TEXT)) == TRAIN_TEXT
    assert tok.encode("Before") == [tok.chars.index(c) + 1 for c in "Before"]


def test_char_tokenizer_maps_unseen_characters_to_unknown_id():
    tok = train_small("char")
    unseen = "QX\u00e9\U0001f600"
    assert not set(unseen) & set(TRAIN_TEXT)
    ids = tok.encode(f"speak {unseen}.")
    assert ids[6:10] == [CharTokenizer.unknown_id] * 4
    assert CharTokenizer.unknown_id not in ids[:6] + ids[10:]
    assert tok.decode(ids) == "speak \ufffd\ufffd\ufffd\ufffd."


def test_bpe_compresses_and_has_the_requested_vocabulary():
    tok = train_small("bpe")
    assert tok.vocab_size == 300
    assert len(tok.encode(TRAIN_TEXT)) < len(TRAIN_TEXT.encode()) / 2


def test_bpe_fast_encoding_equals_hf_whole_text_encoding(tmp_path):
    tok = train_small("bpe")
    tok.save(tmp_path)
    hf = HFTokenizer.from_file(str(tmp_path / TOKENIZER_FILE))
    for text in (TRICKY, TRAIN_TEXT + TRICKY, " a\n b\n\n c \n"):
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids


def test_bpe_fast_encoding_equals_hf_where_whitespace_runs_are_merged(tmp_path):
    """A vocabulary with merged whitespace runs ("\n\n", "\u00a0\n"): the encoder may cut the
    text only where the whole text's pre-tokens would not change."""
    runs = "ACT I\n\nSCENE 1\n\n\nEnter\u00a0\nKing \n\nExit\t\nHe  goes\n"
    tok = train_tokenizer("bpe", [runs * 200], 300)
    tok.save(tmp_path)
    hf = HFTokenizer.from_file(str(tmp_path / TOKENIZER_FILE))
    assert len(hf.encode("\n\n").ids) == 1
    for text in (runs * 3, TRICKY + runs):
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_save_load_round_trip(tmp_path, kind):
    tok = train_small(kind)
    tok.save(tmp_path / "tok")
    meta = json.loads((tmp_path / "tok" / META_FILE).read_text())
    assert meta == {"kind": kind, "vocab_size": tok.vocab_size}
    json.loads((tmp_path / "tok" / TOKENIZER_FILE).read_text())
    loaded = load_tokenizer(tmp_path / "tok")
    assert type(loaded) is type(tok) and loaded == tok and loaded.vocab_size == tok.vocab_size
    assert np.array_equal(loaded.encode_array(TRICKY), tok.encode_array(TRICKY))
    assert loaded != train_tokenizer("char" if kind != "char" else "byte", [TRAIN_TEXT], 300)


def test_different_training_text_gives_unequal_tokenizers():
    assert train_tokenizer("char", ["abc"]) != train_tokenizer("char", ["abd"])


def test_dtype_widens_only_past_uint16():
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    wide = CharTokenizer("".join(chr(0x20000 + i) for i in range(70000)))
    text = chr(0x20000) + chr(0x20000 + 69999) + "a"
    ids = wide.encode_array(text)
    assert ids.dtype == np.uint32 and ids.tolist() == [1, 70000, 0]


def test_training_errors_are_user_errors():
    with pytest.raises(LmlabError, match="unknown; use byte, char, bpe"):
        train_tokenizer("word", [TRAIN_TEXT])
    with pytest.raises(LmlabError, match="too small for BPE"):
        train_tokenizer("bpe", [TRAIN_TEXT], 200)
    with pytest.raises(LmlabError, match="empty text"):
        train_tokenizer("char", ["", ""])


def test_loading_errors_are_user_errors(tmp_path):
    with pytest.raises(LmlabError, match="no saved tokenizer"):
        load_tokenizer(tmp_path)
    train_small("bpe").save(tmp_path)
    (tmp_path / TOKENIZER_FILE).write_text('{"broken": ')
    with pytest.raises(LmlabError, match="damaged"):
        load_tokenizer(tmp_path)
    train_small("char").save(tmp_path)
    (tmp_path / META_FILE).write_text(json.dumps({"kind": "char", "vocab_size": 3}))
    with pytest.raises(LmlabError, match="inconsistent"):
        load_tokenizer(tmp_path)
