"""Windows of a run's *training* text as SFT examples, for distilling a speculative draft.

``lmlab finetune --teacher`` distils only during SFT, which reads ``{"prompt", "completion"}``
examples; this writes random windows of ``data.seq_len + 1`` tokens of the run's training
split (never its validation split, so ``lmlab eval`` stays a held-out measure) as examples with
an empty prompt, so that every next token of the window is a distillation target:

    python benchmarks/distill_windows.py runs/spec-draft2 runs/spec-windows.jsonl --windows 12000
    lmlab finetune runs/spec-draft2 --data runs/spec-windows.jsonl --teacher runs/spec-target
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lmlab.data.dataset import prepare_data
from lmlab.files import atomic_write_text
from lmlab.train.run import load_trained_model


def training_windows(run: str, windows: int, seed: int) -> list[str]:
    """``windows`` texts of ``data.seq_len + 1`` tokens each, cut at random starts (drawn with
    ``seed``) from the training split of ``run``'s data, encoded with its own tokenizer."""
    config, _, tokenizer, _ = load_trained_model(run)
    data, _ = prepare_data(config.data, tokenizer)
    length = config.data.seq_len + 1
    starts = np.random.default_rng(seed).integers(0, len(data.train) - length, windows)
    return [tokenizer.decode(data.train[start : start + length]) for start in starts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run folder whose data and tokenizer to use")
    parser.add_argument("out", type=Path, help="JSONL file to write")
    parser.add_argument("--windows", type=int, default=12000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    texts = training_windows(args.run, args.windows, args.seed)
    lines = (json.dumps({"prompt": "", "completion": text}) for text in texts)
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print(f"{len(texts)} windows of the training split of {args.run} -> {args.out}")


if __name__ == "__main__":
    main()
