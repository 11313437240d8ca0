"""The differential read-out of DIFF Transformer (Ye et al. 2024), shared by every mixer that
subtracts two softmax attention maps (``diff_attention``, differential ``mla``).

Given the read-outs ``A_1 V`` and ``A_2 V`` of one head's two maps:

    o_h = RMSNorm(A_1 V - lambda A_2 V) * (1 - lambda_init)
    lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init,  lambda_init = 0.8 - 0.6 exp(-0.3 (l-1))

with ``l`` the 1-based layer number and one learned lambda per layer (vectors ``lq*, lk*`` of
the width of one map's query/key, init N(0, 0.1)), as in the official code.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def lambda_init(layer_idx: int) -> float:
    """The paper's depth schedule, ``layer_idx`` 0-based (the paper's ``l - 1``)."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


class DifferentialReadout(nn.Module):
    """``forward(first, second)`` with read-outs ``[..., head_dim]`` -> the normalised
    difference; ``qk_width`` is the width of one map's query/key (the lambda vectors')."""

    def __init__(self, head_dim: int, qk_width: int, layer_idx: int, eps: float) -> None:
        super().__init__()
        self.lambda_init = lambda_init(layer_idx)
        self.lambdas = nn.Parameter(torch.empty(4, qk_width))
        self.norm = nn.RMSNorm(head_dim, eps=eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.lambdas, std=0.1)

    def current_lambda(self) -> torch.Tensor:
        """``exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init`` (re-parameterised lambda)."""
        lq1, lk1, lq2, lk2 = self.lambdas
        return torch.exp((lq1 * lk1).sum()) - torch.exp((lq2 * lk2).sum()) + self.lambda_init

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return self.norm(first - self.current_lambda() * second) * (1 - self.lambda_init)
