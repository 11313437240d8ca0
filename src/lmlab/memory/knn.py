"""kNN-LM (Khandelwal et al. 2020): the model's next-token distribution mixed with a
distribution read from the nearest stored contexts,

    p_knn(y) ∝ sum over the k neighbours whose value is y of exp(-d / temperature)
    p(y) = lambda * p_knn(y) + (1 - lambda) * p_lm(y)

with ``d`` the squared L2 distance between the query's hidden state and the neighbour's key
(FAISS's metric; the paper's). The mixing is done on log-probabilities, so its output can stand
in for logits anywhere (sampling, scoring); a row whose search found no neighbour keeps
``p_lm``. Written here rather than taken from a library: none packages kNN-LM for an arbitrary
PyTorch model, and the formula is three lines.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmlab.data.dataset import eval_batches
from lmlab.data.tokens import TokenData
from lmlab.errors import ParamError
from lmlab.memory.store import KnnStore
from lmlab.model.generate import LogitsHook
from lmlab.model.lm import LanguageModel


@dataclass(frozen=True)
class KnnSettings:
    """How the kNN distribution is read and mixed in (the paper's WikiText-103 setting was
    lambda 0.25, k 1024, temperature 1)."""

    knn_lambda: float = 0.25
    """Weight of the kNN distribution, in [0, 1]."""
    knn_k: int = 16
    """Neighbours per query."""
    knn_temperature: float = 1.0
    """Divides the squared distances before the softmax over neighbours."""

    def validate(self, store_size: int | None = None) -> None:
        if not 0 <= self.knn_lambda <= 1:
            raise ParamError(f"<knn_lambda>={self.knn_lambda} must be in [0, 1]", "knn_lambda")
        if self.knn_k < 1 or (store_size is not None and self.knn_k > store_size):
            limit = f" and at most the store's {store_size} entries" if store_size else ""
            raise ParamError(f"<knn_k>={self.knn_k} must be at least 1{limit}", "knn_k")
        if not 0 < self.knn_temperature < math.inf:
            raise ParamError(
                f"<knn_temperature>={self.knn_temperature} must be a finite number above 0",
                "knn_temperature",
            )


def knn_log_probs(
    distances: torch.Tensor, values: torch.Tensor, vocab_size: int, temperature: float
) -> torch.Tensor:
    """``log p_knn`` ``[N, vocab_size]`` from the neighbours' squared distances and values
    ``[N, k]`` (value -1: no neighbour). A row without neighbours is all ``-inf``."""
    found = values >= 0
    scores = (-distances.double() / temperature).masked_fill(~found, -math.inf)
    best = scores.amax(-1, keepdim=True).clamp_min(-1e300)  # finite even for an empty row
    weights = (scores - best).exp()
    mass = torch.zeros(values.shape[0], vocab_size, dtype=torch.float64, device=values.device)
    mass.scatter_add_(1, values.clamp_min(0), weights)
    total = weights.sum(-1, keepdim=True)
    return (mass / total.clamp_min(torch.finfo(torch.float64).tiny)).log()


def interpolate(lm_logits: torch.Tensor, knn: torch.Tensor, knn_lambda: float) -> torch.Tensor:
    """``log(lambda p_knn + (1 - lambda) p_lm)`` ``[N, V]`` (float32), or ``log p_lm`` on rows
    where ``knn`` (from :func:`knn_log_probs`) found no neighbour."""
    lm = F.log_softmax(lm_logits.double(), dim=-1)
    log_knn = math.log(knn_lambda) if knn_lambda > 0 else -math.inf
    log_lm = math.log1p(-knn_lambda) if knn_lambda < 1 else -math.inf
    mixed = torch.logaddexp(log_knn + knn, log_lm + lm)
    found = torch.isfinite(knn).any(-1, keepdim=True)
    return torch.where(found, mixed, lm).float()


def knn_logits(
    store: KnnStore, hidden: torch.Tensor, logits: torch.Tensor, settings: KnnSettings
) -> torch.Tensor:
    """The mixed next-token log-probabilities ``[N, V]`` for hidden states ``[N, d]`` (the
    model's ``features``) and their logits ``[N, V]``: usable as logits for sampling."""
    distances, values = store.search(hidden, settings.knn_k)
    knn = knn_log_probs(
        distances.to(logits.device),
        values.to(logits.device),
        logits.shape[-1],
        settings.knn_temperature,
    )
    return interpolate(logits, knn, settings.knn_lambda)


def knn_hook(store: KnnStore, settings: KnnSettings) -> LogitsHook:
    """A ``logits_hook`` for :func:`lmlab.model.generate.stream_tokens` that samples from the
    kNN-LM mixture instead of the model alone (what ``generate --memory`` and a server use)."""
    settings.validate(store.size)
    return lambda hidden, logits: knn_logits(store, hidden, logits, settings)


@torch.no_grad()
def evaluate_with_memory(
    model: LanguageModel,
    data: TokenData,
    store: KnnStore,
    settings: KnnSettings,
    *,
    batch_size: int,
    seq_len: int,
    max_batches: int,
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
    split: str = "val",
) -> dict[str, float]:
    """Loss, perplexity and bits per byte on the windows of ``lmlab.eval.evaluate``, without
    and with the memory (``memory_*``), from the same forward passes."""
    settings.validate(store.size)
    was_training = model.training
    model.eval()
    sums = {"": 0.0, "memory_": 0.0}
    count = 0
    tokens = data.val if split == "val" else data.train
    for x, y in eval_batches(tokens, batch_size, seq_len, max_batches):
        x, y = x.to(device), y.to(device)
        with autocast or contextlib.nullcontext():
            hidden, _ = model.features(x)
            logits = model.head(hidden)
        hidden, logits, target = hidden.flatten(0, 1), logits.float().flatten(0, 1), y.flatten()
        sums[""] += F.cross_entropy(logits, target, reduction="sum").item()
        mixed = knn_logits(store, hidden, logits, settings)
        sums["memory_"] -= mixed.gather(1, target[:, None]).sum().item()
        count += target.numel()
    model.train(was_training)
    result: dict[str, float] = {"tokens": count}
    for prefix, total in sums.items():
        mean = total / count
        result[f"{prefix}loss"] = mean
        result[f"{prefix}perplexity"] = math.exp(min(mean, 700.0))
        result[f"{prefix}bits_per_byte"] = data.bits_per_byte(mean, split=split)
    return result
