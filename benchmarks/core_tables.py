"""The harness of the three recurrent-core benchmarks (``bench_ops_*.py``, imported as
``core_tables``): one command line, one table and one timing rule for every core, so that their
tables compare.

Each row times forward + backward at one length of the step-by-step recurrent oracle (one call:
it is slow; measured up to ``--recurrent-max-t`` and extrapolated linearly beyond, marked ``~``),
the chunk form, and causal softmax attention (SDPA) on the same batch, heads and head sizes. The
chunk form and SDPA are timed in turns (best of ``--repeats``), so that their ratio is not at the
mercy of a busy moment of the machine.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator

import torch
from timing import causal_attention_step, extrapolated_ms, interleaved_ms, print_table, time_ms

StepFactory = Callable[[str, int], Callable[[], None]]
"""``(mode, T)`` -> a closure running forward + backward of the core in that mode (``recurrent``
or ``chunk``) at length ``T`` on fixed random inputs."""

HEADER = ["T", "recurrent ms", "chunk ms", "speed-up", "SDPA ms", "chunk / SDPA"]


def core_parser(description: str, *, batch: int, chunk_size: int) -> argparse.ArgumentParser:
    """The options every core benchmark takes; a script adds its own input options."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192]
    )
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--key-dim", type=int, default=64)
    parser.add_argument("--value-dim", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=chunk_size)
    parser.add_argument(
        "--recurrent-max-t",
        type=int,
        default=2048,
        help="longest T at which the recurrent oracle is run; longer ones are extrapolated",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="best of N for the chunk form and SDPA"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    return parser


def print_setup(args: argparse.Namespace, inputs: str) -> None:
    """Apply ``--threads`` and print the settings line that heads the tables."""
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"B={args.batch} H={args.heads} K={args.key_dim} V={args.value_dim} "
        f"chunk_size={args.chunk_size} threads={torch.get_num_threads()}, {inputs}; "
        f"forward+backward, best of {args.repeats} (recurrent: one call); ~ = recurrent "
        f"extrapolated linearly from T={args.recurrent_max_t}\n"
    )


def print_core_table(args: argparse.Namespace, title: str, make_step: StepFactory) -> None:
    """One Markdown table, a row per length, each printed as soon as it is measured."""
    print(f"### {title}\n")
    make_step("recurrent", 8)()  # warm-up: the recurrent rows are single calls
    print_table(HEADER, _rows(args, make_step), align="rrrrrr")
    print()


def _rows(args: argparse.Namespace, make_step: StepFactory) -> Iterator[list[object]]:
    def recurrent_ms(length: int) -> float:
        return time_ms(make_step("recurrent", length), 1, warmup=0)

    for length, recurrent, mark in extrapolated_ms(
        args.lengths, args.recurrent_max_t, recurrent_ms
    ):
        sdpa = causal_attention_step(args.batch, args.heads, length, args.key_dim, args.value_dim)
        timed = interleaved_ms(
            {"chunk": make_step("chunk", length), "sdpa": sdpa}, args.repeats, stat="best"
        )
        chunk = timed["chunk"]
        yield [
            length,
            f"{mark}{recurrent:.1f}",
            f"{chunk:.1f}",
            f"{mark}{recurrent / chunk:.1f}x",
            f"{timed['sdpa']:.1f}",
            f"{chunk / timed['sdpa']:.2f}",
        ]
