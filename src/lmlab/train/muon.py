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
    """``U S' V^T`` with ``S'`` near 1 for ``update = U S V^T``, computed in ``dtype``; a
    ``[batch, rows, cols]`` stack is orthogonalised matrix by matrix in batched matmuls."""
    a, b, c = coefficients
    x = update.to(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    if x.ndim == 2:  # torch.optim.Muon's exact operations (tested bit for bit in bf16)
        x = x / x.norm().clamp(min=eps)
        multiply_add = torch.addmm
    else:
        x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
        multiply_add = torch.baddbmm
    for _ in range(steps):
        gram = x @ x.mT
        x = multiply_add(x, multiply_add(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


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
        """Matrices of the same shape in a group (e.g. a mixture of experts' expert weights)
        are orthogonalised together in one batched iteration: on a CPU a few dozen small
        iterations one by one cost as much as the forward and backward pass."""
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            same_shape: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
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
                key = (tuple(param.shape), param.dtype, param.device)
                same_shape.setdefault(key, []).append((param, update))
            for pairs in same_shape.values():
                params, updates = zip(*pairs, strict=True)
                stacked = updates[0] if len(updates) == 1 else torch.stack(updates)
                orthogonal = newton_schulz(
                    stacked, group["ns_steps"], eps=group["eps"], dtype=self.ns_dtype
                )
                rows, cols = params[0].shape
                scale = -lr * math.sqrt(max(1, rows / cols))
                for param, update in zip(params, orthogonal.view(-1, rows, cols), strict=True):
                    param.mul_(1 - lr * group["weight_decay"])
                    param.add_(update.to(param.dtype), alpha=scale)
