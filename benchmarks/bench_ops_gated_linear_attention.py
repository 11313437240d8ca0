"""Benchmark gated linear attention: chunk form vs the recurrent oracle vs causal softmax SDPA.

Times forward + backward (a dense random output gradient, as in training) and prints one
Markdown table per decay kind. The recurrent form is measured up to ``--recurrent-max-t`` and
extrapolated linearly beyond (its cost is exactly linear in T); such rows are marked ``~``.

    .venv/bin/python benchmarks/bench_ops_gated_linear_attention.py
    .venv/bin/python benchmarks/bench_ops_gated_linear_attention.py --lengths 64 128 --repeats 1
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from timing import extrapolated_ms, print_table, time_ms

from lmlab.ops.gated_linear_attention import gated_linear_attention


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192]
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--key-dim", type=int, default=64)
    parser.add_argument("--value-dim", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument(
        "--decays",
        nargs="+",
        default=["none", "head", "channel"],
        choices=["none", "head", "channel"],
    )
    parser.add_argument("--recurrent-max-t", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3, help="best of N (the recurrent form: 1)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    return parser.parse_args()


def make_step(args: argparse.Namespace, T: int, decay: str, mode: str) -> Callable[[], None]:
    B, H, K, V = args.batch, args.heads, args.key_dim, args.value_dim
    q = torch.randn(B, T, H, K, requires_grad=True)
    k = torch.randn(B, T, H, K, requires_grad=True)
    v = torch.randn(B, T, H, V, requires_grad=True)
    grad = torch.randn(B, T, H, V)
    log_decay = None
    if decay != "none":
        shape = (B, T, H) if decay == "head" else (B, T, H, K)
        # GLA-like: log sigmoid of a gate, mostly mild with some strong decays.
        log_decay = F.logsigmoid(torch.randn(shape) + 2.0).requires_grad_()
    if mode == "sdpa":

        def step() -> None:
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
            )
            o.backward(grad.transpose(1, 2))

    else:

        def step() -> None:
            o, _ = gated_linear_attention(q, k, v, log_decay, mode=mode, chunk_size=args.chunk_size)
            o.backward(grad)

    return step


def main() -> None:
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(
        f"B={args.batch} H={args.heads} K={args.key_dim} V={args.value_dim} "
        f"chunk={args.chunk_size} threads={torch.get_num_threads()}; forward+backward, "
        f"best of {args.repeats}; ~ = recurrent extrapolated linearly from "
        f"T={args.recurrent_max_t}\n"
    )
    for decay in args.decays:
        print(f"### log_decay: {decay}\n")
        header = ["T", "recurrent ms", "chunk ms", "speed-up", "SDPA ms"]
        print_table(header, decay_rows(args, decay), align="rrrrr")
        print()


def decay_rows(args: argparse.Namespace, decay: str) -> Iterator[list[object]]:
    """One row per length, produced as measured."""

    def recurrent_ms(T: int) -> float:
        return time_ms(make_step(args, T, decay, "recurrent"), 1, stat="best")

    for T, recurrent, mark in extrapolated_ms(args.lengths, args.recurrent_max_t, recurrent_ms):
        chunk = time_ms(make_step(args, T, decay, "chunk"), args.repeats, stat="best")
        sdpa = time_ms(make_step(args, T, decay, "sdpa"), args.repeats, stat="best")
        yield [
            T,
            f"{mark}{recurrent:.1f}",
            f"{chunk:.1f}",
            f"{mark}{recurrent / chunk:.1f}x",
            f"{sdpa:.1f}",
        ]


if __name__ == "__main__":
    main()
