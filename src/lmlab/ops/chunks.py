"""A token stream cut into aligned chunks, for the cores whose state carries an open chunk from
one call to the next (TTT-Linear's mini-batches, the Titans memory's chunks): the stream is
padded in front by the open chunk's tokens and at the end to whole chunks, so every loop step
is one aligned chunk, and the padding is dropped from the outputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AlignedChunks:
    """``length`` new tokens after ``seen`` tokens of an open chunk, in chunks of ``size``."""

    length: int
    seen: int
    size: int

    @property
    def back(self) -> int:
        """Padding tokens after the stream, up to a whole chunk."""
        return -(self.seen + self.length) % self.size

    @property
    def count(self) -> int:
        return (self.seen + self.length + self.back) // self.size

    @property
    def next_seen(self) -> int:
        """Tokens of the chunk left open after the stream."""
        return (self.seen + self.length) % self.size

    def closes(self, index: int) -> bool:
        """Whether chunk ``index`` ends with a real token (the last one may end in padding)."""
        return index < self.count - 1 or self.back == 0

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, H, *]`` -> ``[N, B, H, C, *]``, zero-padded."""
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, 0, self.seen, self.back))
        return x.unflatten(1, (self.count, self.size)).movedim(1, 0).transpose(2, 3)

    def merge(self, chunks: list[torch.Tensor]) -> torch.Tensor:
        """Per-chunk outputs ``[B, H, C, *]`` -> ``[B, T, H, *]`` without the padding."""
        stacked = torch.stack(chunks).transpose(2, 3).movedim(0, 1).flatten(1, 2)
        return stacked[:, self.seen : self.seen + self.length]
