"""The Hopfield associative-memory probe (seed 002, C-9): store random bipolar patterns, query
with a fraction of each pattern's bits flipped, and count exact recalls after retrieval with the
modern Hopfield update (``lmlab.ops.hopfield``). No training: it measures the retrieval rule's
capacity against the number of patterns ``N``, their width and the inverse temperature beta."""

from __future__ import annotations

import torch

from lmlab.errors import ParamError
from lmlab.ops.hopfield import hopfield_retrieve


def hopfield_recall(
    n_patterns: int,
    dim: int,
    beta: float,
    *,
    noise: float = 0.2,
    steps: int = 1,
    queries: int = 512,
    seed: int = 0,
) -> dict[str, float]:
    """Recall of ``n_patterns`` random +-1 patterns of ``dim`` bits from queries with
    ``round(noise * dim)`` bits flipped (``queries`` of them, cycling over the patterns):
    ``recall`` is the fraction whose retrieved pattern's signs equal the stored one in every
    bit, ``bit_accuracy`` the fraction of bits right."""
    if n_patterns < 1 or dim < 1 or queries < 1 or steps < 1:
        raise ParamError(
            "<n_patterns>, <dim>, <queries> and <steps> must be at least 1",
            "n_patterns",
            "dim",
            "queries",
            "steps",
        )
    if not 0 <= noise <= 1:
        raise ParamError(f"<noise>={noise} must be in [0, 1]", "noise")
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randint(0, 2, (n_patterns, dim), generator=generator).double() * 2 - 1
    targets = patterns[torch.arange(queries) % n_patterns]
    flips = torch.rand(queries, dim, generator=generator).argsort(-1)[:, : round(noise * dim)]
    signs = torch.ones(queries, dim, dtype=torch.float64).scatter(1, flips, -1.0)
    retrieved = hopfield_retrieve(targets * signs, patterns, beta, steps=steps).sign()
    correct = retrieved == targets
    return {
        "recall": correct.all(-1).double().mean().item(),
        "bit_accuracy": correct.double().mean().item(),
    }
