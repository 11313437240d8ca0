"""DPO on the shipped ``addition2`` preference set: held-out preference accuracy (the model's
log p(chosen) > log p(rejected) on the 200 test pairs) and reward accuracy before and after,
with wall time and tokens/s against pretraining the same model; prints Markdown tables.

The parent is pretrained here on the shipped arithmetic text (``pretraining_text()``), unless
``--parent RUN`` names one (e.g. bench_posttrain.py's ``pipeline-base``).

    python benchmarks/bench_dpo.py --out /tmp/bench-dpo
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from bench_posttrain import median_tokens_per_s, model_settings, pretrain
from timing import machine, print_table

from lmlab.posttrain.launch import start_run
from lmlab.train.launch import parent_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parent", type=Path, help="start from this run (skips pretraining)")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--dpo-steps", type=int, default=300)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--loss", default="sigmoid", choices=["sigmoid", "ipo"])
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{machine()}, {torch.get_num_threads()} threads\n")
    rows = [["parent (the reference)", "", ""]]
    parent = args.parent
    if parent is None:
        settings = model_settings(args.width, args.layers)
        parent, seconds = pretrain(args.out, "base", settings, args.pretrain_steps)
        rate = median_tokens_per_s(parent)
        rows = [["pretrained (arithmetic text)", args.pretrain_steps, f"{seconds:.0f}"]]
    name = f"dpo-{args.loss}"
    config = parent_config(
        None,
        [
            f"train.init_from={parent}",
            "post.method=dpo",
            "post.data=addition2",
            f"post.dpo_beta={args.beta}",
            f"post.dpo_loss={args.loss}",
            f"out_dir={args.out}",
            f"name={name}",
            f"train.max_steps={args.dpo_steps}",
            f"train.eval_interval={args.dpo_steps}",
            f"train.lr={args.lr}",
            "train.warmup_steps=10",
        ],
    )
    trainer = start_run(config, name, show_progress=False)
    before = trainer.evaluate()
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    after = trainer.evaluate()
    dpo_rate = median_tokens_per_s(args.out / name)

    def accuracies(result: dict) -> list[str]:
        return [f"{result['preference_accuracy']:.1%}", f"{result['reward_accuracy']:.1%}"]

    table = [[*row, *accuracies(before)] for row in rows]
    table.append([f"+ DPO ({args.loss}, beta {args.beta})", args.dpo_steps, f"{seconds:.0f}"])
    table[-1] += accuracies(after)
    header = ["stage", "steps", "wall s", "preference acc", "reward acc"]
    print_table(header, table)
    if args.parent is None:
        print()
        print_table(
            ["run", "tokens/s", "vs pretrain"],
            [
                ["pretraining", f"{rate:.0f}", "1.00"],
                ["DPO", f"{dpo_rate:.0f}", f"{dpo_rate / rate:.2f}"],
            ],
        )


if __name__ == "__main__":
    main()
