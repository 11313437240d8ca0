"""Train each shipped preset on its own budget and print the figures its docs page quotes.

For every preset (or YAML file) given: parameters, steps and tokens trained, training tokens/s,
and the final validation loss in nats/token and bits per byte, read from the run's
``summary.json``. Extra ``key=value`` settings apply to every run (e.g. ``train.max_time=900``
for the longer budget, or a smaller ``train.eval_batches``). Each run is its own process, one
after another; run it alone, since any other busy process on a 2-core machine distorts tokens/s.

    python benchmarks/bench_presets.py                         # every preset, default budgets
    python benchmarks/bench_presets.py nexus train.max_time=900
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lmlab.config.load import preset_names


def train(arm: str, overrides: list[str], out: Path) -> dict:
    """One ``lmlab train`` process; its summary plus the whole process's wall time."""
    name = Path(arm).stem
    source = ["--config", arm] if arm.endswith((".yaml", ".yml")) else ["--preset", arm]
    command = [sys.executable, "-m", "lmlab", "train", *source, "--quiet"]
    command += [*overrides, f"out_dir={out}", f"name={name}"]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    summary = json.loads((out / name / "summary.json").read_text())
    summary["wall_seconds"] = time.perf_counter() - start
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("items", nargs="*", help="presets or YAML files, then key=value settings")
    parser.add_argument("--out", help="folder for the runs (default: a temporary folder)")
    args = parser.parse_args()
    arms = [item for item in args.items if "=" not in item] or preset_names()
    overrides = [item for item in args.items if "=" in item]
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(args.out or scratch)
        rows = [(arm, train(arm, overrides, out)) for arm in arms]
    print(f"\nsettings: {' '.join(overrides) or '(preset defaults)'}\n")
    print(
        "| preset | parameters | steps | tokens | train s | tokens/s | val nats/token | bits/byte |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for arm, s in rows:
        print(
            f"| {Path(arm).stem} | {s['parameters']:,} | {s['steps']} | {s['tokens']:,} | "
            f"{s['train_seconds']:.0f} | {s['tokens_per_s']:,.0f} | {s['val_loss']:.3f} | "
            f"{s['val_bits_per_byte']:.3f} |"
        )


if __name__ == "__main__":
    main()
