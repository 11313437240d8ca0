"""Validation metrics: loss, perplexity and bits per byte.

Bits per byte divides by the raw UTF-8 bytes of the text rather than tokens, so runs with
different tokenizers (byte, char, BPE) are comparable.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from lmlab.data.dataset import eval_batches
from lmlab.data.tokens import TokenData
from lmlab.model.lm import LanguageModel


@torch.no_grad()
def evaluate(
    model: LanguageModel,
    data: TokenData,
    *,
    batch_size: int,
    seq_len: int,
    max_batches: int,
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
    split: str = "val",
) -> dict[str, float]:
    """Mean next-token loss over fixed windows of a split, with perplexity and bits per byte."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    tokens = data.val if split == "val" else data.train
    for x, y in eval_batches(tokens, batch_size, seq_len, max_batches):
        x, y = x.to(device), y.to(device)
        with autocast or contextlib.nullcontext():
            logits, _ = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
        total += loss.item()
        count += y.numel()
    model.train(was_training)
    mean = total / count
    return {
        "loss": mean,
        "perplexity": math.exp(min(mean, 700.0)),
        "bits_per_byte": data.bits_per_byte(mean, split=split),
        "tokens": count,
    }
