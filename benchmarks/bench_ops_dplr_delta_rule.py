"""Time forward+backward of ``dplr_delta_rule``: recurrent oracle vs chunk form vs causal SDPA.

Inputs are RWKV-7 shaped (``a = -kappa``, ``b = kappa * rate``, log decay in (-0.61, 0)), or
``--strong-decay`` for log decays in (-10, 0), which takes the sub-block path of the chunk form.
The recurrent form is measured up to ``--max-recurrent-t`` and extrapolated linearly beyond
(marked ``~``). Run alone: other busy processes distort the timings.

    python benchmarks/bench_ops_dplr_delta_rule.py
    python benchmarks/bench_ops_dplr_delta_rule.py --lengths 64 128 --max-recurrent-t 64
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from timing import causal_attention_step, extrapolated_ms, print_table, time_ms

from lmlab.ops.dplr_delta_rule import dplr_delta_rule


def best_ms(fn: Callable[[], None], reps: int) -> float:
    """Best of ``reps`` calls after one warm-up call (none when ``reps`` is 1)."""
    return time_ms(fn, reps, warmup=int(reps > 1), stat="best")


def dplr_step(mode: str, time_len: int, args: argparse.Namespace) -> Callable[[], None]:
    """Forward+backward of the DPLR rule on fixed random inputs that require gradients."""
    shape = (args.batch, time_len, args.heads, args.dim)
    kappa = F.normalize(torch.randn(shape), dim=-1)
    floor = -10.0 if args.strong_decay else -0.6065
    leaves = [
        torch.randn(shape),
        torch.randn(shape) * 0.5,
        torch.randn(shape),
        -kappa,
        kappa * torch.rand(shape),
        floor * torch.rand(shape),
    ]
    leaves = [x.requires_grad_() for x in leaves]
    grad = torch.randn(shape)

    def step() -> None:
        o, _ = dplr_delta_rule(*leaves, mode=mode, chunk_size=args.chunk_size)
        o.backward(grad)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192]
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64, help="key and value head dim")
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--strong-decay", action="store_true", help="log decays in (-10, 0)")
    parser.add_argument("--max-recurrent-t", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    decay = "(-10, 0)" if args.strong_decay else "(-0.61, 0) as RWKV-7"
    print(
        f"B={args.batch} H={args.heads} K=V={args.dim} chunk_size={args.chunk_size} "
        f"log decay in {decay}, threads={torch.get_num_threads()}; "
        f"forward+backward, best of {args.reps}\n"
    )
    dplr_step("recurrent", 8, args)()  # warm-up: the recurrent rows are single calls
    header = ["T", "recurrent ms", "chunk ms", "speed-up", "SDPA ms", "chunk / SDPA"]
    print_table(header, rows(args), align="rrrrrr")
    measured = [t for t in args.lengths if t <= args.max_recurrent_t] or args.lengths[:1]
    if measured[-1] < max(args.lengths):
        print(f"\n~ extrapolated linearly from T={measured[-1]} (the recurrent form is linear).")


def rows(args: argparse.Namespace) -> Iterator[list[object]]:
    """One row per length, produced as measured."""

    def recurrent_ms(time_len: int) -> float:
        return best_ms(dplr_step("recurrent", time_len, args), 1)

    lengths = extrapolated_ms(args.lengths, args.max_recurrent_t, recurrent_ms)
    for time_len, recurrent, mark in lengths:
        rec_text = f"~{recurrent:.0f}" if mark else f"{recurrent:.1f}"
        chunk = best_ms(dplr_step("chunk", time_len, args), args.reps)
        sdpa = best_ms(causal_attention_step(args.batch, args.heads, time_len, args.dim), args.reps)
        yield [
            time_len,
            rec_text,
            f"{chunk:.1f}",
            f"{recurrent / chunk:.1f}x",
            f"{sdpa:.1f}",
            f"{chunk / sdpa:.2f}",
        ]


if __name__ == "__main__":
    main()
