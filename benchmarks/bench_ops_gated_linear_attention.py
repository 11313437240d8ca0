"""Benchmark gated linear attention: chunk form vs the recurrent oracle vs causal softmax SDPA.

One table per decay kind (none: RetNet's form without decay; head: RetNet, Mamba-2; channel:
GLA), with GLA-like decays: the log sigmoid of a gate, mostly mild with some strong ones. The
options and the table are those of every core benchmark (``core_tables.py``).

    .venv/bin/python benchmarks/bench_ops_gated_linear_attention.py
    .venv/bin/python benchmarks/bench_ops_gated_linear_attention.py --lengths 64 128 --repeats 1
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from core_tables import core_parser, print_core_table, print_setup

from lmlab.ops.gated_linear_attention import gated_linear_attention

DECAYS = ["none", "head", "channel"]


def make_step(args: argparse.Namespace, decay: str, mode: str, T: int) -> Callable[[], None]:
    B, H, K, V = args.batch, args.heads, args.key_dim, args.value_dim
    q = torch.randn(B, T, H, K, requires_grad=True)
    k = torch.randn(B, T, H, K, requires_grad=True)
    v = torch.randn(B, T, H, V, requires_grad=True)
    grad = torch.randn(B, T, H, V)
    log_decay = None
    if decay != "none":
        shape = (B, T, H) if decay == "head" else (B, T, H, K)
        log_decay = F.logsigmoid(torch.randn(shape) + 2.0).requires_grad_()

    def step() -> None:
        o, _ = gated_linear_attention(q, k, v, log_decay, mode=mode, chunk_size=args.chunk_size)
        o.backward(grad)

    return step


def main() -> None:
    parser = core_parser(__doc__.splitlines()[0], batch=1, chunk_size=64)
    parser.add_argument("--decays", nargs="+", default=DECAYS, choices=DECAYS)
    args = parser.parse_args()
    print_setup(args, "log decay = logsigmoid(N(2, 1))")
    for decay in args.decays:
        print_core_table(args, f"log_decay: {decay}", partial(make_step, args, decay))


if __name__ == "__main__":
    main()
