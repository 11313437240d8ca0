"""Benchmark the causal short convolution: lmlab's shifted sums against a depthwise conv1d.

Why: ``lmlab.ops.short_conv`` computes ``W`` shifted products instead of calling
``F.conv1d(groups=D)``; on CPU the depthwise convolution's backward is slow at the widths these
mixers use. Times forward + backward of both (median) on shapes of the mixers that use it
(attention's ``qkv_conv`` at the MQAR probe's size, Mamba-2 and Gated DeltaNet blocks), then
whole Gated DeltaNet and Mamba-2 layers with either convolution inside, and checks that they
agree.

    .venv/bin/python benchmarks/bench_short_conv.py [--threads 2] [--repeats 20]
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from unittest import mock

import torch
import torch.nn.functional as F
from timing import versus_main, versus_row
from torch import nn

from lmlab.config.schema import ModelConfig
from lmlab.layers.registry import build_token_mixer
from lmlab.ops.short_conv import short_conv

SHAPES = [(64, 64, 192, 3), (8, 256, 768, 4), (8, 512, 1536, 4)]
"""(batch, time, channels, width)."""

LAYERS = [("gated_deltanet", 8, 256, 256), ("mamba2", 8, 256, 256)]
"""(mixer, batch, time, d_model): the layers of the training table (docs/benchmarks.md, 3)."""

SHORT_CONV = importlib.import_module("lmlab.ops.short_conv")
"""The module (``lmlab.ops`` re-exports its function under the same name)."""


def depthwise_conv1d(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The textbook form: left-padded ``conv1d`` with one group per channel."""
    padded = F.pad(x.transpose(1, 2), (weight.shape[1] - 1, 0))
    return F.conv1d(padded, weight[:, None], groups=x.shape[-1]).transpose(1, 2)


def lmlab_short_conv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return short_conv(x, weight)[0]


def shifted_sum_by_conv1d(padded: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The op's shifted products on its padded input, as one depthwise ``conv1d``."""
    return F.conv1d(padded.transpose(1, 2), weight[:, None], groups=weight.shape[0]).transpose(1, 2)


def layer_output(layer: nn.Module, conv1d: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The mixer layer's forward, with its short convolution's products swapped for ``conv1d``
    when asked (autograd records conv1d's own backward)."""

    def run(x: torch.Tensor) -> torch.Tensor:
        if not conv1d:
            return layer(x)[0]
        with mock.patch.object(SHORT_CONV._ShiftedSum, "apply", shifted_sum_by_conv1d):
            return layer(x)[0]

    return run


def rows(repeats: int) -> Iterator[tuple[str, ...]]:
    """The op on its own, then whole mixer layers with either convolution inside: the figure
    that matters, since a lone op's timing depends on what ran just before it."""
    for batch, time, channels, width in SHAPES:
        x = torch.randn(batch, time, channels, requires_grad=True)
        weight = torch.randn(channels, width, requires_grad=True)
        label = f"{batch}x{time}x{channels}, W={width}"
        yield versus_row(label, depthwise_conv1d, lmlab_short_conv, (x, weight), repeats)
    for mixer, batch, time, width in LAYERS:
        torch.manual_seed(0)
        config = ModelConfig(vocab_size=256, d_model=width, n_heads=4, n_layers=1, mixer=mixer)
        layer = build_token_mixer(mixer, config, layer_idx=0)
        x = torch.randn(batch, time, width, requires_grad=True)
        label = f"{mixer} layer, {batch}x{time}x{width}"
        yield versus_row(
            label,
            layer_output(layer, conv1d=True),
            layer_output(layer, conv1d=False),
            (x,),
            repeats,
        )


if __name__ == "__main__":
    versus_main(__doc__, "conv1d", rows)
