"""MQAR time-to-solve: lmlab's probe loop at Zoology's smallest setting (length 64, 4 kv pairs,
vocab 256, 16k examples), 2 layers of width 64, attention against linear mixers.

Why: the probe loop must be fast enough to sweep learning rates per architecture, and its
numbers must agree with Zoology's (an attention model solves this setting; linear mixers need
more width). Prints one line per (mixer, lr): accuracy, epochs, seconds, solved (>= 0.99).

Usage (the lead runs it alone; it takes minutes per mixer on 2 cores):
    .venv/bin/python benchmarks/bench_probes.py [--mixers attention,gla] [--lrs 1e-3,3e-3]
    (bdh is much slower per step at this size: a 2-step smoke run took ~3 minutes)
    .venv/bin/python benchmarks/bench_probes.py --examples 512 --epochs 1   # smoke run

Zoology side by side (its own trainer, timed to 0.99): benchmarks/bench_zoology.py.
"""

from __future__ import annotations

import argparse
import time

import torch

from lmlab.config.load import build_config
from lmlab.eval.probes import ProbeTask
from lmlab.experiments.probe import parse_list, run_probe
from lmlab.layers.registry import token_mixer_names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixers", default="attention,gla")
    parser.add_argument("--lrs", default="1e-3,3e-3,1e-2")
    parser.add_argument("--examples", type=int, default=16_000)
    parser.add_argument("--epochs", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    task = ProbeTask("mqar", 64, vocab_size=256, items=4, num_examples=args.examples)
    for mixer in args.mixers.split(","):
        if mixer not in token_mixer_names():
            print(f"{mixer}: not registered, skipped")
            continue
        config = build_config(
            "gpt-tiny", [f"model.mixer={mixer}", "model.d_model=64", "model.n_layers=2"]
        )
        started = time.perf_counter()
        report = run_probe(
            config,
            task,
            epochs=args.epochs,
            lrs=parse_list(args.lrs, float, "--lrs"),
            log=lambda line, m=mixer: print(f"{m}: {line}", flush=True),
        )
        best = report["scores"][task.name()]
        solved = [r for r in report["sweep"] if r["solved"]]
        fastest = min((r["seconds"] for r in solved), default=float("nan"))
        print(
            f"{mixer}: best accuracy {best:.4f}, fastest solve {fastest:.1f}s, "
            f"sweep {time.perf_counter() - started:.1f}s"
        )


if __name__ == "__main__":
    main()
