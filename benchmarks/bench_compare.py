"""Benchmarks of ``lmlab compare``: the cost of its machinery, and the calibration of its verdict.

Overhead (default): one comparison (two arms x seeds) in this process; the table splits its wall
time into training steps, evaluations, per-run setup (data, model, checkpoints) and the compare
machinery itself (planning, statistics, report, plots, registry), which should stay under 5%.

Calibration (``--calibrate``): real tiny runs of one config at ``--runs`` seeds, and of a clearly
better one (width 64 instead of 16), then many simulated comparisons drawn from them:
- A/A: baseline and candidate are both the narrow config at disjoint random seeds, i.e. the
  candidate differs only in its randomness. The rule must PROMOTE in at most 5% of them.
- power: the wide config against the narrow one at the same seed indices.
- Gaussian A/A: normal noise with the measured seed-to-seed standard deviation, many repeats.
A literal A/A (the same config twice in ``lmlab compare``) is deterministic: seed index i gives
the same run in both arms, the difference is exactly zero and the verdict is NO EVIDENCE; the
table checks that too.

    python benchmarks/bench_compare.py --budget tokens=300k --seeds 2
    python benchmarks/bench_compare.py --calibrate --runs 24
Run alone: other busy processes distort the timings.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from timing import print_table

from lmlab.config.load import build_config
from lmlab.experiments.compare import plan_compare, run_compare
from lmlab.experiments.stats import NO_EVIDENCE, PROMOTE, REGRESSION, Rule, decide
from lmlab.train.launch import new_trainer

TINY = [
    "model.n_layers=1",
    "model.n_heads=2",
    "data.seq_len=32",
    "train.batch_size=8",
    "train.eval_batches=4",
    "train.warmup_steps=5",
    "train.threads=1",
]
OVERHEAD_ARMS = ["model.d_model=64", "model.n_layers=2", "data.seq_len=64", "train.batch_size=16"]


def overhead(args: argparse.Namespace, scratch: Path) -> None:
    started = time.perf_counter()
    plan = plan_compare(
        ["gpt-tiny"],
        budget=args.budget,
        variants=["model.d_model=96"],
        overrides=[*OVERHEAD_ARMS, *args.overrides],
        seeds=args.seeds,
        out=scratch / "compare",
    )
    results = run_compare(plan, show_progress=False, registry_location=scratch / "reg.sqlite")
    wall = time.perf_counter() - started
    runs = results["runs"]
    train = sum(r.get("train_seconds", 0.0) for r in runs)
    evals = sum(r.get("eval_seconds", 0.0) for r in runs)
    per_run = sum(r["wall_seconds"] for r in runs)
    rows = [
        ("training steps (sum of train_seconds)", train),
        ("evaluations (sum of eval rows' eval_ms)", evals),
        ("run setup: data, model, checkpoints", per_run - train - evals),
        ("compare machinery: plan, stats, report, plots, registry", wall - per_run),
        ("compare wall time", wall),
    ]
    print(f"\ngpt-tiny vs +d_model=96: {args.seeds} seeds, {args.budget}, {len(runs)} runs")
    cells = [[name, f"{seconds:.2f}", f"{100 * seconds / wall:.1f}%"] for name, seconds in rows]
    print_table(["part", "seconds", "share of wall"], cells, align="lrr")
    print(
        f"\nbeyond training steps: {100 * (wall - train) / wall:.1f}% of wall time; "
        f"beyond the runs (machinery): {100 * (wall - per_run) / wall:.1f}% (target < 5%)"
    )


def final_bpb(overrides: list[str], seeds: range, scratch: Path, tag: str) -> list[float]:
    values = []
    for seed in seeds:
        config = build_config(
            "gpt-tiny",
            [*overrides, f"train.seed={seed}", f"out_dir={scratch}", f"name={tag}-{seed}"],
        )
        values.append(new_trainer(config, tag, show_progress=False).train()["val_bits_per_byte"])
    return values


def rates(pairs: list[tuple[np.ndarray, np.ndarray]], rule: Rule) -> dict[str, float]:
    counts = {PROMOTE: 0, REGRESSION: 0, NO_EVIDENCE: 0}
    for base, cand in pairs:
        verdict = decide(rule, "b", "a", dict(enumerate(base)), dict(enumerate(cand)), len(base))
        counts[verdict.decision] += 1
    return {k: v / len(pairs) for k, v in counts.items()}


def calibrate(args: argparse.Namespace, scratch: Path) -> None:
    budget = [f"train.max_tokens={args.tokens}", "train.max_time=0", *TINY, *args.overrides]
    started = time.perf_counter()
    narrow = np.array(final_bpb([*budget, "model.d_model=16"], range(args.runs), scratch, "n"))
    wide = np.array(final_bpb([*budget, "model.d_model=64"], range(args.runs), scratch, "w"))
    again = final_bpb([*budget, "model.d_model=16"], range(1), scratch, "again")[0]
    spent = time.perf_counter() - started
    sd = statistics.stdev(narrow)
    n, rng = args.seeds, np.random.default_rng(0)
    disjoint, same_index = [], []
    for _ in range(args.repeats):
        order = rng.permutation(args.runs)
        disjoint.append((narrow[order[:n]], narrow[order[n : 2 * n]]))
        same_index.append((narrow[order[:n]], wide[order[:n]]))
    gaussian = [(rng.normal(0, sd, n), rng.normal(0, sd, n)) for _ in range(args.repeats)]
    print(
        f"\n{2 * args.runs + 1} real runs ({args.tokens} tokens each, embedded Shakespeare, "
        f"char tokens) in {spent:.0f}s; narrow (width 16) final bits/byte "
        f"{narrow.mean():.4f} ± {sd:.4f} (sd over {args.runs} seeds), wide (width 64) "
        f"{wide.mean():.4f} ± {statistics.stdev(wide):.4f}"
    )
    print(f"same seed twice: |difference| = {abs(again - narrow[0]):.2e} bits/byte\n")
    print(f"{args.repeats} simulated comparisons of {n} seeds per arm each")
    rows = []
    for label, pairs in (
        ("A/A: narrow vs narrow at disjoint seeds (real runs)", disjoint),
        ("A/A: Gaussian noise with the measured sd", gaussian),
        ("wide vs narrow, same seed indices (real runs)", same_index),
    ):
        for rule_name, rule in (("default", Rule()), ("min_effect 0", Rule(min_effect=0.0))):
            found = rates(pairs, rule)
            shares = [f"{100 * found[d]:.1f}%" for d in (PROMOTE, REGRESSION, NO_EVIDENCE)]
            rows.append([label, rule_name, *shares])
    header = ["scenario", "rule", "PROMOTE", "REGRESSION", "NO EVIDENCE"]
    print_table(header, rows, align="llrrr")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibrate", action="store_true", help="A/A and power simulation")
    parser.add_argument("--budget", default="tokens=300k", help="overhead: per-run budget")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per arm")
    parser.add_argument("--runs", type=int, default=16, help="calibrate: real runs per config")
    parser.add_argument("--tokens", type=int, default=12_000, help="calibrate: tokens per run")
    parser.add_argument("--repeats", type=int, default=4000, help="calibrate: simulations")
    parser.add_argument("overrides", nargs="*", help="key=value settings for every run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        (calibrate if args.calibrate else overhead)(args, Path(folder))


if __name__ == "__main__":
    main()
