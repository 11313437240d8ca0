"""Benchmark the gated delta rule: chunk form vs the recurrent oracle vs causal softmax SDPA.

One table per decay kind (none: DeltaNet, head: Gated DeltaNet, channel: KDA), with
L2-normalised keys, ``beta`` in (0, 1) and log decays uniform in (-1, 0) (over a chunk of 64
the per-channel decay then spans more than the factorised limit: the sub-chunked path). The
options and the table are those of every core benchmark (``core_tables.py``).

    .venv/bin/python benchmarks/bench_ops_gated_delta_rule.py
    .venv/bin/python benchmarks/bench_ops_gated_delta_rule.py --lengths 64 128 --decays head
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from core_tables import core_parser, print_core_table, print_setup

from lmlab.ops.gated_delta_rule import gated_delta_rule

DECAYS = ["none", "head", "channel"]


def make_step(args: argparse.Namespace, decay: str, mode: str, T: int) -> Callable[[], None]:
    B, H, K, V = args.batch, args.heads, args.key_dim, args.value_dim
    q = torch.randn(B, T, H, K, requires_grad=True)
    k = F.normalize(torch.randn(B, T, H, K), dim=-1).requires_grad_()
    v = torch.randn(B, T, H, V, requires_grad=True)
    beta = torch.rand(B, T, H).requires_grad_()
    shape = {"none": None, "head": (B, T, H), "channel": (B, T, H, K)}[decay]
    log_decay = None if shape is None else (-torch.rand(shape)).requires_grad_()
    grad = torch.randn(B, T, H, V)

    def step() -> None:
        o, _ = gated_delta_rule(q, k, v, beta, log_decay, mode=mode, chunk_size=args.chunk_size)
        o.backward(grad)

    return step


def main() -> None:
    parser = core_parser(__doc__.splitlines()[0], batch=2, chunk_size=64)
    parser.add_argument("--decays", nargs="+", default=DECAYS, choices=DECAYS)
    args = parser.parse_args()
    print_setup(args, "log decay uniform in (-1, 0)")
    for decay in args.decays:
        print_core_table(args, f"decay: {decay}", partial(make_step, args, decay))


if __name__ == "__main__":
    main()
