"""Muon (Jordan et al. 2024): momentum, then an approximate orthogonalisation of the update by
a quintic Newton-Schulz iteration, for 2-D weight matrices.

The algorithm, defaults and state layout are those of ``torch.optim.Muon``. The one difference:
torch always runs the Newton-Schulz matmuls in bfloat16, which on CPUs without native bf16
(AVX2 only) is about 100x slower than float32 and made Muon steps cost more than the whole
forward and backward pass. Here the iteration runs in bfloat16 only where bf16 matmuls are fast
(CUDA, AMX or AVX512-BF16 CPUs) and in float32 elsewhere; with bfloat16 it matches torch's
optimiser exactly (tested).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(
    update: torch.Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``U S' V^T`` with ``S'`` near 1 for ``update = U S V^T``, computed in ``dtype``."""
    a, b, c = coefficients
    x = update.to(dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters; ``ns_dtype`` is the precision of the Newton-Schulz iteration."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 0.02,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        eps: float = 1e-7,
        ns_dtype: torch.dtype = torch.float32,
    ) -> None:
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            eps=eps,
        )
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for param in group["params"]:
                if param.ndim != 2:
                    raise ValueError(f"Muon takes 2-D parameters only, got shape {param.shape}")

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad)
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - momentum)
                update = grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = newton_schulz(
                    update, group["ns_steps"], eps=group["eps"], dtype=self.ns_dtype
                )
                rows, cols = param.shape
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(update.to(param.dtype), alpha=-lr * math.sqrt(max(1, rows / cols)))
