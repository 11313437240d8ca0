"""The model-level state: one entry per layer, whatever each mixer carries.

Mixers own the format of their entry (a KV cache for attention, a matrix state for recurrent
mixers, a convolution tail); this object only holds them, counts tokens, and provides the
operations that generation and truncated BPTT need without knowing any mixer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map


@dataclass
class ModelState:
    """Per-layer mixer states plus the number of tokens they have consumed."""

    layers: list[Any] = field(default_factory=list)
    position: int = 0

    def detach(self) -> ModelState:
        """Cut the autograd graph (truncated BPTT) but keep the values."""
        detached = tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, self.layers)
        return ModelState(detached, self.position)

    def nbytes(self) -> int:
        """Memory held by the state (for decode-memory reports)."""
        leaves, _ = tree_flatten(self.layers)
        return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))
