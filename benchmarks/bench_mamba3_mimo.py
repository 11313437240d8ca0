"""Mamba-3 SISO against MIMO of growing rank, timed in turns; prints Markdown tables.

(a) One ``mamba3`` layer, forward + backward ms at each ``--lengths`` T, every rank timed in
    turns (``bench_mixers.layer_step``), wall and CPU time.
(b) Training tokens/s of a small ``LanguageModel`` (forward + backward + AdamW, float32) per
    rank, the models stepped in turns.

``bench_mixers.py --mixer-options mamba3.mimo_rank=R`` measures one rank per run; on a machine
shared with other jobs the load moves between runs, so the ranks are timed here in one process,
in turns, and the CPU time of one thread (which excludes waiting for a core) is shown beside
the wall time.
"""

from __future__ import annotations

import argparse
import copy

import torch
from bench_mixers import VOCAB, layer_step, model_config
from timing import interleaved_wall_and_cpu_ms, machine, print_table

from lmlab.model.lm import LanguageModel


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="1,2,4", help="mimo_rank values (1: SISO)")
    parser.add_argument("--lengths", default="256,1024", help="(a) T values")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--n-heads", type=int, default=4)
    parser.add_argument("--n-layers", type=int, default=4, help="(b) layers")
    parser.add_argument("--layer-batch", type=int, default=1, help="(a) batch size")
    parser.add_argument("--batch", type=int, default=8, help="(b) batch size")
    parser.add_argument("--seq-len", type=int, default=256, help="(b) sequence length")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    return parser.parse_args()


def with_rank(args: argparse.Namespace, rank: int) -> argparse.Namespace:
    ranked = copy.copy(args)
    ranked.mixer_options = {"mamba3": {"mimo_rank": rank}}
    return ranked


def train_step(args: argparse.Namespace):
    """One forward + backward + AdamW step of the small model (float32)."""
    torch.manual_seed(0)
    model = LanguageModel(model_config(args, "mamba3", args.n_layers))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, VOCAB, (args.batch, args.seq_len + 1))

    def step() -> None:
        logits, _ = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return model, step


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    ranks = [int(r) for r in args.ranks.split(",")]
    variants = {rank: with_rank(args, rank) for rank in ranks}
    print(f"{machine()}, {torch.get_num_threads()} thread(s)\n")

    print(
        f"### (a) One mamba3 layer, forward + backward ms (float32, batch {args.layer_batch}, "
        f"d_model {args.d_model}; ranks timed in turns, median of {args.repeats}; wall / CPU "
        f"(CPU time over the first rank's))\n"
    )
    lengths = [int(t) for t in args.lengths.split(",")]
    timed = {
        length: interleaved_wall_and_cpu_ms(
            {rank: layer_step(variant, "mamba3", length) for rank, variant in variants.items()},
            args.repeats,
        )
        for length in lengths
    }

    def cell(length: int, rank: int) -> str:
        wall, cpu = timed[length][rank]
        return f"{wall:.1f} / {cpu:.1f} ({cpu / timed[length][ranks[0]][1]:.2f}x)"

    print_table(
        ["mimo_rank", *(f"T={length}" for length in lengths)],
        ([rank, *(cell(length, rank) for length in lengths)] for rank in ranks),
    )

    print(
        f"\n### (b) Training tokens/s, {args.n_layers} layers, d_model {args.d_model}, "
        f"{args.n_heads} heads, batch {args.batch} x {args.seq_len}, forward + backward + AdamW "
        f"(float32; models stepped in turns, median of {args.repeats}; wall / CPU)\n"
    )
    steps = {rank: train_step(variant) for rank, variant in variants.items()}
    times = interleaved_wall_and_cpu_ms(
        {rank: step for rank, (_, step) in steps.items()}, args.repeats
    )
    tokens = args.batch * args.seq_len
    print_table(
        ["mimo_rank", "params", "tok/s (wall)", "tok/s (CPU)"],
        (
            [
                rank,
                f"{sum(p.numel() for p in steps[rank][0].parameters()) / 1e6:.2f}M",
                f"{tokens / times[rank][0] * 1000:.0f}",
                f"{tokens / times[rank][1] * 1000:.0f}",
            ]
            for rank in ranks
        ),
    )


if __name__ == "__main__":
    main()
