"""Fit the scaling law ``L(N, D) = E + A / N**alpha + B / D**beta`` (Hoffmann et al. 2022).

N is the number of non-embedding parameters, D the number of training tokens and L a final
validation loss (``lmlab scale`` uses bits per byte, which compares across tokenizers). As in
the Chinchilla paper's third approach the fit minimises a Huber loss of the residuals in log
space, ``log L_hat - log L`` with ``log L_hat = logsumexp(a - alpha log N, b - beta log D, e)``,
with L-BFGS from many initialisations. Writing ``A = exp(a)``, ``B = exp(b)``, ``E = exp(e)``
and ``alpha, beta = softplus(.)`` keeps ``A, B, E >= 0`` and ``alpha, beta > 0`` without a
constrained optimiser. Instead of running L-BFGS from every point of the initialisation grid,
the whole grid is scored at once and L-BFGS starts from the best few (the grid is cheap to score,
L-BFGS is not), which finds the same optimum in a fraction of the time.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from lmlab.errors import LmlabError

PARAMETERS = 5
HUBER_DELTA = 1e-3
"""Huber threshold on log-space residuals (Hoffmann et al.): robust to one bad run."""
GRID = {
    "e": [-1.0, -0.5, 0.0, 0.5, 1.0, 1.5],
    "a": [0.0, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 25.0],
    "b": [0.0, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 25.0],
    "alpha": [0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5],
    "beta": [0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5],
}
STARTS = 8
"""L-BFGS runs, from the best-scoring grid points."""


@dataclass(frozen=True)
class ScalingFit:
    """Fitted ``L(N, D) = E + A / N**alpha + B / D**beta`` and how well it fits."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    points: int
    huber: float
    """Mean Huber loss of the log residuals at the optimum (the objective)."""
    rms_log_residual: float
    """Root mean square of ``log L_hat - log L``: about the typical relative misfit."""
    warnings: tuple[str, ...] = ()

    def predict(self, n: float, d: float) -> float:
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    def to_dict(self) -> dict:
        return {**asdict(self), "warnings": list(self.warnings)}


def _inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


def _log_prediction(theta: torch.Tensor, log_n: torch.Tensor, log_d: torch.Tensor) -> torch.Tensor:
    """``log L_hat`` for parameter rows ``theta[..., (e, a, b, u_alpha, u_beta)]``."""
    e, a, b = theta[..., 0:1], theta[..., 1:2], theta[..., 2:3]
    alpha, beta = F.softplus(theta[..., 3:4]), F.softplus(theta[..., 4:5])
    size, data = a - alpha * log_n, b - beta * log_d
    return torch.logsumexp(torch.stack([size, data, e.expand_as(size)]), dim=0)


def _objective(theta: torch.Tensor, log_n, log_d, log_l) -> torch.Tensor:
    residual = _log_prediction(theta, log_n, log_d) - log_l
    return F.huber_loss(residual, torch.zeros_like(residual), delta=HUBER_DELTA, reduction="none")


def _check_points(n: list[float], d: list[float], loss: list[float]) -> None:
    if not len(n) == len(d) == len(loss):
        raise LmlabError("scaling fit: N, D and L must have one value per run")
    for name, values in (("parameters N", n), ("tokens D", d), ("loss L", loss)):
        bad = [v for v in values if not (math.isfinite(v) and v > 0)]
        if bad:
            raise LmlabError(f"scaling fit: {name} must be positive and finite (got {bad[0]})")
    if len(n) < PARAMETERS:
        raise LmlabError(
            f"scaling fit needs at least {PARAMETERS} runs for its {PARAMETERS} parameters "
            f"(got {len(n)}); add model sizes or token budgets"
        )
    for name, values in (("model size", n), ("token budget", d)):
        if len(set(values)) < 2:
            raise LmlabError(
                f"scaling fit needs at least two different {name}s (all runs have "
                f"{values[0]:g}); give two or more"
            )


def fit_scaling_law(n: list[float], d: list[float], loss: list[float]) -> ScalingFit:
    """Fit the law to runs with ``n[i]`` non-embedding parameters, ``d[i]`` training tokens and
    final loss ``loss[i]``; raises :class:`LmlabError` for inputs that cannot determine it."""
    _check_points(n, d, loss)
    log_n, log_d, log_l = (torch.tensor(v, dtype=torch.float64).log() for v in (n, d, loss))
    grid = torch.tensor(list(itertools.product(*GRID.values())), dtype=torch.float64)
    grid[:, 3:] = _inverse_softplus(grid[:, 3:])
    scores = _objective(grid, log_n, log_d, log_l).mean(dim=-1)
    best_theta, best_value = None, math.inf
    for start in grid[torch.argsort(scores)[:STARTS]]:
        theta = start.clone().requires_grad_(True)
        optimiser = torch.optim.LBFGS(
            [theta],
            lr=1.0,
            max_iter=500,
            tolerance_grad=1e-12,
            tolerance_change=1e-15,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure(theta=theta, optimiser=optimiser) -> torch.Tensor:
            optimiser.zero_grad()
            value = _objective(theta, log_n, log_d, log_l).mean()
            value.backward()
            return value

        optimiser.step(closure)
        with torch.no_grad():
            value = _objective(theta, log_n, log_d, log_l).mean().item()
        if math.isfinite(value) and value < best_value:
            best_theta, best_value = theta.detach(), value
    if best_theta is None:
        raise LmlabError("scaling fit did not converge from any start; check the losses")
    e, a, b = (best_theta[i].item() for i in range(3))
    alpha, beta = (F.softplus(best_theta[i]).item() for i in (3, 4))
    with torch.no_grad():
        residual = _log_prediction(best_theta, log_n, log_d) - log_l
    return ScalingFit(
        E=math.exp(e),
        A=math.exp(a),
        alpha=alpha,
        B=math.exp(b),
        beta=beta,
        points=len(n),
        huber=best_value,
        rms_log_residual=residual.pow(2).mean().sqrt().item(),
        warnings=_identifiability_warnings(n, d),
    )


def _identifiability_warnings(n: list[float], d: list[float]) -> tuple[str, ...]:
    """Two values along an axis fix one difference of its term, not both its coefficient and
    its exponent: the fit still returns numbers, but extrapolation along that axis is a guess."""
    notes = []
    for name, values, coefficient in (
        ("model sizes", n, "A, alpha"),
        ("token budgets", d, "B, beta"),
    ):
        if len(set(values)) < 3:
            notes.append(
                f"only {len(set(values))} {name}: {coefficient} and E are not all identified; "
                f"predictions outside the fitted {name} are extrapolations of an underdetermined "
                "fit (use 3 or more)"
            )
    return tuple(notes)


def relative_error(predicted: float, actual: float) -> float:
    """``(predicted - actual) / actual``: positive when the law predicted a worse loss."""
    return (predicted - actual) / actual
