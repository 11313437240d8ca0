"""Learning-rate schedules as a multiplier of the base rate at a point of the budget.

They take the fraction of the budget spent (``progress`` in [0, 1]) rather than a step count, so
a budget in steps, tokens or wall time drives the same curve.
"""

from __future__ import annotations

import math


def lr_multiplier(
    kind: str,
    step: int,
    progress: float,
    warmup_steps: int,
    min_ratio: float,
    decay_fraction: float,
) -> float:
    """Linear warmup over ``warmup_steps`` steps, then ``cosine`` (to ``min_ratio``),
    ``wsd`` (flat, then a linear decay to ``min_ratio`` over the last ``decay_fraction`` of the
    budget) or ``constant``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(max(progress, 0.0), 1.0)
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "wsd":
        start = 1.0 - decay_fraction
        if progress <= start or decay_fraction == 0:
            return 1.0
        return 1.0 - (1.0 - min_ratio) * (progress - start) / decay_fraction
    raise ValueError(f"unknown schedule {kind!r}")
