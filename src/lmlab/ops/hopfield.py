"""Modern Hopfield retrieval (Ramsauer et al. 2021, "Hopfield Networks is All You Need").

With stored patterns ``X`` (the rows of ``patterns``) and a state pattern ``xi``, the update

    xi_new = X^T softmax(beta X xi)

minimises the modern Hopfield energy; one update retrieves a stored pattern with exponentially
small error once the patterns are well separated, and ``beta`` (inverse temperature) trades
retrieval of one pattern (large) against a mean over similar ones (small). The paper's
Hopfield layer is that update with learned projections, ``softmax(beta Q K^T) V``: attention
when ``beta = 1/sqrt(d)`` and one step.
"""

from __future__ import annotations

import torch


def hopfield_retrieve(
    query: torch.Tensor,
    patterns: torch.Tensor,
    beta: float | torch.Tensor,
    *,
    steps: int = 1,
    values: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``steps`` Hopfield updates of each state pattern ``query [..., Q, D]`` against the stored
    ``patterns [..., N, D]``; the last update reads out ``values [..., N, E]`` instead of the
    patterns when given (the Hopfield layer's projected values). ``mask [..., Q, N]`` (bool,
    True = visible) limits which patterns each query sees (causality); every query must see at
    least one. ``beta`` broadcasts against the scores ``[..., Q, N]`` (e.g. one per head).
    Returns ``[..., Q, D]`` (or ``[..., Q, E]``); softmax in at least float32."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    dtype = torch.promote_types(query.dtype, torch.float32)
    state, stored = query.to(dtype), patterns.to(dtype)
    for step in range(steps):
        scores = beta * (state @ stored.transpose(-1, -2))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        readout = stored if values is None or step < steps - 1 else values.to(dtype)
        state = scores.softmax(-1) @ readout
    return state.to(query.dtype)
