"""The unit lower-triangular solve shared by the delta rules: values and gradients."""

from __future__ import annotations

import torch

from lmlab.ops.triangular import unit_lower_solve


def test_solves_every_right_hand_side_against_a_dense_solve() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 7, 7, generator=gen, dtype=torch.float64)
    rhs = [torch.randn(3, 7, d, generator=gen, dtype=torch.float64) for d in (2, 5)]
    # Only the strictly lower part of ``a`` counts: the upper part and diagonal are ignored.
    system = torch.eye(7, dtype=torch.float64) + a.tril(-1)
    for x, r in zip(unit_lower_solve(a, *rhs), rhs, strict=True):
        torch.testing.assert_close(x, torch.linalg.solve(system, r))


def test_gradients_match_finite_differences() -> None:
    gen = torch.Generator().manual_seed(1)
    a = (0.3 * torch.randn(2, 5, 5, generator=gen, dtype=torch.float64)).requires_grad_()
    rhs = [
        torch.randn(2, 5, d, generator=gen, dtype=torch.float64).requires_grad_() for d in (3, 4)
    ]
    assert torch.autograd.gradcheck(lambda a, *r: unit_lower_solve(a, *r), (a, *rhs))
