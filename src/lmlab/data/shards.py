"""Pre-encoded token shards: encode a corpus once, then memory-map it in every run.

A shard folder holds ``train.bin`` and ``val.bin`` (raw little-endian token ids), ``meta.json``
(dtype, token and byte counts) and ``tokenizer/``. Reading maps the files read-only, so large
corpora cost neither encoding time nor memory at start-up.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lmlab.data.tokenizers import Tokenizer, load_tokenizer
from lmlab.data.tokens import TokenData
from lmlab.errors import LmlabError

META_FILE = "meta.json"
SPLITS = ("train", "val")
FORMAT_VERSION = 1


def is_shard_dir(path: str | Path) -> bool:
    """Whether ``path`` is a folder written by :func:`write_shards`."""
    path = Path(path)
    return (path / META_FILE).is_file() and (path / "train.bin").is_file()


def write_shards(out_dir: str | Path, data: TokenData, tokenizer: Tokenizer) -> Path:
    """Write ``data`` and ``tokenizer`` as a shard folder that ``data.path`` can point at."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = tokenizer.dtype.newbyteorder("<")
    meta: dict = {"format": FORMAT_VERSION, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size}
    for split in SPLITS:
        tokens = np.asarray(getattr(data, split))
        tokens.astype(dtype, copy=False).tofile(out / f"{split}.bin")
        meta[f"{split}_tokens"] = len(tokens)
        meta[f"{split}_bytes"] = getattr(data, f"{split}_bytes")
    tokenizer.save(out / "tokenizer")
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


def read_shards(directory: str | Path) -> tuple[TokenData, Tokenizer]:
    """Open a shard folder: token arrays as read-only ``np.memmap``, plus its tokenizer."""
    root = Path(directory)
    if not is_shard_dir(root):
        raise LmlabError(
            f"{root} is not a token-shard folder (needs {META_FILE} and train.bin); "
            "write one with lmlab.data.shards.write_shards"
        )
    try:
        meta = json.loads((root / META_FILE).read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        counts = {s: int(meta[f"{s}_tokens"]) for s in SPLITS}
        n_bytes = {s: int(meta[f"{s}_bytes"]) for s in SPLITS}
    except (ValueError, KeyError, TypeError) as e:
        raise LmlabError(f"{root / META_FILE} is damaged ({e!r}); write the shards again") from None
    arrays = {}
    for split in SPLITS:
        path = root / f"{split}.bin"
        if counts[split] == 0:
            raise LmlabError(f"{path} holds no tokens; write the shards from more text")
        expected = counts[split] * dtype.itemsize
        actual = path.stat().st_size if path.is_file() else None
        if actual != expected:
            found = "is missing" if actual is None else f"has {actual} bytes"
            raise LmlabError(
                f"{path} should hold {counts[split]} tokens ({expected} bytes) but {found}; "
                "write the shards again"
            )
        arrays[split] = np.memmap(path, dtype=dtype, mode="r", shape=(counts[split],))
    tokenizer = load_tokenizer(root / "tokenizer")
    if tokenizer.vocab_size != meta.get("vocab_size", tokenizer.vocab_size):
        raise LmlabError(
            f"{root} holds ids for {meta['vocab_size']} tokens but its tokenizer has "
            f"{tokenizer.vocab_size}; write the shards again"
        )
    data = TokenData(arrays["train"], arrays["val"], n_bytes["train"], n_bytes["val"])
    return data, tokenizer
