"""Integrity counters: proof that an optional feature switched on in the config actually ran.

A module that implements an optional feature (a MoE router, sliding-window masking, a
Mixture-of-Depths router, ...) sets a ``feature`` name and calls ``count_call()`` each time the
feature does its work. The trainer reads the totals after every step; a feature whose counter
is still zero after the first step is an error, not a silent no-op.

Activation checkpointing runs a block's forward a second time during backward. Everything a
forward records besides its tensors (counters, statistics, specialisation tables, the stored
``aux_loss``) must be recorded once: the block runs its recomputation inside :func:`replaying`,
and modules record only while :func:`recording` is true. The recomputation still performs the
same tensor operations, which the checkpoint requires.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn

_replay_depth = 0


@contextmanager
def replaying() -> Iterator[None]:
    """A recomputed forward (activation checkpointing): side records are switched off."""
    global _replay_depth
    _replay_depth += 1
    try:
        yield
    finally:
        _replay_depth -= 1


def recording() -> bool:
    """False while a forward is being recomputed; modules record statistics only when True."""
    return _replay_depth == 0


class FeatureCounter:
    """Mixin for modules that implement an optional feature; ``feature`` names it in reports."""

    feature: str = ""

    def count_call(self, n: int = 1) -> None:
        if recording():
            self.feature_calls = getattr(self, "feature_calls", 0) + n


def feature_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that declare a feature (collect once, read every step)."""
    return [
        m for m in model.modules() if isinstance(m, FeatureCounter) and getattr(m, "feature", "")
    ]


def feature_counters(modules: nn.Module | Iterable[nn.Module]) -> dict[str, int]:
    """Total calls per feature name over a model's feature modules (or a list of them)."""
    if isinstance(modules, nn.Module):
        modules = feature_modules(modules)
    totals: dict[str, int] = {}
    for module in modules:
        totals[module.feature] = totals.get(module.feature, 0) + getattr(module, "feature_calls", 0)
    return totals
