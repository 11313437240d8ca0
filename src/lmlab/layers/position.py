"""Position encodings that attention-style mixers share."""

from __future__ import annotations

import torch
from torch import nn

from lmlab.ops.rope import apply_rope, rope_tables


class Rotary(nn.Module):
    """RoPE with a cached table that grows on demand (decode reaches any length)."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self._cos = torch.empty(0)
        self._sin = torch.empty(0)

    def _table(self, end: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cos.shape[0] < end or self._cos.device != device:
            size = max(end, 2 * self._cos.shape[0], 256)
            positions = torch.arange(size, device=device)
            self._cos, self._sin = rope_tables(positions, self.head_dim, self.theta)
        return self._cos, self._sin

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Rotate ``x [B, T, H, D]`` whose first token sits at position ``offset``."""
        cos, sin = self._table(offset + x.shape[1], x.device)
        span = slice(offset, offset + x.shape[1])
        return apply_rope(x, cos[span], sin[span])
