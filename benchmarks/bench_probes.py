"""MQAR with lmlab's probe loop: attention against linear and memory mixers, a learning-rate
sweep, several seeds.

Why: the probe loop must be fast enough to sweep learning rates per architecture, and its
numbers must agree with Zoology's (an attention model solves the smallest setting; linear mixers
need more width). The defaults are Zoology's smallest setting (length 64, 4 kv pairs, vocab 256,
16k examples, 2 layers of width 64); ``--seq-len``, ``--kv-pairs`` and ``--vocab`` set others.
Prints one line per (mixer, seed, lr): accuracy, epochs, seconds, solved (>= 0.99), then a table
of each mixer's best accuracy over the learning rates, per seed, with mean and standard deviation.

``--results FILE`` appends one JSON line per (mixer, seed, lr) and skips the cells already in
it, so a long sweep can be stopped and resumed, and further seeds added later (for instance at
each mixer's best learning rate of seed 0 only); the table covers every cell in the file.

Usage (it takes minutes per mixer on 2 cores):
    python benchmarks/bench_probes.py [--mixers attention,gla] [--lrs 1e-3,3e-3]
    python benchmarks/bench_probes.py --examples 512 --epochs 1   # smoke run
    python benchmarks/bench_probes.py --seq-len 256 --kv-pairs 16 --vocab 8192 \
        --mixers attention,mamba2 --seeds 0,1,2 --results mqar256.jsonl
    (bdh is much slower per step at the smallest size: a 2-step smoke run took ~3 minutes)

Zoology side by side (its own trainer, timed to 0.99): benchmarks/bench_zoology.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from timing import machine, print_table

from lmlab.config.load import build_config
from lmlab.eval.probes import ProbeTask
from lmlab.experiments.probe import parse_list, run_probe
from lmlab.layers.registry import token_mixer_names


def done_cells(results: Path | None) -> list[dict]:
    if results is None or not results.exists():
        return []
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()]


def summary(cells: list[dict], task: str) -> None:
    """Each mixer's best accuracy over the learning rates tried, per seed, and its mean."""
    best: dict[str, dict[int, dict]] = {}
    for cell in cells:
        if cell["task"] != task:
            continue
        seeds = best.setdefault(cell["mixer"], {})
        if cell["seed"] not in seeds or cell["accuracy"] > seeds[cell["seed"]]["accuracy"]:
            seeds[cell["seed"]] = cell
    rows = []
    for mixer, seeds in best.items():
        scores = [seeds[s]["accuracy"] for s in sorted(seeds)]
        spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
        rows.append(
            [
                mixer,
                " ".join(f"{seeds[s]['accuracy']:.3f}@{seeds[s]['lr']:g}" for s in sorted(seeds)),
                f"{statistics.fmean(scores):.3f} ± {spread:.3f}",
                f"{statistics.fmean(seeds[s]['seconds'] for s in seeds):.0f}",
            ]
        )
    print(f"\n{task}: best accuracy over the learning rates, per seed (accuracy@lr)")
    print_table(["mixer", "per seed", "mean ± sd", "s per run"], rows, align="llrr")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mixers", default="attention,gla")
    parser.add_argument("--lrs", default="1e-3,3e-3,1e-2")
    parser.add_argument("--seeds", default="0", help="task and initialisation seeds, e.g. 0,1,2")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--kv-pairs", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--width", type=int, default=64, help="model.d_model")
    parser.add_argument("--examples", type=int, default=16_000)
    parser.add_argument("--epochs", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every mixer, e.g. model.channel_mixer=none (repeatable)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, help="JSON lines file: append, skip cells done")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{machine()}; {torch.get_num_threads()} torch thread(s); overrides: {args.set}")
    done = done_cells(args.results)
    task_name = ""
    for seed in parse_list(args.seeds, int, "--seeds"):
        task = ProbeTask(
            "mqar",
            args.seq_len,
            vocab_size=args.vocab,
            items=args.kv_pairs,
            num_examples=args.examples,
            seed=seed,
        )
        task_name = task.name()
        for mixer in args.mixers.split(","):
            if mixer not in token_mixer_names():
                print(f"{mixer}: not registered, skipped")
                continue
            config = build_config(
                "gpt-tiny",
                [
                    f"model.mixer={mixer}",
                    f"model.d_model={args.width}",
                    "model.n_layers=2",
                    *args.set,
                ],
            )
            for lr in parse_list(args.lrs, float, "--lrs"):
                key = {"task": task_name, "mixer": mixer, "seed": seed, "lr": lr}
                if any(all(cell[k] == v for k, v in key.items()) for cell in done):
                    continue
                started = time.perf_counter()
                report = run_probe(
                    config,
                    task,
                    epochs=args.epochs,
                    lrs=[lr],
                    batch_size=args.batch_size,
                    warmup=args.warmup,
                )
                result = report["sweep"][0]
                cell = {
                    **key,
                    "accuracy": result["accuracy"][task_name],
                    "solved": result["solved"],
                    "epochs": result["epochs"],
                    "seconds": time.perf_counter() - started,
                }
                print(
                    f"{mixer} seed {seed} lr {lr:g}: accuracy {cell['accuracy']:.4f}, "
                    f"{'solved' if cell['solved'] else 'not solved'}, {cell['epochs']} epochs, "
                    f"{cell['seconds']:.0f}s",
                    flush=True,
                )
                done.append(cell)
                if args.results is not None:
                    with args.results.open("a") as out:
                        out.write(json.dumps(cell) + "\n")
    summary(done, task_name)


if __name__ == "__main__":
    main()
