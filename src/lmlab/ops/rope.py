"""Rotary position embedding (RoPE, Su et al. 2021) as pure tensor math.

Uses the "rotate halves" convention (the first and second half of each head's channels form
the pairs), which is what most open implementations use and is cheaper than interleaving.
"""

from __future__ import annotations

import torch


def rope_tables(
    positions: torch.Tensor, dim: int, theta: float = 10000.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables ``[len(positions), dim // 2]`` in float32 for the given positions."""
    if dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got {dim}")
    inv_freq = theta ** (
        -torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim
    )
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``[B, T, H, D]`` by tables of shape ``[T, D // 2]`` (one angle per
    position), ``[B, T, D // 2]`` (rows at different positions) or ``[B, T, H, D // 2]``
    (data-dependent angles per token and head: Mamba-3)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    if cos.dim() < 4:  # shared by the heads
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
