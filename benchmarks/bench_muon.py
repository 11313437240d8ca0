"""Muon's optimiser step: same-shape matrices orthogonalised in one batched Newton-Schulz
iteration against one matrix at a time (one optimiser per matrix), on a preset's model with
random gradients; prints a Markdown table. Run alone.

    .venv/bin/python benchmarks/bench_muon.py --presets gpt-tiny,moh,sigma
"""

from __future__ import annotations

import argparse

import torch
from timing import print_table, time_ms

from lmlab.config.load import build_config
from lmlab.model.lm import LanguageModel
from lmlab.train.muon import Muon
from lmlab.train.optim import split_parameters


def muon_matrices(preset: str) -> list[torch.nn.Parameter]:
    """The parameters Muon trains in ``preset``'s model, with random gradients."""
    config = build_config(preset, ["model.vocab_size=256"])
    torch.manual_seed(0)
    model = LanguageModel(config.model)
    matrices = [param for _, param in split_parameters(model)[0]]
    for param in matrices:
        param.grad = torch.randn_like(param)
    return matrices


def rows(presets: list[str], repeats: int):
    for preset in presets:
        matrices = muon_matrices(preset)
        batched = Muon(matrices)
        separate = [Muon([param]) for param in matrices]
        shapes = len({tuple(p.shape) for p in matrices})
        batched_ms = time_ms(batched.step, repeats)
        separate_ms = time_ms(lambda opts=separate: [o.step() for o in opts], repeats)
        yield [
            preset,
            len(matrices),
            shapes,
            f"{separate_ms:.1f}",
            f"{batched_ms:.1f}",
            f"{separate_ms / batched_ms:.2f}x",
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="gpt-tiny,moh,sigma")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    header = ["preset", "matrices", "shapes", "one at a time ms", "batched ms", "speed-up"]
    print_table(header, rows(args.presets.split(","), args.repeats), "lrrrrr")


if __name__ == "__main__":
    main()
