"""Timing, table printing and the attention baseline shared by the benchmark scripts (imported
as ``timing``: a script run as ``python benchmarks/bench_x.py`` has this folder on its path).

One timing rule for every script, so that their numbers mean the same thing: untimed warm-up
calls first (allocator, kernels, caches), then a statistic over timed calls, in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

STATISTICS: dict[str, Callable[[list[float]], float]] = {
    "median": statistics.median,
    "best": min,
    "mean": statistics.fmean,
}


def machine() -> str:
    """The CPU that heads every table: model name, cores and the instruction set torch uses
    (AVX512 with AMX makes bf16 fast, AVX2 alone makes it slow, so figures differ by machine)."""
    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    capability = torch.backends.cpu.get_cpu_capability()
    return f"CPU: {name}, {os.cpu_count()} cores, {capability}, torch {torch.__version__}"


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


def interleaved_wall_and_cpu_ms(
    fns: Mapping[str, Callable[[], object]], repeats: int = 3, warmup: int = 1
) -> dict[str, tuple[float, float]]:
    """:func:`interleaved_ms` (median) on two clocks at once: wall time and this process's CPU
    time. On a machine shared with other jobs the wall time includes waiting for a core; the
    CPU time of a single-threaded process does not, so it is the steadier measure of the work
    done (it misses no work as long as torch runs on one thread)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {
        name: (1000 * statistics.median(wall[name]), 1000 * statistics.median(cpu[name]))
        for name in fns
    }


def print_table(header: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> None:
    """Print a Markdown table, each row as soon as it is produced (``rows`` may be a generator,
    so long measurements show progress). ``align`` has one letter per column, ``r`` for
    right-aligned; missing letters are left-aligned."""
    print("| " + " | ".join(header) + " |")
    print("|" + "".join("---:|" if a == "r" else "---|" for a in align.ljust(len(header))))
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |", flush=True)


def versus_row(
    label: str,
    baseline: Callable[..., torch.Tensor],
    lmlab: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    repeats: int,
) -> tuple[str, ...]:
    """A table row for an lmlab op against the textbook form it replaces, both called on
    ``inputs``: forward + backward ms of each (median of ``repeats`` after three warm-up calls)
    with a fixed random output gradient, the speed-up and the largest difference between their
    outputs. Each form is timed in its own block: timed in turns, each one's allocations fell on
    pages the other had just returned to the system, and the ratio moved with the order."""
    expected = baseline(*inputs)
    error = (lmlab(*inputs) - expected).abs().max().item()
    grad = torch.randn_like(expected)
    timed = {
        name: time_ms(lambda fn=fn: fn(*inputs).backward(grad), repeats, warmup=3)
        for name, fn in (("baseline", baseline), ("lmlab", lmlab))
    }
    base, mine = timed["baseline"], timed["lmlab"]
    return (label, f"{base:.2f}", f"{mine:.2f}", f"{base / mine:.2f}x", f"{error:.1e}")


def versus_main(
    doc: str, baseline_name: str, rows: Callable[[int], Iterable[Sequence[object]]]
) -> None:
    """The command line (``--threads``, ``--repeats``) and table of a benchmark made of
    :func:`versus_row` rows; ``rows(repeats)`` yields them."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"forward + backward, float32, {args.threads} threads, median of {args.repeats}")
    print_table(
        ("shape B x T x D", f"{baseline_name} ms", "lmlab ms", "speed-up", "max abs diff"),
        rows(args.repeats),
        align="lrrrr",
    )


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


def causal_attention_step(
    batch: int, heads: int, length: int, key_dim: int, value_dim: int
) -> Callable[[], None]:
    """Forward + backward of causal softmax attention (SDPA) on ``[batch, heads, length, dim]``
    inputs: the baseline that the recurrent cores' benchmarks are timed against."""
    q, k = (torch.randn(batch, heads, length, key_dim, requires_grad=True) for _ in range(2))
    v = torch.randn(batch, heads, length, value_dim, requires_grad=True)
    grad = torch.randn(batch, heads, length, value_dim)

    def step() -> None:
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)

    return step
