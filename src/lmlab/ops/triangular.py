"""Unit lower-triangular solves for the chunked delta rules (the WY / UT transform)."""

from __future__ import annotations

import torch


def unit_lower_solve(a: torch.Tensor, *rhs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(I + A)^{-1} R`` for strictly lower ``A`` (``[..., C, C]``; diagonal and upper part
    ignored) and each right-hand side ``R``: ``[..., C, D]``, differentiable in all of them.

    Several right-hand sides share one inverse; passing them separately (instead of one
    concatenated ``R``) saves the concatenation and the split of the result, and their
    gradients, which cost as much as a matmul on CPU."""
    return _UnitLowerSolve.apply(a, *rhs)


class _UnitLowerSolve(torch.autograd.Function):
    """Forms the inverse ``T`` once so that both passes are plain matmuls: batched triangular
    solves are several times slower than matmuls on CPU, and the inverse has only ``C`` columns
    where ``R`` may have many. ``dR = T^T dX``, ``dA = -tril(sum over R of dR X^T)``."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, a: torch.Tensor, *rhs: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a)
        inv = torch.linalg.solve_triangular(a, eye, upper=False, unitriangular=True)
        xs = tuple(inv @ r for r in rhs)
        ctx.save_for_backward(inv, *xs)
        return xs

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, *grad_xs: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        inv, *xs = ctx.saved_tensors
        grad_rhs = [inv.mT @ g for g in grad_xs]
        grad_a = grad_rhs[0] @ xs[0].mT
        for g, x in zip(grad_rhs[1:], xs[1:], strict=True):
            grad_a += g @ x.mT
        return (grad_a.tril_(-1).neg_(), *grad_rhs)
