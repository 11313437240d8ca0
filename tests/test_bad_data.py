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
    meta = folder / "meta.json"
    if damage == "truncated tokens":
        data = (folder / "train.bin").read_bytes()
        (folder / "train.bin").write_bytes(data[: len(data) // 2])
    elif damage == "manifest not JSON":
        meta.write_text(meta.read_text()[:10])
    elif damage == "manifest without counts":
        meta.write_text(json.dumps({"format": 1, "dtype": "uint8"}))
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


CASES = {
    "empty file": ("is empty", _file),
    "binary": ("is not UTF-8", _file),
    "latin-1": ("is not UTF-8", _file),
    "too short": ("needs at least", _file),
    "missing": ("does not exist", _file),
    "folder without text": ("no non-empty", _file),
    "truncated tokens": ("should hold", _shards),
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
