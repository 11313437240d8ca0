"""Normalisations shared by several mixers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class GatedRMSNorm(nn.Module):
    """``rms_norm(x) * weight * silu(gate)`` over the last dimension (per head when the caller
    reshapes to ``[..., head_dim]``): the output norm of Gated DeltaNet and GLA (and of Mamba-2
    with ``norm_before_gate``), which keeps the readout of a growing state at unit scale and lets
    the gate switch channels off."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        exact = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = F.rms_norm(exact, (x.shape[-1],), eps=self.eps).to(x.dtype)
        return normed * self.weight * F.silu(gate)
