"""GRPO on ``addition2`` from a fine-tuned run: exact match on the 200 held-out problems
(greedy, cached decode) before and after, wall time, rollout tokens/s and the share of a step
spent generating; prints Markdown tables.

    python benchmarks/bench_grpo.py --parent /tmp/bench-posttrain/pipeline-sft --out /tmp/bench-grpo
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from bench_posttrain import held_out_accuracy
from timing import machine, print_table

from lmlab.posttrain.launch import start_run
from lmlab.train.launch import parent_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parent", type=Path, required=True, help="the run to start from")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--kl", type=float, default=0.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{machine()}, {torch.get_num_threads()} threads\n")
    name = "grpo"
    config = parent_config(
        None,
        [
            f"train.init_from={args.parent}",
            "post.method=grpo",
            "post.data=addition2",
            f"post.grpo_group={args.group}",
            f"post.grpo_kl={args.kl}",
            f"post.rollout_temperature={args.temperature}",
            "post.max_new_tokens=8",
            "post.eval_examples=0",
            f"train.batch_size={args.prompts}",
            f"train.max_steps={args.steps}",
            f"train.eval_interval={args.steps}",
            f"train.lr={args.lr}",
            "train.warmup_steps=10",
            f"out_dir={args.out}",
            f"name={name}",
        ],
    )
    before = held_out_accuracy(args.parent)
    trainer = start_run(config, name, show_progress=False)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    after = held_out_accuracy(args.out / name)
    rows = [json.loads(line) for line in (args.out / name / "metrics.jsonl").open()]
    train = [r for r in rows if r["kind"] == "train" and r["step"] > 1]
    rate = statistics.median(r["task"]["rollout_tokens_per_s"] for r in train)
    share = statistics.median(1000 * r["task"]["generate_s"] / r["step_ms"] for r in train)
    first, last = train[: len(train) // 10], train[-(len(train) // 10) :]
    print_table(
        ["stage", "steps", "wall s", "exact match (200 held out)"],
        [
            ["parent", "", "", f"{before:.1%}"],
            [
                f"+ GRPO (G={args.group}, {args.prompts} prompts/step)",
                args.steps,
                f"{seconds:.0f}",
                f"{after:.1%}",
            ],
        ],
    )
    print()
    print_table(
        ["rollout reward, first 10% of steps", "last 10%", "rollout tokens/s", "share generating"],
        [
            [
                f"{statistics.mean(r['task']['reward'] for r in first):.3f}",
                f"{statistics.mean(r['task']['reward'] for r in last):.3f}",
                f"{rate:.0f}",
                f"{share:.0%}",
            ]
        ],
    )


if __name__ == "__main__":
    main()
