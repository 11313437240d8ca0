"""Benchmark the DPLR delta rule (RWKV-7): chunk form vs the recurrent oracle vs causal SDPA.

Inputs are RWKV-7 shaped (``a = -kappa``, ``b = kappa * rate``, log decay in (-0.61, 0)), or
``--strong-decay`` for log decays in (-10, 0), which takes the sub-block path of the chunk form.
The options and the table are those of every core benchmark (``core_tables.py``). Run alone:
other busy processes distort the timings.

    .venv/bin/python benchmarks/bench_ops_dplr_delta_rule.py
    .venv/bin/python benchmarks/bench_ops_dplr_delta_rule.py --lengths 64 128 --recurrent-max-t 64
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from core_tables import core_parser, print_core_table, print_setup

from lmlab.layers.rwkv7 import LOG_DECAY_FLOOR
from lmlab.ops.dplr_delta_rule import dplr_delta_rule


def make_step(args: argparse.Namespace, mode: str, T: int) -> Callable[[], None]:
    B, H, K, V = args.batch, args.heads, args.key_dim, args.value_dim
    keys = (B, T, H, K)
    kappa = F.normalize(torch.randn(keys), dim=-1)
    floor = -10.0 if args.strong_decay else LOG_DECAY_FLOOR
    q, k, v, a, b, log_decay = (
        x.requires_grad_()
        for x in (
            torch.randn(keys),
            torch.randn(keys) * 0.5,
            torch.randn(B, T, H, V),
            -kappa,
            kappa * torch.rand(keys),
            floor * torch.rand(keys),
        )
    )
    grad = torch.randn(B, T, H, V)

    def step() -> None:
        o, _ = dplr_delta_rule(q, k, v, a, b, log_decay, mode=mode, chunk_size=args.chunk_size)
        o.backward(grad)

    return step


def main() -> None:
    parser = core_parser(__doc__.splitlines()[0], batch=2, chunk_size=32)
    parser.add_argument("--strong-decay", action="store_true", help="log decays in (-10, 0)")
    args = parser.parse_args()
    decay = "(-10, 0)" if args.strong_decay else "(-0.61, 0) as RWKV-7"
    print_setup(args, f"log decay in {decay}")
    print_core_table(args, "dplr_delta_rule", partial(make_step, args))


if __name__ == "__main__":
    main()
