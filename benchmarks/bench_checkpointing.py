"""Activation checkpointing: peak memory saved and time paid per training step.

Each variant runs in a fresh subprocess, because on CPU the peak resident set is a per-process
high-water mark (``lmlab.train.device.peak_memory_bytes``): measuring two variants in one process
would report the larger peak twice. A worker builds the model and AdamW, records its resident
set (``base``), then runs one untimed warm-up step and ``--steps`` timed forward + backward +
optimiser steps in float32, and reports the median step time and the peak resident set;
``peak - base`` is what the activations cost, plus gradients and optimiser moments (equal in
both variants).

    python benchmarks/bench_checkpointing.py                    # 6 layers, width 384, 8 x 512
    python benchmarks/bench_checkpointing.py --layers 2 --width 64 --seq 64 --batch 2 --steps 2

Run alone: other processes on a 2-core machine distort the times (not the memory).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

VARIANTS = [("plain", False), ("checkpointed", True)]


def worker(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    from lmlab.config.schema import ModelConfig
    from lmlab.model.lm import LanguageModel
    from lmlab.train.device import peak_memory_bytes

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=args.vocab,
        d_model=args.width,
        n_layers=args.layers,
        n_heads=args.heads,
        mixer=args.mixer,
        mod_capacity=args.mod_capacity,
    )
    model = LanguageModel(cfg).train()
    model.set_activation_checkpointing(args.checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cpu = torch.device("cpu")
    base = peak_memory_bytes(cpu)
    times = []
    for step in range(args.steps + 1):  # step 0 warms up and is not timed
        tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
        started = time.perf_counter()
        logits, _ = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        aux = model.auxiliary_loss()
        (loss if aux is None else loss + aux).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(1000 * (time.perf_counter() - started))
    return {
        "ms_per_step": statistics.median(times),
        "peak_mb": peak_memory_bytes(cpu) / 2**20,
        "base_mb": base / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--mixer", default="attention")
    parser.add_argument("--mod-capacity", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpointing", type=int, default=-1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.checkpointing >= 0:
        print(json.dumps(worker(args)))
        return
    shape = (
        f"{args.layers} layers x {args.width}, {args.mixer}, batch {args.batch} x seq {args.seq}, "
        f"mod_capacity {args.mod_capacity}, fp32, {args.threads} threads, median of {args.steps}"
    )
    print(f"activation checkpointing: {shape}\n")
    print(f"{'variant':<14}{'ms/step':>10}{'peak MB':>10}{'peak-base MB':>14}")
    results = {}
    for name, enabled in VARIANTS:
        command = [sys.executable, __file__, *sys.argv[1:], f"--checkpointing={int(enabled)}"]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        result = results[name] = json.loads(out.strip().splitlines()[-1])
        print(
            f"{name:<14}{result['ms_per_step']:>10.1f}{result['peak_mb']:>10.0f}"
            f"{result['peak_mb'] - result['base_mb']:>14.0f}"
        )
    plain, saved = results["plain"], results["checkpointed"]
    grown = (plain["peak_mb"] - plain["base_mb"], saved["peak_mb"] - saved["base_mb"])
    print(
        f"\ncheckpointing: {plain['peak_mb'] - saved['peak_mb']:.0f} MB less peak memory "
        f"({grown[1] / max(grown[0], 1e-9):.2f}x the growth over the model), "
        f"{saved['ms_per_step'] / plain['ms_per_step']:.2f}x the step time"
    )


if __name__ == "__main__":
    main()
