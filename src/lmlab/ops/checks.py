"""Argument checks shared by the recurrent cores, so every core rejects bad input alike."""

from __future__ import annotations

import torch

MODES = ("chunk", "recurrent")


def check_core_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial_state: torch.Tensor | None,
    mode: str,
    chunk_size: int,
    *,
    log_decay: torch.Tensor | None = None,
    per_head: dict[str, torch.Tensor] | None = None,
    like_q: dict[str, torch.Tensor] | None = None,
) -> None:
    """Raise ``ValueError`` naming the expected layout for the first bad argument.

    ``q, k``: ``[B, T, H, K]``; ``v``: ``[B, T, H, V]``; ``log_decay``: ``None``, ``[B, T, H]``
    or ``[B, T, H, K]``; ``per_head`` tensors (e.g. ``beta``) must be ``[B, T, H]``; ``like_q``
    tensors (e.g. RWKV-7's ``a``, ``b`` and per-channel decay) must have q's shape.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(
            f"q and k must both be [batch, time, heads, key_dim], got {tuple(q.shape)} "
            f"and {tuple(k.shape)}"
        )
    batch, time, heads, key_dim = q.shape
    if time < 1:
        raise ValueError("the core needs at least one time step, got T=0")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must be [batch, time, heads, value_dim] matching q's {(batch, time, heads)}, "
            f"got {tuple(v.shape)}"
        )
    for name, x in (per_head or {}).items():
        if x.shape != (batch, time, heads):
            raise ValueError(
                f"{name} must be [B, T, H] = {(batch, time, heads)}, got {tuple(x.shape)}"
            )
    for name, x in (like_q or {}).items():
        if x.shape != q.shape:
            raise ValueError(
                f"{name} must have the shape of q {tuple(q.shape)}, got {tuple(x.shape)}"
            )
    if log_decay is not None and log_decay.shape not in {q.shape[:3], q.shape}:
        raise ValueError(
            f"log_decay must be [batch, time, heads] = {(batch, time, heads)} or "
            f"[batch, time, heads, key_dim] = {tuple(q.shape)}, got {tuple(log_decay.shape)}"
        )
    expected = (batch, heads, key_dim, v.shape[-1])
    if initial_state is not None and tuple(initial_state.shape) != expected:
        raise ValueError(
            f"initial_state must be [batch, heads, key_dim, value_dim] = {expected}, "
            f"got {tuple(initial_state.shape)}"
        )
