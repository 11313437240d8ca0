"""Benchmark the TTT-Linear core: the dual (chunk) form vs the recurrent oracle vs causal SDPA.

Inner learning rates uniform in (0, 1) / D, the official layer's range; ``--chunk-size`` is the
mini-batch size (16, the paper's). ``--value-dim`` must equal ``--key-dim`` (the inner model is
D x D). The options and the table are those of every core benchmark (``core_tables.py``).

    .venv/bin/python benchmarks/bench_ops_ttt_linear.py --threads 2
    .venv/bin/python benchmarks/bench_ops_ttt_linear.py --lengths 64 128 --recurrent-max-t 128
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial

import torch
from core_tables import core_parser, print_core_table, print_setup

from lmlab.ops.ttt_linear import ttt_linear


def make_step(args: argparse.Namespace, mode: str, T: int) -> Callable[[], None]:
    B, H, D = args.batch, args.heads, args.key_dim
    q, k, v = (torch.randn(B, T, H, D, requires_grad=True) for _ in range(3))
    ln_weight = torch.ones(H, D, requires_grad=True)
    ln_bias = torch.zeros(H, D, requires_grad=True)
    lr = (torch.rand(B, T, H) / D).requires_grad_()
    weight = (0.02 * torch.randn(B, H, D, D)).requires_grad_()
    grad = torch.randn(B, T, H, D)

    def step() -> None:
        o, _ = ttt_linear(
            q,
            k,
            v,
            ln_weight,
            ln_bias,
            lr,
            mini_batch_size=args.chunk_size,
            initial_state=weight,
            mode=mode,
        )
        o.backward(grad)

    return step


def main() -> None:
    parser = core_parser(__doc__.splitlines()[0], batch=2, chunk_size=16)
    args = parser.parse_args()
    if args.value_dim != args.key_dim:
        parser.error("--value-dim must equal --key-dim: the inner model is D x D")
    print_setup(args, "lr uniform in (0, 1/D)")
    print_core_table(args, f"TTT-Linear, mini-batch {args.chunk_size}", partial(make_step, args))


if __name__ == "__main__":
    main()
