"""Unit lower-triangular solves for the chunked delta rules (the WY / UT transform)."""

from __future__ import annotations

import torch


def unit_lower_solve(a: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``(I + A)^{-1} R`` for strictly lower ``A`` (``[..., C, C]``; diagonal and upper part
    ignored) and ``R``: ``[..., C, D]``, differentiable in both."""
    return _UnitLowerSolve.apply(a, rhs)


class _UnitLowerSolve(torch.autograd.Function):
    """Forms the inverse ``T`` once so that both passes are plain matmuls: batched triangular
    solves are several times slower than matmuls on CPU, and the inverse has only ``C`` columns
    where ``R`` may have many. ``dR = T^T dX``, ``dA = -tril(dR X^T)``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, a: torch.Tensor, rhs: torch.Tensor
    ) -> torch.Tensor:
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
        inv = torch.linalg.solve_triangular(a, eye, upper=False, unitriangular=True)
        x = inv @ rhs
        ctx.save_for_backward(inv, x)
        return x

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inv, x = ctx.saved_tensors
        grad_rhs = inv.mT @ grad_x
        return -(grad_rhs @ x.mT).tril_(-1), grad_rhs
