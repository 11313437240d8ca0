"""Post-training measurements; prints Markdown tables.

1. The addition pipeline: a tiny model pretrained on the shipped arithmetic text
   (``pretraining_text()``), then SFT on ``addition2``: exact-match accuracy on the 200 held-out
   problems (greedy, cached decode) before and after, with wall times.
2. Full fine-tuning against LoRA and CPU QLoRA (int8 base) of one model on ``addition2``:
   trainable parameters, bytes of weights / gradients / optimiser state, and tokens/s (median
   over steps after the first), beside pretraining the same model on the arithmetic text.

Tokens/s counts the tokens a step trains on: ``batch x seq_len`` for pretraining, the real
(non-padding) tokens of the examples for fine-tuning.

    python benchmarks/bench_posttrain.py --out /tmp/bench-posttrain
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
from lmlab.data.examples import read_examples
from lmlab.posttrain.accuracy import accuracy
from lmlab.posttrain.datasets import pretraining_text, shipped_path
from lmlab.posttrain.launch import start_run
from lmlab.posttrain.sft import questions_of
from lmlab.train.adapters import trainable_parameters
from lmlab.train.launch import new_trainer, parent_config
from lmlab.train.run import load_trained_model


def model_settings(width: int, layers: int) -> list[str]:
    return [
        f"model.d_model={width}",
        f"model.n_layers={layers}",
        "model.n_heads=4",
        "data.seq_len=32",
        "train.batch_size=32",
        "train.precision=fp32",
        "train.optimizer=adamw",
        "train.eval_batches=4",
    ]


def pretrain(out: Path, name: str, settings: list[str], steps: int) -> tuple[Path, float]:
    text = out / "arithmetic.txt"
    text.write_text(pretraining_text(), encoding="utf-8")
    config = build_config(
        None,
        [
            *settings,
            f"data.path={text}",
            f"out_dir={out}",
            f"name={name}",
            f"train.max_steps={steps}",
            f"train.eval_interval={steps}",
            "train.warmup_steps=20",
            "train.lr=3e-3",
        ],
    )
    started = time.perf_counter()
    new_trainer(config, name, show_progress=False).train()
    return out / name, time.perf_counter() - started


def finetune(parent: Path, name: str, steps: int, *extra: str) -> tuple[Path, float, object]:
    config = parent_config(
        None,
        [
            f"train.init_from={parent}",
            "post.method=sft",
            "post.data=addition2",
            f"name={name}",
            f"train.max_steps={steps}",
            f"train.eval_interval={steps}",
            "train.warmup_steps=10",
            "post.eval_examples=0",
            *extra,
        ],
    )
    trainer = start_run(config, name, show_progress=False)
    started = time.perf_counter()
    trainer.train()
    return parent.parent / name, time.perf_counter() - started, trainer


def held_out_accuracy(run: Path) -> float:
    _, model, tokenizer, _ = load_trained_model(run)
    questions = questions_of(
        read_examples(shipped_path("addition2", "sft", "test"), ("instruction",)), None
    )
    return accuracy(model, tokenizer, questions, 8, torch.device("cpu"))


def median_tokens_per_s(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in rows if r["kind"] == "train" and r["step"] > 1]
    return statistics.median(rates)


def training_bytes(trainer) -> tuple[int, int, int]:
    """Bytes of the model's weights (parameters and buffers), of the gradients (one per
    trainable parameter) and of the optimiser state."""
    model = trainer.model
    weights = nbytes([*model.parameters(), *model.buffers()])  # parameters(): tied ones once
    grads = nbytes([p for p in model.parameters() if p.requires_grad])
    state = nbytes(
        [
            t
            for optimizer in trainer.optimizers.optimizers.values()
            for values in optimizer.state.values()
            for t in values.values()
            if torch.is_tensor(t)
        ]
    )
    return weights, grads, state


def nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def pipeline(out: Path, width: int, pretrain_steps: int, sft_steps: int) -> None:
    base, pretrain_s = pretrain(out, "pipeline-base", model_settings(width, 2), pretrain_steps)
    before = held_out_accuracy(base)
    sft, sft_s, _ = finetune(base, "pipeline-sft", sft_steps, "train.lr=1e-3")
    after = held_out_accuracy(sft)
    print(f"\n### Addition at d_model={width}, 2 layers: pretraining, then SFT on addition2\n")
    print_table(
        ["stage", "steps", "wall s", "exact match"],
        [
            ["pretrained (arithmetic text)", pretrain_steps, f"{pretrain_s:.0f}", f"{before:.1%}"],
            ["+ SFT (completion-only loss)", sft_steps, f"{sft_s:.0f}", f"{after:.1%}"],
        ],
        align="lrrr",
    )


def methods(out: Path, width: int, layers: int, steps: int) -> None:
    settings = model_settings(width, layers)
    base, _ = pretrain(out, "speed-base", settings, steps)
    rows = [["pretraining", "all", "", "", "", f"{median_tokens_per_s(base):,.0f}", "1.00"]]
    pretrain_rate = median_tokens_per_s(base)
    for label, extra in (
        ("SFT, full fine-tuning", []),
        ("SFT, LoRA r=8", ["post.lora=true"]),
        ("SFT, QLoRA r=8 (int8 base)", ["post.lora=true", "post.quantize_base=int8"]),
    ):
        name = "speed-" + label.split(",")[1].split()[0].lower()
        run, _, trainer = finetune(base, name, steps, "train.lr=1e-3", *extra)
        trained, total = trainable_parameters(trainer.model)
        weights, grads, state = training_bytes(trainer)
        rate = median_tokens_per_s(run)
        rows.append(
            [
                label,
                f"{trained:,} of {total:,} ({trained / total:.2%})",
                f"{weights / 2**20:.2f}",
                f"{grads / 2**20:.2f}",
                f"{state / 2**20:.2f}",
                f"{rate:,.0f}",
                f"{rate / pretrain_rate:.2f}",
            ]
        )
    print(f"\n### Methods at d_model={width}, {layers} layers, batch 32, float32, AdamW\n")
    print_table(
        [
            "run",
            "trainable",
            "weights MiB",
            "grads MiB",
            "optimiser MiB",
            "tokens/s",
            "vs pretrain",
        ],
        rows,
        align="llrrrrr",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="scratch folder for the runs")
    parser.add_argument("--pipeline-width", type=int, default=64)
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--sft-steps", type=int, default=200)
    parser.add_argument("--speed-steps", type=int, default=15)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=False)
    print(f"{machine()}, {torch.get_num_threads()} threads")
    pipeline(args.out, args.pipeline_width, args.pretrain_steps, args.sft_steps)
    methods(args.out, args.width, args.layers, args.speed_steps)


if __name__ == "__main__":
    main()
