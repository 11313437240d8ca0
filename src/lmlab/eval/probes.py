"""Synthetic capability probes (recall, induction, selective copying, needle retrieval): their
generators and their scoring, and validation loss by position.

The synthetic probes train each architecture from scratch on generated data, as the Zoology
and Mamba papers do, because a small language model trained on text is too weak for recall
differences to show. Every generator returns ``(inputs, targets)`` of shape ``[N, T]`` where
``targets`` is -100 except at the positions that are scored, so one training loop and one
accuracy serve every task. Training on them is :mod:`lmlab.experiments.probe`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.errors import LmlabError, ParamError
from lmlab.model.lm import LanguageModel

IGNORE = -100
SOLVED = 0.99
SCREEN_EXAMPLES = 128
SCREEN_MARGIN = 0.02
"""A screen of 128 MQAR examples has 4 x 128 scored queries: at a true accuracy of 0.99 its
standard error is 0.0044, so a screen below 0.97 is 4.5 standard errors from solved. (A task
with one scored position per example screens less sharply; a screen wrongly failed only delays
the stop to a later check, it never changes a score.)"""
PROBES_FILE = "probes.json"
TASKS = ("mqar", "induction", "selective_copy", "needle")

Split = tuple[torch.Tensor, torch.Tensor]


def _sample_without_replacement(
    rng: np.random.Generator, rows: int, choices: int, size: int, log_p: np.ndarray | None = None
) -> np.ndarray:
    """``size`` distinct indices in ``[0, choices)`` per row, weighted by ``exp(log_p)``.

    Gumbel top-k draws the same distribution as sequential weighted sampling without
    replacement (``np.random.choice(replace=False, p=...)``) but for all rows at once; it runs
    in chunks so a large vocabulary does not need a rows x vocabulary matrix at once.
    """
    out = np.empty((rows, size), dtype=np.int64)
    chunk = max(1, 2**22 // choices)
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        scores = rng.gumbel(size=(n, choices))
        if log_p is not None:
            scores += log_p
        top = np.argpartition(-scores, size - 1, axis=1)[:, :size]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        out[start : start + n] = np.take_along_axis(top, order, axis=1)
    return out


def mqar(
    vocab_size: int,
    seq_len: int,
    num_kv_pairs: int,
    num_examples: int,
    seed: int = 0,
    power_a: float = 0.01,
) -> Split:
    """Multi-query associative recall as Zoology defines it (``_mqar``).

    The ``num_kv_pairs`` key-value pairs come first (keys from ``[1, V/2)``, values from
    ``[V/2, V)``, all distinct within an example); then every key is queried once, at an even
    offset ``2 * gap`` after the pairs, with ``P(gap = g) ~ (g + 1) ** (power_a - 1)``
    (``power_a`` = 1 is uniform; small values favour short gaps, as repeated bigrams do in text).
    The target at a query is its value; every other position (filled with random tokens) is -100.
    """
    _check_mqar(vocab_size, seq_len, num_kv_pairs)
    rng = np.random.default_rng(seed)
    half = vocab_size // 2
    keys = 1 + _sample_without_replacement(rng, num_examples, half - 1, num_kv_pairs)
    values = half + _sample_without_replacement(rng, num_examples, vocab_size - half, num_kv_pairs)
    context = 2 * num_kv_pairs
    space = (seq_len - context) // 2
    log_p = (power_a - 1) * np.log(np.arange(1, space + 1, dtype=np.float64))
    gaps = _sample_without_replacement(rng, num_examples, space, num_kv_pairs, log_p)

    inputs = rng.integers(0, vocab_size, size=(num_examples, seq_len), dtype=np.int64)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    positions = context + 2 * gaps
    np.put_along_axis(inputs, positions, keys, axis=1)
    targets = np.full((num_examples, seq_len), IGNORE, dtype=np.int64)
    np.put_along_axis(targets, positions, values, axis=1)
    return torch.from_numpy(inputs), torch.from_numpy(targets)


def _check_mqar(vocab_size: int, seq_len: int, num_kv_pairs: int) -> None:
    if num_kv_pairs < 1:
        raise ParamError(f"<num_kv_pairs>={num_kv_pairs} must be at least 1", "num_kv_pairs")
    if seq_len < 4 * num_kv_pairs:
        raise ParamError(
            f"<seq_len>={seq_len} is too short for {num_kv_pairs} kv pairs (pairs and queries "
            f"need 4 x pairs); use <seq_len>={4 * num_kv_pairs} or fewer <num_kv_pairs>",
            "seq_len",
            "num_kv_pairs",
        )
    if vocab_size // 2 - 1 < num_kv_pairs:
        raise ParamError(
            f"<vocab_size>={vocab_size} has too few keys for {num_kv_pairs} distinct pairs; "
            f"use <vocab_size>={2 * num_kv_pairs + 2} or more",
            "vocab_size",
        )


def induction(vocab_size: int, seq_len: int, num_examples: int, seed: int = 0) -> Split:
    """Induction head: token 0 is a trigger that appears once in a random sequence of tokens
    ``[1, V)``, then again at the last position; the target there is the token that followed
    the first trigger."""
    if seq_len < 4 or vocab_size < 3:
        raise ParamError(
            "induction needs <seq_len> >= 4 and <vocab_size> >= 3", "seq_len", "vocab_size"
        )
    rng = np.random.default_rng(seed)
    inputs = rng.integers(1, vocab_size, size=(num_examples, seq_len), dtype=np.int64)
    rows = np.arange(num_examples)
    first = rng.integers(0, seq_len - 2, size=num_examples)
    inputs[rows, first] = 0
    inputs[:, -1] = 0
    targets = np.full((num_examples, seq_len), IGNORE, dtype=np.int64)
    targets[:, -1] = inputs[rows, first + 1]
    return torch.from_numpy(inputs), torch.from_numpy(targets)


def selective_copy(
    vocab_size: int, seq_len: int, num_tokens: int, num_examples: int, seed: int = 0
) -> Split:
    """Selective copying (Mamba): ``num_tokens`` data tokens ``[2, V)`` scattered in order among
    noise tokens (0) over the first ``seq_len - num_tokens`` positions, then a delimiter (1);
    from the delimiter on, the targets are the data tokens in order (teacher forcing)."""
    context = seq_len - num_tokens
    if num_tokens < 1 or context < num_tokens or vocab_size < 3:
        raise ParamError(
            f"<seq_len>={seq_len} is too short to copy {num_tokens} tokens; use <seq_len>="
            f"{2 * num_tokens} or more (and <vocab_size> >= 3)",
            "seq_len",
            "vocab_size",
        )
    rng = np.random.default_rng(seed)
    data = rng.integers(2, vocab_size, size=(num_examples, num_tokens), dtype=np.int64)
    slots = np.sort(_sample_without_replacement(rng, num_examples, context, num_tokens), axis=1)
    inputs = np.zeros((num_examples, seq_len), dtype=np.int64)
    np.put_along_axis(inputs, slots, data, axis=1)
    inputs[:, context] = 1
    inputs[:, context + 1 :] = data[:, :-1]
    targets = np.full((num_examples, seq_len), IGNORE, dtype=np.int64)
    targets[:, context:] = data
    return torch.from_numpy(inputs), torch.from_numpy(targets)


def needle(vocab_size: int, seq_len: int, num_examples: int, seed: int = 0) -> Split:
    """Needle in a haystack: random filler ``[2, V)`` holding ``0 key value`` at a random depth;
    the sequence ends with ``1 key`` and the target after the key is the value."""
    if seq_len < 6 or vocab_size < 4:
        raise ParamError(
            "needle needs <seq_len> >= 6 and <vocab_size> >= 4", "seq_len", "vocab_size"
        )
    rng = np.random.default_rng(seed)
    inputs = rng.integers(2, vocab_size, size=(num_examples, seq_len), dtype=np.int64)
    rows = np.arange(num_examples)
    depth = rng.integers(0, seq_len - 5, size=num_examples)
    key = inputs[rows, depth + 1]
    inputs[rows, depth] = 0
    inputs[:, -2] = 1
    inputs[:, -1] = key
    targets = np.full((num_examples, seq_len), IGNORE, dtype=np.int64)
    targets[:, -1] = inputs[rows, depth + 2]
    return torch.from_numpy(inputs), torch.from_numpy(targets)


@dataclass
class ProbeTask:
    """What to generate: the task and its sizes. ``items`` is the number of kv pairs (mqar) or
    of tokens to copy (selective_copy); ``eval_lengths`` are the lengths a needle is tested at."""

    task: str
    seq_len: int
    vocab_size: int = 8192
    items: int = 16
    num_examples: int = 20000
    test_examples: int = 1000
    seed: int = 0
    power_a: float = 0.01
    eval_lengths: tuple[int, ...] = ()

    def name(self, seq_len: int | None = None) -> str:
        """The probe's key in ``probes.json``: stable across arms so compare can match it."""
        length = seq_len or self.seq_len
        if self.task == "mqar":
            return f"mqar_s{length}_kv{self.items}"
        if self.task == "selective_copy":
            return f"selective_copy_s{length}_n{self.items}"
        return f"{self.task}_s{length}"

    def generate(self, num_examples: int, seed: int, seq_len: int | None = None) -> Split:
        length = seq_len or self.seq_len
        makers: dict[str, Callable[[], Split]] = {
            "mqar": lambda: mqar(
                self.vocab_size, length, self.items, num_examples, seed, self.power_a
            ),
            "induction": lambda: induction(self.vocab_size, length, num_examples, seed),
            "selective_copy": lambda: selective_copy(
                self.vocab_size, length, self.items, num_examples, seed
            ),
            "needle": lambda: needle(self.vocab_size, length, num_examples, seed),
        }
        if self.task not in makers:
            raise LmlabError(f"unknown probe task {self.task!r}; use {', '.join(TASKS)}")
        return makers[self.task]()

    def test_sets(self) -> dict[str, Split]:
        """Held-out sets keyed by probe name (a different seed from training, as Zoology)."""
        lengths = self.eval_lengths or (self.seq_len,)
        return {self.name(n): self.generate(self.test_examples, self.seed + 10, n) for n in lengths}


def scored_logits(
    model: LanguageModel, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[n, vocab]`` and targets ``[n]`` at the scored positions only (``y`` is
    ``IGNORE`` elsewhere): a probe scores a few positions per example, so the head runs on those
    alone (at MQAR's 4 queries in 64 tokens, 1/16 of the head's work)."""
    hidden, _ = model.features(x)
    mask = y != IGNORE
    return model.head(hidden[mask]), y[mask]


@torch.no_grad()
def accuracy(model: LanguageModel, split: Split) -> float:
    """Fraction of scored positions whose argmax prediction is the target."""
    # ~8k tokens per batch: activations that stay in cache run faster than one huge batch.
    batch_size = max(1, 8192 // split[0].shape[1])
    was_training = model.training
    model.eval()
    correct, total = 0, 0
    for start in range(0, len(split[0]), batch_size):
        x, y = split[0][start : start + batch_size], split[1][start : start + batch_size]
        logits, targets = scored_logits(model, x, y)
        correct += int((logits.argmax(-1) == targets).sum())
        total += len(targets)
    model.train(was_training)
    return correct / max(total, 1)


@torch.no_grad()
def loss_by_position(
    model: LanguageModel,
    tokens: np.ndarray,
    lengths: Sequence[int],
    *,
    buckets: int = 8,
    max_windows: int = 64,
    batch_size: int = 8,
) -> dict[int, list[float]]:
    """Mean next-token loss in each of ``buckets`` equal position ranges of windows of each
    length: a falling curve means later tokens profit from more context; lengths beyond the
    training length show whether the model extrapolates."""
    from lmlab.data.dataset import eval_batches

    was_training = model.training
    model.eval()
    result = {}
    for length in lengths:
        if length < buckets:
            raise ParamError(f"length {length} is shorter than <buckets>={buckets}", "buckets")
        total = torch.zeros(length, dtype=torch.float64)
        count = 0
        for x, y in eval_batches(tokens, batch_size, length, math.ceil(max_windows / batch_size)):
            logits, _ = model(x)
            loss = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")
            total += loss.sum(0).double()
            count += x.shape[0]
        edges = np.linspace(0, length, buckets + 1).astype(int)
        per_position = total / count
        result[length] = [float(per_position[a:b].mean()) for a, b in itertools.pairwise(edges)]
    model.train(was_training)
    return result
