"""Benchmark the Titans linear memory core: chunk form vs the recurrent oracle vs causal SDPA.

Unit keys and queries, learning rates uniform in (0, 0.5), momentum and retention log-gates
uniform in (-0.1, 0); ``--chunk-size`` is the paper's gradient chunk (part of the model: both
forms use it). The options and the table are those of every core benchmark (``core_tables.py``).

    .venv/bin/python benchmarks/bench_ops_neural_memory.py --threads 2
    .venv/bin/python benchmarks/bench_ops_neural_memory.py --lengths 64 128 --recurrent-max-t 128
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from core_tables import core_parser, print_core_table, print_setup

from lmlab.ops.neural_memory import neural_memory


def make_step(args: argparse.Namespace, mode: str, T: int) -> Callable[[], None]:
    B, H, K, V = args.batch, args.heads, args.key_dim, args.value_dim
    q = F.normalize(torch.randn(B, T, H, K), dim=-1).requires_grad_()
    k = F.normalize(torch.randn(B, T, H, K), dim=-1).requires_grad_()
    v = torch.randn(B, T, H, V, requires_grad=True)
    lr = (0.5 * torch.rand(B, T, H)).requires_grad_()
    log_momentum, log_retain = ((-0.1 * torch.rand(B, T, H)).requires_grad_() for _ in range(2))
    memory = (0.02 * torch.randn(B, H, K, V)).requires_grad_()
    grad = torch.randn(B, T, H, V)

    def step() -> None:
        o, _ = neural_memory(
            q,
            k,
            v,
            lr,
            log_momentum,
            log_retain,
            initial_state=(memory,),
            mode=mode,
            chunk_size=args.chunk_size,
        )
        o.backward(grad)

    return step


def main() -> None:
    parser = core_parser(__doc__.splitlines()[0], batch=2, chunk_size=16)
    args = parser.parse_args()
    print_setup(args, "theta in (0, 0.5), log gates in (-0.1, 0)")
    title = f"Titans linear memory, chunk {args.chunk_size}"
    print_core_table(args, title, partial(make_step, args))


if __name__ == "__main__":
    main()
