"""Bad data files through ``lmlab train``: one error line, exit 2, no traceback, and no run
folder left behind (the failure happens before training, so nothing is worth keeping)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import expect_one_error, tiny_run_args

from lmlab.data.shards import write_shards
from lmlab.data.tokenizers import train_tokenizer
from lmlab.data.tokens import TokenData


def _shards(root: Path, damage: str) -> Path:
    """A valid shard folder, then damaged one way."""
    tokenizer = train_tokenizer("char", ["abcdefgh " * 50])
    tokens = tokenizer.encode_array("abcdefgh " * 50)
    folder = write_shards(root / "shards", TokenData(tokens, tokens, 450, 450), tokenizer)
    meta = folder / "manifest.json"
    if damage == "truncated tokens":
        data = (folder / "train-00000.bin").read_bytes()
        (folder / "train-00000.bin").write_bytes(data[: len(data) // 2])
    elif damage == "tokens changed":
        data = bytearray((folder / "val-00000.bin").read_bytes())
        data[10] ^= 1
        (folder / "val-00000.bin").write_bytes(bytes(data))
    elif damage == "mixed tokenizers":
        train_tokenizer("char", ["abcdefgh! " * 50]).save(folder / "tokenizer")
    elif damage == "unfinished prepare":
        meta.unlink()
        (folder / "prepare.json").write_text("{}")
    elif damage == "manifest not JSON":
        meta.write_text(meta.read_text()[:10])
    elif damage == "manifest without counts":
        meta.write_text(json.dumps({"format": 2, "dtype": "uint8"}))
    elif damage == "vocabulary differs":
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "vocab_size": 3}))
    return folder


def _file(root: Path, kind: str) -> Path:
    path = root / "data.txt"
    if kind == "empty file":
        path.write_bytes(b"")
    elif kind == "binary":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    elif kind == "latin-1":
        path.write_bytes(("café au lait " * 400).encode("latin-1"))
    elif kind == "too short":
        path.write_text("to be")
    elif kind == "missing":
        return root / "nowhere.txt"
    elif kind == "folder without text":
        path = root / "folder"
        path.mkdir()
        (path / "image.png").write_bytes(b"\x89PNG")
    return path


def _records(root: Path, kind: str) -> Path:
    """A JSONL or Parquet corpus with one fault."""
    good = [json.dumps({"text": "to be or not to be " * 20})] * 30
    path = root / "data.jsonl"
    if kind == "jsonl line not JSON":
        path.write_text("\n".join([*good[:4], '{"text": "cut off', *good]) + "\n")
    elif kind == "jsonl line without the field":
        path.write_text("\n".join([*good[:6], json.dumps({"body": "x", "id": 7}), *good]))
    elif kind == "jsonl of blank texts":
        path.write_text("\n".join([json.dumps({"text": "  "})] * 5))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = root / "data.parquet"
        pq.write_table(pa.table({"content": ["to be " * 100] * 3, "id": [1, 2, 3]}), path)
    return path


CASES = {
    "empty file": ("is empty", _file),
    "binary": ("is not UTF-8", _file),
    "latin-1": ("is not UTF-8", _file),
    "too short": ("needs at least", _file),
    "missing": ("does not exist", _file),
    "folder without text": ("no non-empty", _file),
    "jsonl line not JSON": ("data.jsonl:5 is not JSON", _records),
    "jsonl line without the field": (
        "data.jsonl:7 has no field 'text' (it has: body, id)",
        _records,
    ),
    "jsonl of blank texts": ("data.jsonl holds only blank documents", _records),
    "parquet without the column": ("has no column 'text' (its columns: content, id)", _records),
    "truncated tokens": ("should hold", _shards),
    "tokens changed": ("val-00000.bin does not match its checksum", _shards),
    "mixed tokenizers": ("mixes tokenizers", _shards),
    "unfinished prepare": ("unfinished lmlab prepare; run the same", _shards),
    "manifest not JSON": ("is damaged", _shards),
    "manifest without counts": ("is damaged", _shards),
    "vocabulary differs": ("write the shards again", _shards),
}


@pytest.mark.parametrize("kind", sorted(CASES))
def test_bad_data_is_one_line(tmp_path, capsys, kind):
    expected, make = CASES[kind]
    source = make(tmp_path, kind)
    runs = tmp_path / "runs"
    argv = tiny_run_args(source, runs, "r", "train.max_steps=1")
    expect_one_error(capsys, argv, expected)
    assert not (runs / "r").exists()
