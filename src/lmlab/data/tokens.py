"""A corpus once encoded: the token splits that every other data module produces or reads."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class TokenData:
    """The encoded splits plus their raw UTF-8 sizes, which make losses comparable across
    tokenizers (bits per byte)."""

    train: np.ndarray
    val: np.ndarray
    train_bytes: int
    val_bytes: int

    def bits_per_byte(self, mean_nats_per_token: float, split: str = "val") -> float:
        """Convert a mean loss in nats per token of ``split`` into bits per UTF-8 byte."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        tokens = len(getattr(self, split))
        n_bytes = getattr(self, f"{split}_bytes")
        return mean_nats_per_token * tokens / n_bytes / math.log(2)
