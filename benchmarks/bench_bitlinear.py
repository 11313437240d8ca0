"""BitLinear cost and export size on gpt-tiny; prints Markdown tables.

1. Training throughput of the gpt-tiny preset (fp32) with full-precision linear layers and with
   ``model.bitlinear=true``, the arms alternating in this process (A B A B ...) so that load from
   other processes hits both alike; tokens/s is each run's own summary figure.
2. Size on disk of the last BitLinear run's packed ternary export against the fp32
   ``model.safetensors`` of its checkpoint.

    python benchmarks/bench_bitlinear.py --steps 30 --repeats 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from lmlab.config.load import build_config
from lmlab.train.export import export_run
from lmlab.train.launch import new_trainer

ARMS = {"linear (fp32)": [], "bitlinear": ["model.bitlinear=true"]}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="gpt-tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2, help="runs per arm, alternating")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory() as scratch:
        last_bit_run = None
        for repeat in range(args.repeats):
            for arm, extra in ARMS.items():
                name = f"{'bit' if extra else 'fp'}{repeat}"
                config = build_config(
                    args.preset,
                    [
                        *extra,
                        f"out_dir={scratch}",
                        f"name={name}",
                        f"train.max_steps={args.steps}",
                        "train.max_time=0",
                        "train.precision=fp32",
                        "train.eval_batches=4",
                        f"train.eval_interval={args.steps}",
                        f"train.checkpoint_interval={args.steps}",
                    ],
                )
                trainer = new_trainer(config, name, show_progress=False)
                results[arm].append(trainer.train())
                if extra:
                    last_bit_run = trainer.run_dir
        print(f"{args.preset}, {args.steps} steps, fp32, {args.repeats} runs per arm\n")
        print("| layers | tokens/s (median) | runs | final val loss |\n|---|---|---|---|")
        base = statistics.median(r["tokens_per_s"] for r in results["linear (fp32)"])
        for arm, runs in results.items():
            speed = statistics.median(r["tokens_per_s"] for r in runs)
            each = ", ".join(f"{r['tokens_per_s']:.0f}" for r in runs)
            loss = statistics.median(r["val_loss"] for r in runs)
            print(f"| {arm} | {speed:.0f} ({speed / base:.2f}x) | {each} | {loss:.3f} |")
        export = export_run(last_bit_run, Path(scratch) / "ternary.safetensors")
        print("\n| file | bytes |\n|---|---|")
        print(f"| fp32 checkpoint model.safetensors | {export['checkpoint_bytes']:,} |")
        print(
            f"| ternary export ({export['ternary_layers']} packed layers) | {export['bytes']:,} "
            f"({export['checkpoint_bytes'] / export['bytes']:.1f}x smaller) |"
        )


if __name__ == "__main__":
    main()
