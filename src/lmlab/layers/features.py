"""Integrity counters: proof that an optional feature switched on in the config actually ran.

A module that implements an optional feature (a MoE router, sliding-window masking, a
Mixture-of-Depths router, ...) sets a ``feature`` name and calls ``count_call()`` each time the
feature does its work. The trainer reads the totals after every step; a feature whose counter
is still zero after the first step is an error, not a silent no-op.
"""

from __future__ import annotations

from torch import nn


class FeatureCounter:
    """Mixin for modules that implement an optional feature; ``feature`` names it in reports."""

    feature: str = ""

    def count_call(self, n: int = 1) -> None:
        self.feature_calls = getattr(self, "feature_calls", 0) + n


def feature_counters(model: nn.Module) -> dict[str, int]:
    """Total calls per feature name over every module of ``model`` that declares a feature."""
    totals: dict[str, int] = {}
    for module in model.modules():
        name = getattr(module, "feature", "")
        if isinstance(module, FeatureCounter) and name:
            totals[name] = totals.get(name, 0) + getattr(module, "feature_calls", 0)
    return totals
