"""Time forward+backward of ``gated_delta_rule``: recurrent oracle vs chunk form vs causal SDPA.

Prints one Markdown table per decay kind (none: DeltaNet, head: Gated DeltaNet, channel: KDA).
The recurrent form is measured up to ``--max-recurrent-t`` and extrapolated linearly beyond
(marked ``~``). Example: ``python benchmarks/bench_ops_gated_delta_rule.py --lengths 256 512``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from timing import causal_attention_step, extrapolated_ms, print_table, time_ms

from lmlab.ops.gated_delta_rule import gated_delta_rule


def _rule_step(decay: str, mode: str, t: int, args: argparse.Namespace) -> Callable[[], None]:
    """A closure running forward+backward of the delta rule on fresh random inputs."""
    b, h, d = args.batch, args.heads, args.dim
    q = torch.randn(b, t, h, d, requires_grad=True)
    k = F.normalize(torch.randn(b, t, h, d), dim=-1).requires_grad_()
    v = torch.randn(b, t, h, d, requires_grad=True)
    beta = torch.rand(b, t, h).requires_grad_()
    shape = {"none": None, "head": (b, t, h), "channel": (b, t, h, d)}[decay]
    log_decay = None if shape is None else (-torch.rand(shape)).requires_grad_()
    grad = torch.randn(b, t, h, d)

    def step() -> None:
        o, _ = gated_delta_rule(q, k, v, beta, log_decay, mode=mode, chunk_size=args.chunk_size)
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
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--decay", choices=["none", "head", "channel", "all"], default="all")
    parser.add_argument("--max-recurrent-t", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    decays = ["none", "head", "channel"] if args.decay == "all" else [args.decay]
    print(
        f"B={args.batch} H={args.heads} K=V={args.dim} chunk_size={args.chunk_size} "
        f"threads={torch.get_num_threads()}; forward+backward, best of {args.reps}\n"
    )
    shape = args.batch, args.heads
    sdpa = {
        t: time_ms(causal_attention_step(*shape, t, args.dim), args.reps, stat="best")
        for t in args.lengths
    }
    for decay in decays:
        print(f"decay: {decay}\n")
        header = ["T", "recurrent ms", "chunk ms", "speed-up", "SDPA ms"]
        print_table(header, _decay_rows(decay, args, sdpa), align="rrrrr")
        measured = [t for t in args.lengths if t <= args.max_recurrent_t] or args.lengths[:1]
        print(
            f"\n~ extrapolated linearly from T={measured[-1]} "
            "(the recurrent form is linear in T).\n"
        )


def _decay_rows(
    decay: str, args: argparse.Namespace, sdpa: dict[int, float]
) -> Iterator[list[object]]:
    """One row per length, produced as measured."""

    def recurrent_ms(t: int) -> float:
        # one call without warm-up: the recurrent form is slow enough to amortise it
        return time_ms(_rule_step(decay, "recurrent", t, args), 1, warmup=0, stat="best")

    for t, rec, mark in extrapolated_ms(args.lengths, args.max_recurrent_t, recurrent_ms):
        rec_text = f"~{rec:.0f}" if mark else f"{rec:.1f}"
        chunk = time_ms(_rule_step(decay, "chunk", t, args), args.reps, stat="best")
        yield [t, rec_text, f"{chunk:.1f}", f"{rec / chunk:.1f}x", f"{sdpa[t]:.1f}"]


if __name__ == "__main__":
    main()
