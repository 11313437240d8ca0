"""Timing, table printing and the attention baseline shared by the benchmark scripts (imported
as ``timing``: a script run as ``python benchmarks/bench_x.py`` has this folder on its path).

One timing rule for every script, so that their numbers mean the same thing: untimed warm-up
calls first (allocator, kernels, caches), then a statistic over timed calls, in milliseconds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

STATISTICS: dict[str, Callable[[list[float]], float]] = {
    "median": statistics.median,
    "best": min,
    "mean": statistics.fmean,
}


def time_ms(
    fn: Callable[[], object],
    repeats: int = 3,
    warmup: int = 1,
    stat: Literal["median", "best", "mean"] = "median",
) -> float:
    """Milliseconds per call of ``fn``: ``warmup`` untimed calls, then the median (robust to a
    busy neighbour), best (closest to the machine's capability) or mean (a stateful loop such as
    decoding, where each call is one step) of ``repeats`` timed calls."""
    return interleaved_ms({"fn": fn}, repeats, warmup, stat)["fn"]


def interleaved_ms(
    fns: Mapping[str, Callable[[], object]],
    repeats: int = 3,
    warmup: int = 1,
    stat: Literal["median", "best", "mean"] = "median",
) -> dict[str, float]:
    """:func:`time_ms` for several functions at once, timed in turns (one call of each per
    round), so that a busy moment of the machine falls on all of them alike instead of on
    whichever ran then: the fair way to take ratios between them on a noisy machine."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: 1000 * STATISTICS[stat](samples) for name, samples in times.items()}


def print_table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> None:
    """Print a Markdown table, each row as soon as it is produced (``rows`` may be a generator,
    so long measurements show progress). ``align`` has one letter per column, ``r`` for
    right-aligned; missing letters are left-aligned."""
    print("| " + " | ".join(header) + " |")
    print("|" + "".join("---:|" if a == "r" else "---|" for a in align.ljust(len(header))))
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |", flush=True)


def extrapolated_ms(
    lengths: Iterable[int], max_measured: int, measure: Callable[[int], float]
) -> Iterator[tuple[int, float, str]]:
    """``(length, ms, mark)`` for a form whose cost is linear in the length (a recurrent
    oracle): measured at lengths up to ``max_measured`` (and at the first length in any case),
    beyond it scaled linearly from the last measured length and marked ``~``."""
    last: tuple[int, float] | None = None
    for length in lengths:
        if last is None or length <= max_measured:
            last = (length, measure(length))
            yield length, last[1], ""
        else:
            yield length, last[1] * length / last[0], "~"


def causal_attention_step(batch: int, heads: int, length: int, dim: int) -> Callable[[], None]:
    """Forward + backward of causal softmax attention (SDPA) on ``[batch, heads, length, dim]``
    inputs: the baseline that the recurrent cores' benchmarks are timed against."""
    shape = (batch, heads, length, dim)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape)

    def step() -> None:
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)

    return step
