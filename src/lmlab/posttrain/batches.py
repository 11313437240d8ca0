"""Batches of whole examples for post-training: drawn in a fixed order per epoch (a function of
the seed and the step, so a resumed run draws the same ones) and right-padded to the longest
in the batch.

Padding on the right keeps examples apart for every mixer without further work: each example
starts at position 0 from a fresh state (attention sees no other example, a recurrent or
convolution state starts at zero), and the pad tokens come after its last real token, so
causal mixers never let them reach it; the pads get no loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lmlab.config.schema import TrainConfig

IGNORE = -100
"""The label of a token without a loss (``F.cross_entropy``'s ``ignore_index``)."""
PAD_ID = 0


@dataclass
class PaddedBatch:
    """``inputs [B, T]`` and ``labels [B, T]`` (the next token, or IGNORE where untrained or
    padding); ``lengths`` the real tokens of each row."""

    inputs: torch.Tensor
    labels: torch.Tensor
    lengths: torch.Tensor

    def to(self, device: torch.device) -> PaddedBatch:
        return PaddedBatch(self.inputs.to(device), self.labels.to(device), self.lengths)

    @property
    def real_tokens(self) -> int:
        return int(self.lengths.sum())


def pad_examples(ids: Sequence[np.ndarray], trained: Sequence[np.ndarray]) -> PaddedBatch:
    """Inputs and labels of whole examples (each ``ids`` with its ``trained`` mask: a token
    gets a loss where its mask is set), right-padded to the longest."""
    width = max(len(row) for row in ids) - 1
    inputs = torch.full((len(ids), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(ids), width), IGNORE, dtype=torch.long)
    for row, (tokens, mask) in enumerate(zip(ids, trained, strict=True)):
        tokens = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
        n = len(tokens) - 1
        inputs[row, :n] = tokens[:-1]
        labels[row, :n] = torch.where(torch.from_numpy(mask[1:]), tokens[1:], IGNORE)
    lengths = torch.tensor([len(row) - 1 for row in ids])
    return PaddedBatch(inputs, labels, lengths)


def epoch_indices(count: int, seed: int, start: int, size: int) -> list[int]:
    """Example indices ``start .. start + size`` of an endless stream that visits all ``count``
    examples once per epoch, in an order drawn per epoch from ``(seed, epoch)``."""
    orders: dict[int, np.ndarray] = {}
    out = []
    for position in range(start, start + size):
        epoch, offset = divmod(position, count)
        if epoch not in orders:
            orders[epoch] = np.random.default_rng([seed, epoch]).permutation(count)
        out.append(int(orders[epoch][offset]))
    return out


def step_indices(count: int, train: TrainConfig, step: int, micro: int) -> list[int]:
    """The ``train.batch_size`` example indices of micro-batch ``micro`` of step ``step``."""
    start = (step * train.grad_accum + micro) * train.batch_size
    return epoch_indices(count, train.seed, start, train.batch_size)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) at every position ``[B, T]``, 0 where the label is IGNORE."""
    picked = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1))
    return picked.squeeze(-1) * (labels != IGNORE)
