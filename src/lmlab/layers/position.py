"""Position encodings that attention-style mixers share."""

from __future__ import annotations

import math

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

    def forward(self, x: torch.Tensor, offset: int | torch.Tensor = 0) -> torch.Tensor:
        """Rotate ``x [B, T, H, D]`` whose first token sits at position ``offset``, or at
        ``offset[b]`` in row ``b`` for a tensor ``offset [B]`` (rows of different lengths)."""
        if isinstance(offset, torch.Tensor):
            positions = offset[:, None] + torch.arange(x.shape[1], device=offset.device)
            cos, sin = self._table(int(positions.max()) + 1, x.device)
            return apply_rope(x, cos[positions], sin[positions])
        cos, sin = self._table(offset + x.shape[1], x.device)
        span = slice(offset, offset + x.shape[1])
        return apply_rope(x, cos[span], sin[span])


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al. 2022): the geometric sequence ``2^(-8 i / n)`` for a power
    of two ``n``; otherwise the closest smaller power of two, completed with every other slope
    of the next power of two, as in the paper's reference code."""

    def geometric(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    base = 2 ** math.floor(math.log2(n_heads))
    slopes = geometric(base) + geometric(2 * base)[0::2][: n_heads - base]
    return torch.tensor(slopes)


class CoPE(nn.Module):
    """Contextual position encoding (Golovneva et al. 2024).

    A key's position relative to a query is the number of "counted" tokens between them:
    ``p_ij = sum_{t=j..i} sigmoid(q_i . k_t)``, fractional, so the logit term ``q_i . e[p_ij]``
    interpolates between the two nearest of ``max_positions`` learned embeddings (shared by the
    heads, as in the paper's code). Positions are clamped to ``max_positions - 1``.
    """

    def __init__(self, head_dim: int, max_positions: int) -> None:
        super().__init__()
        self.max_positions = max_positions
        self.embedding = nn.Parameter(torch.zeros(head_dim, max_positions))

    def forward(self, q: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The position term for ``q [B, H, Tq, D]`` and masked ``logits [B, H, Tq, Tk]``
        (masked entries ``-inf`` so their gate is zero)."""
        gates = torch.sigmoid(logits)
        positions = gates.flip(-1).cumsum(-1).flip(-1).clamp(max=self.max_positions - 1)
        floor = positions.detach().floor()
        per_position = q @ self.embedding.to(q.dtype)
        low = per_position.gather(-1, floor.long())
        high = per_position.gather(-1, floor.long().add(1).clamp(max=self.max_positions - 1))
        weight = positions - floor
        return low + weight * (high - low)
