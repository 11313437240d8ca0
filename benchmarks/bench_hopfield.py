"""Hopfield associative memory probe (seed 002, C-9): recall against N and beta; prints Markdown.

Stores N random bipolar patterns of D bits, queries each (up to ``--queries``) with ``--noise``
of its bits flipped, retrieves with the modern Hopfield update (``lmlab.ops.hopfield``,
``--steps`` updates) and reports the exact-recall fraction (every bit's sign right) per N and
beta, one table per width D; the target is over 95% recall at 20% noise. A pure-math probe: no
training, a few seconds on a CPU.

    python benchmarks/bench_hopfield.py
    python benchmarks/bench_hopfield.py --dims 32,64 --steps 3
"""

from __future__ import annotations

import argparse

import torch
from timing import print_table

from lmlab.memory.hopfield import hopfield_recall


def recall(args: argparse.Namespace, n: int, dim: int, beta: float) -> float:
    result = hopfield_recall(
        n, dim, beta, noise=args.noise, steps=args.steps, queries=args.queries, seed=args.seed
    )
    return result["recall"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="32,64,128")
    parser.add_argument("--patterns", default="2,8,32,128,512,2048")
    parser.add_argument("--betas", default="0.01,0.05,0.1,0.25,1,4")
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    betas = [float(b) for b in args.betas.split(",")]
    print(
        f"exact recall, {args.noise:.0%} of the bits flipped, {args.steps} update(s), "
        f"{args.queries} queries (cycling over the patterns), seed {args.seed}"
    )
    for dim in (int(d) for d in args.dims.split(",")):
        print(f"\nD = {dim} bits")
        rows = (
            (n, *(f"{recall(args, n, dim, beta):.3f}" for beta in betas))
            for n in (int(n) for n in args.patterns.split(","))
        )
        print_table(("N", *(f"beta {b:g}" for b in betas)), rows, align="r" * (len(betas) + 1))


if __name__ == "__main__":
    main()
