"""A corpus once encoded: the token splits that every other data module produces or reads."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class TokenData:
    """The encoded splits plus their raw UTF-8 sizes, which make losses comparable across
    tokenizers (bits per byte)."""

    train: np.ndarray | ShardedTokens
    val: np.ndarray | ShardedTokens
    train_bytes: int
    val_bytes: int

    def bits_per_byte(self, mean_nats_per_token: float, split: str = "val") -> float:
        """Convert a mean loss in nats per token of ``split`` into bits per UTF-8 byte."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        tokens = len(getattr(self, split))
        n_bytes = getattr(self, f"{split}_bytes")
        return mean_nats_per_token * tokens / n_bytes / math.log(2)


class ShardedTokens:
    """Several token arrays (memory-mapped shard files) read as one, without concatenating
    them: ``len`` and integer-array or slice indexing, which is all the batch samplers use, so
    a corpus of many shards never has to fit in memory. numpy has no such view, hence this."""

    def __init__(self, parts: list[np.ndarray]) -> None:
        if not parts:
            raise ValueError("ShardedTokens needs at least one array")
        self.parts = parts
        self.starts = np.cumsum([0, *(len(p) for p in parts)])
        self.dtype = parts[0].dtype

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int | slice | np.ndarray) -> np.ndarray:
        if isinstance(index, slice):
            index = np.arange(*index.indices(len(self)))
        positions = np.asarray(index, dtype=np.int64)
        flat = np.where(positions < 0, positions + len(self), positions).ravel()
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"token index out of range for {len(self)} tokens")
        which = np.searchsorted(self.starts, flat, side="right") - 1
        out = np.empty(flat.shape, dtype=self.dtype)
        for part in np.unique(which):
            chosen = which == part
            out[chosen] = self.parts[part][flat[chosen] - self.starts[part]]
        return out.reshape(positions.shape)

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        joined = np.concatenate(self.parts)
        return joined if dtype is None else joined.astype(dtype)
