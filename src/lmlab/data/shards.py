"""Pre-encoded token shards: encode a corpus once, then memory-map it in every run.

A shard folder holds ``manifest.json``, ``tokenizer/`` and one or more shard files per split
(``train-00000.bin``, ``val-00000.bin``, ...: raw little-endian token ids). The manifest lists
every shard with its split, token count, the UTF-8 bytes of the text it encodes (for bits per
byte), its SHA-256 and the checksum of the tokenizer that encoded it, plus the source it came
from. Reading checks all of these before a run uses the tokens, maps the files read-only and
presents each split as one array, so large corpora cost neither encoding time nor memory.

Folders of the first format (``meta.json``, one ``train.bin`` and ``val.bin``) are still read.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lmlab.data.tokenizers import Tokenizer, load_tokenizer, tokenizer_checksum
from lmlab.data.tokens import ShardedTokens, TokenData
from lmlab.errors import LmlabError
from lmlab.files import atomic_write_json, fsync_dir

MANIFEST_FILE = "manifest.json"
SETTINGS_FILE = "prepare.json"
"""Written first by ``lmlab prepare``; a folder with it but no manifest is an unfinished one."""
LEGACY_META_FILE = "meta.json"
SPLITS = ("train", "val")
FORMAT_VERSION = 2
_HASH_BLOCK = 1 << 23


def is_shard_dir(path: str | Path) -> bool:
    """Whether ``path`` is a shard folder (this format or the first one), finished or not."""
    path = Path(path)
    return (
        (path / MANIFEST_FILE).is_file()
        or (path / SETTINGS_FILE).is_file()
        or ((path / LEGACY_META_FILE).is_file() and (path / "train.bin").is_file())
    )


class ShardWriter:
    """One shard file written as a stream of id arrays: into a hidden temporary file, checksummed
    on the way, renamed into place only by :meth:`finish`, so a killed writer never leaves a
    file under a shard's name."""

    def __init__(self, folder: Path, name: str, dtype: np.dtype) -> None:
        self.path = folder / name
        self.tmp = folder / f".{name}.{os.getpid()}.tmp"
        self.dtype = dtype.newbyteorder("<")
        self.file = self.tmp.open("wb")
        self.hash = hashlib.sha256()
        self.tokens = 0
        self.text_bytes = 0

    def write(self, ids: np.ndarray, text_bytes: int) -> None:
        raw = np.asarray(ids).astype(self.dtype, copy=False).tobytes()
        self.file.write(raw)
        self.hash.update(raw)
        self.tokens += len(ids)
        self.text_bytes += text_bytes

    def finish(self, split: str, tokenizer_sha: str) -> dict:
        """Close, publish under the shard's name and return its manifest entry."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return {
            "file": self.path.name,
            "split": split,
            "tokens": self.tokens,
            "bytes": self.text_bytes,
            "sha256": self.hash.hexdigest(),
            "tokenizer": tokenizer_sha,
        }

    def abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def shard_problem(folder: Path, entry: dict, itemsize: int) -> str | None:
    """What is wrong with the shard file of manifest ``entry`` (missing, wrong size, wrong
    checksum), or None when it is intact."""
    path = folder / entry["file"]
    expected = int(entry["tokens"]) * itemsize
    if not path.is_file():
        return f"{path} is missing"
    actual = path.stat().st_size
    if actual != expected:
        return f"{path} should hold {entry['tokens']} tokens ({expected} bytes) but has {actual}"
    if "sha256" in entry and file_sha256(path) != entry["sha256"]:
        return f"{path} does not match its checksum (the file changed after it was written)"
    return None


def manifest(tokenizer: Tokenizer, shards: list[dict], **extra: Any) -> dict:
    """The manifest of a shard folder holding ``shards`` encoded by ``tokenizer``."""
    dtype = tokenizer.dtype.newbyteorder("<")
    totals = {
        f"{split}_{what}": sum(s[what] for s in shards if s["split"] == split)
        for split in SPLITS
        for what in ("tokens", "bytes")
    }
    return {
        "format": FORMAT_VERSION,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer": {"kind": tokenizer.kind, "sha256": tokenizer_checksum(tokenizer)},
        "shards": shards,
        **totals,
        **extra,
    }


def save_tokenizer_atomic(tokenizer: Tokenizer, folder: Path) -> None:
    """Save ``tokenizer`` as ``folder`` by renaming a finished temporary folder into place."""
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    tokenizer.save(tmp)
    os.replace(tmp, folder)
    fsync_dir(folder.parent)


def write_shards(out_dir: str | Path, data: TokenData, tokenizer: Tokenizer) -> Path:
    """Write ``data`` and ``tokenizer`` as a shard folder (one shard per split) that
    ``data.path`` can point at. ``lmlab prepare`` writes larger corpora streaming."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checksum = tokenizer_checksum(tokenizer)
    shards = []
    for split in SPLITS:
        writer = ShardWriter(out, f"{split}-00000.bin", tokenizer.dtype)
        writer.write(np.asarray(getattr(data, split)), getattr(data, f"{split}_bytes"))
        shards.append(writer.finish(split, checksum))
    save_tokenizer_atomic(tokenizer, out / "tokenizer")
    atomic_write_json(out / MANIFEST_FILE, manifest(tokenizer, shards))
    return out


def _damaged(root: Path, problem: object) -> LmlabError:
    return LmlabError(f"{root / MANIFEST_FILE} is damaged ({problem}); write the shards again")


def _read_manifest(root: Path) -> tuple[dict, np.dtype]:
    try:
        meta = json.loads((root / MANIFEST_FILE).read_text(encoding="utf-8"))
        if meta["format"] != FORMAT_VERSION:
            raise _damaged(root, f"format {meta['format']!r}, this lmlab reads {FORMAT_VERSION}")
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        bad = [
            entry["file"]
            for entry in meta["shards"]
            if entry["split"] not in SPLITS
            or min(int(entry["tokens"]), int(entry["bytes"])) < 0
            or not isinstance(entry["sha256"], str)
        ]
        if bad or not isinstance(meta["tokenizer"]["sha256"], str):
            raise _damaged(root, f"bad entries for {', '.join(bad) or 'the tokenizer'}")
        meta["vocab_size"] = int(meta["vocab_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise _damaged(root, repr(e)) from None
    return meta, dtype


def _check_tokenizers(root: Path, meta: dict, tokenizer: Tokenizer) -> None:
    """Every shard and the saved tokenizer must agree on one tokenizer (mixed ids would train a
    model on meaningless tokens)."""
    saved = tokenizer_checksum(tokenizer)
    for entry in meta["shards"]:
        if entry.get("tokenizer") != saved or meta["tokenizer"]["sha256"] != saved:
            raise LmlabError(
                f"{root} mixes tokenizers: {entry['file']} was not encoded with the tokenizer in "
                f"{root / 'tokenizer'}; prepare the corpus again into an empty folder"
            )
    if tokenizer.vocab_size != meta["vocab_size"]:
        raise LmlabError(
            f"{root} holds ids for {meta['vocab_size']} tokens but its tokenizer has "
            f"{tokenizer.vocab_size}; write the shards again"
        )


def _map(root: Path, entries: Iterator[dict], dtype: np.dtype) -> list[np.ndarray]:
    arrays = []
    for entry in entries:
        problem = shard_problem(root, entry, dtype.itemsize)
        if problem:
            raise LmlabError(f"{problem}; write the shards again (lmlab prepare resumes)")
        if entry["tokens"]:
            path = root / entry["file"]
            arrays.append(np.memmap(path, dtype=dtype, mode="r", shape=(int(entry["tokens"]),)))
    return arrays


def read_shards(directory: str | Path) -> tuple[TokenData, Tokenizer]:
    """Open a shard folder after checking its manifest (sizes, checksums, one tokenizer): each
    split as a read-only ``np.memmap`` (one shard) or :class:`ShardedTokens` (several)."""
    root = Path(directory)
    if not is_shard_dir(root):
        raise LmlabError(
            f"{root} is not a token-shard folder (needs {MANIFEST_FILE}); write one with "
            "lmlab prepare"
        )
    if not (root / MANIFEST_FILE).is_file():
        if (root / SETTINGS_FILE).is_file():
            raise LmlabError(
                f"{root} is an unfinished lmlab prepare; run the same lmlab prepare command "
                "again to finish it"
            )
        return _read_legacy(root)
    meta, dtype = _read_manifest(root)
    tokenizer = load_tokenizer(root / "tokenizer")
    _check_tokenizers(root, meta, tokenizer)
    splits, n_bytes = {}, {}
    for split in SPLITS:
        arrays = _map(root, (e for e in meta["shards"] if e["split"] == split), dtype)
        if not arrays:
            raise LmlabError(f"the {split} split of {root} holds no tokens; prepare more text")
        splits[split] = arrays[0] if len(arrays) == 1 else ShardedTokens(arrays)
        n_bytes[split] = sum(int(e["bytes"]) for e in meta["shards"] if e["split"] == split)
    data = TokenData(splits["train"], splits["val"], n_bytes["train"], n_bytes["val"])
    return data, tokenizer


def _read_legacy(root: Path) -> tuple[TokenData, Tokenizer]:
    """A folder of the first format: ``meta.json`` with counts, ``train.bin``, ``val.bin`` (no
    checksums, so only sizes are checked)."""
    try:
        meta = json.loads((root / LEGACY_META_FILE).read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        entries = {s: {"file": f"{s}.bin", "tokens": int(meta[f"{s}_tokens"])} for s in SPLITS}
        n_bytes = {s: int(meta[f"{s}_bytes"]) for s in SPLITS}
    except (ValueError, KeyError, TypeError) as e:
        raise LmlabError(
            f"{root / LEGACY_META_FILE} is damaged ({e!r}); write the shards again"
        ) from None
    arrays = {}
    for split, entry in entries.items():
        if entry["tokens"] == 0:
            raise LmlabError(f"{root / entry['file']} holds no tokens; write the shards again")
        arrays[split] = _map(root, iter([entry]), dtype)[0]
    tokenizer = load_tokenizer(root / "tokenizer")
    if tokenizer.vocab_size != meta.get("vocab_size", tokenizer.vocab_size):
        raise LmlabError(
            f"{root} holds ids for {meta['vocab_size']} tokens but its tokenizer has "
            f"{tokenizer.vocab_size}; write the shards again"
        )
    data = TokenData(arrays["train"], arrays["val"], n_bytes["train"], n_bytes["val"])
    return data, tokenizer
