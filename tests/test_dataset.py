"""prepare_data, bits per byte, the three batch samplers and token shards."""

from __future__ import annotations

import itertools
import json
import math
import time

import numpy as np
import pytest
import torch

from lmlab.config.schema import DataConfig
from lmlab.data.corpus import join_documents, read_text_source, split_documents
from lmlab.data.dataset import (
    TokenData,
    eval_batches,
    prepare_data,
    random_batch,
    sequential_batch,
    stream_length,
)
from lmlab.data.shards import read_shards, write_shards
from lmlab.data.tokenizers import ByteTokenizer, CharTokenizer, train_tokenizer
from lmlab.errors import LmlabError

TOKENS = np.arange(1000, dtype=np.uint16)


@pytest.fixture
def two_files(tmp_path):
    """A folder whose small file holds characters the big one lacks, and goes to validation."""
    (tmp_path / "big.txt").write_text("ab ba\n" * 150)
    (tmp_path / "small.txt").write_text("ab \u20ac\n" * 48)
    return tmp_path


def test_embedded_corpus_with_char_tokenizer_is_fast_and_consistent():
    start = time.perf_counter()
    data, tok = prepare_data(DataConfig(seq_len=64))
    assert time.perf_counter() - start < 5
    assert isinstance(tok, CharTokenizer) and data.train.dtype == np.uint16
    assert data.train_bytes + data.val_bytes > 5_000_000
    assert 0.08 < data.val_bytes / (data.train_bytes + data.val_bytes) < 0.12
    assert tok.vocab_size < 100 and 0.99 < len(data.train) / data.train_bytes <= 1
    assert tok.decode(data.val[:200]) in tok.decode(data.val)
    assert "Exeunt" in tok.decode(data.train[:200_000])


def test_tokenizer_is_trained_on_the_train_split_only(two_files):
    cfg = DataConfig(path=str(two_files), val_fraction=0.2, seq_len=8)
    data, tok = prepare_data(cfg)
    train_docs, val_docs = split_documents(read_text_source(two_files), 0.2, "auto", 0)
    assert [d.name for d in val_docs] == ["small.txt"]
    train_text, val_text = join_documents(train_docs), join_documents(val_docs)
    assert tok.chars == "".join(sorted(set(train_text)))
    assert data.val.tolist().count(CharTokenizer.unknown_id) == val_text.count("\u20ac") == 48
    assert data.train_bytes == len(train_text.encode()) and data.val_bytes == len(val_text.encode())
    assert data.val_bytes == len(val_text) + 2 * 48


def test_given_tokenizer_is_used_not_retrained(two_files):
    given = ByteTokenizer()
    data, tok = prepare_data(DataConfig(path=str(two_files), tokenizer="char", seq_len=8), given)
    assert tok is given
    assert len(data.val) == data.val_bytes and len(data.train) == data.train_bytes


def test_bpe_through_prepare_data(two_files):
    cfg = DataConfig(path=str(two_files), tokenizer="bpe", vocab_size=270, seq_len=8)
    data, tok = prepare_data(cfg)
    assert tok.kind == "bpe" and len(data.train) < data.train_bytes
    assert tok.decode(data.val) == join_documents([read_text_source(two_files)[1]])


def test_split_too_short_for_a_sequence_names_the_count(two_files):
    with pytest.raises(LmlabError, match=r"validation split has \d+ tokens.*smaller data\.seq_len"):
        prepare_data(DataConfig(path=str(two_files), val_fraction=0.2, seq_len=500))
    with pytest.raises(LmlabError, match="has 1000 tokens but needs at least 1001"):
        random_batch(TOKENS, 0, 2, 1000, 0)


def test_bits_per_byte_on_a_known_case():
    data = TokenData(np.zeros(300, np.uint16), np.zeros(50, np.uint16), 600, 100)
    assert data.bits_per_byte(math.log(2)) == pytest.approx(0.5)
    assert data.bits_per_byte(math.log(4), split="train") == pytest.approx(1.0)
    assert data.bits_per_byte(1.0) == pytest.approx(0.5 / math.log(2))


def test_random_batch_is_deterministic_per_step_and_shifted():
    x, y = random_batch(TOKENS, 7, 8, 16, seed=3)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (8, 16)
    assert torch.equal(y, x + 1)  # TOKENS[i] == i, so the next token is x + 1
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert int(y.max()) <= 999
    for step in (0, 100, 3):
        random_batch(TOKENS, step, 8, 16, seed=3)
    x_again, _ = random_batch(TOKENS, 7, 8, 16, seed=3)
    assert torch.equal(x, x_again)
    assert not torch.equal(x, random_batch(TOKENS, 8, 8, 16, seed=3)[0])
    assert not torch.equal(x, random_batch(TOKENS, 7, 8, 16, seed=4)[0])


def test_random_batch_reads_memmap(tmp_path):
    path = tmp_path / "t.bin"
    TOKENS.tofile(path)
    mapped = np.memmap(path, dtype=np.uint16, mode="r")
    assert torch.equal(random_batch(mapped, 1, 4, 8, 0)[0], random_batch(TOKENS, 1, 4, 8, 0)[0])


def test_sequential_batch_continues_each_row_stream():
    batch = 4
    stream = stream_length(len(TOKENS), batch, 10)
    assert stream == len(TOKENS) // batch
    x0, y0 = sequential_batch(TOKENS, 0, batch, 10)
    assert x0[:, 0].tolist() == [b * stream for b in range(batch)]
    assert torch.equal(y0, x0 + 1)
    offset = 0
    for seq_len in (10, 10, 7, 13, 10):  # a curriculum may change the length between steps
        x, y = sequential_batch(TOKENS, offset, batch, seq_len)
        x_next, _ = sequential_batch(TOKENS, offset + seq_len, batch, 10)
        assert torch.equal(x_next[:, 0], y[:, -1])
        for b in range(batch):
            assert b * stream <= int(x[b].min()) and int(y[b].max()) < (b + 1) * stream
        offset += seq_len
    with pytest.raises(ValueError, match="runs past the stream"):
        sequential_batch(TOKENS, stream - 10, batch, 10)


def test_sequential_batch_with_too_many_rows_is_a_user_error():
    with pytest.raises(LmlabError, match="each of 100 rows has 10 tokens"):
        sequential_batch(TOKENS, 0, 100, 16)


def test_eval_batches_are_fixed_spread_and_disjoint():
    batches = list(eval_batches(TOKENS, 4, 16, max_batches=3))
    assert len(batches) == 3 and all(x.shape == (4, 16) for x, _ in batches)
    again = list(eval_batches(TOKENS, 4, 16, max_batches=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    starts = sorted(int(x[i, 0]) for x, _ in batches for i in range(len(x)))
    assert starts[0] == 0 and starts[-1] > 850
    assert all(b - a >= 16 for a, b in itertools.pairwise(starts))
    assert all(torch.equal(y, x + 1) for x, y in batches)


def test_eval_batches_cover_a_short_split_once():
    batches = list(eval_batches(TOKENS[:100], 4, 16, max_batches=10))
    assert [len(x) for x, _ in batches] == [4, 2]
    starts = [int(s) for x, _ in batches for s in x[:, 0]]
    assert starts == [0, 16, 32, 48, 64, 80]


def test_shards_round_trip_through_memmap(tmp_path, two_files):
    data, tok = prepare_data(DataConfig(path=str(two_files), seq_len=8))
    write_shards(tmp_path / "shards", data, tok)
    meta = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert meta["dtype"] == "uint16" and meta["train_tokens"] == len(data.train)
    assert (tmp_path / "shards" / "train-00000.bin").stat().st_size == 2 * len(data.train)
    loaded, loaded_tok = read_shards(tmp_path / "shards")
    assert isinstance(loaded.train, np.memmap) and isinstance(loaded.val, np.memmap)
    assert np.array_equal(loaded.train, data.train) and np.array_equal(loaded.val, data.val)
    assert (loaded.train_bytes, loaded.val_bytes) == (data.train_bytes, data.val_bytes)
    assert loaded_tok == tok
    with pytest.raises(ValueError):
        loaded.train[0] = 1


def test_wide_vocabulary_shards_use_uint32(tmp_path):
    tok = CharTokenizer("".join(chr(0x20000 + i) for i in range(70000)))
    ids = np.array([0, 69999, 70000, 5], dtype=np.uint32)
    write_shards(tmp_path, TokenData(ids, ids[:2], 16, 8), tok)
    loaded, _ = read_shards(tmp_path)
    assert loaded.train.dtype == np.uint32 and loaded.train.tolist() == ids.tolist()


def test_prepare_data_uses_a_shard_folder_and_ignores_tokenizer_settings(tmp_path, two_files):
    data, tok = prepare_data(DataConfig(path=str(two_files), seq_len=8))
    write_shards(tmp_path / "shards", data, tok)
    cfg = DataConfig(path=str(tmp_path / "shards"), tokenizer="bpe", vocab_size=5000, seq_len=8)
    loaded, loaded_tok = prepare_data(cfg)
    assert loaded_tok == tok and np.array_equal(loaded.train, data.train)
    assert prepare_data(cfg, tok)[1] == tok
    with pytest.raises(LmlabError, match="different tokenizer"):
        prepare_data(cfg, ByteTokenizer())
    with pytest.raises(LmlabError, match="training split has 900 tokens"):
        prepare_data(DataConfig(path=str(tmp_path / "shards"), seq_len=10_000))


def test_damaged_shards_are_user_errors(tmp_path):
    tok = train_tokenizer("byte", [])
    data = TokenData(np.arange(40, dtype=np.uint16), np.arange(20, dtype=np.uint16), 40, 20)
    with pytest.raises(LmlabError, match="not a token-shard folder"):
        read_shards(tmp_path)
    write_shards(tmp_path, data, tok)
    (tmp_path / "val-00000.bin").write_bytes(b"\x00" * 7)
    with pytest.raises(LmlabError, match="should hold 20 tokens"):
        read_shards(tmp_path)
    (tmp_path / "val-00000.bin").write_bytes(b"\x01" * 40)
    with pytest.raises(LmlabError, match="does not match its checksum"):
        read_shards(tmp_path)
    (tmp_path / "val-00000.bin").unlink()
    with pytest.raises(LmlabError, match="is missing"):
        read_shards(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(LmlabError, match="damaged"):
        read_shards(tmp_path)
