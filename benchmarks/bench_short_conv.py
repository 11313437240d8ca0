"""Benchmark the causal short convolution: lmlab's shifted sums against a depthwise conv1d.

Why: ``lmlab.ops.short_conv`` computes ``W`` shifted products instead of calling
``F.conv1d(groups=D)``; on CPU the depthwise convolution's backward is slow at the widths these
mixers use. Times forward + backward (median) of both on shapes of the mixers that use it
(attention's ``qkv_conv`` at the MQAR probe's size, Mamba-2 and Gated DeltaNet blocks) and checks
that they agree.

    .venv/bin/python benchmarks/bench_short_conv.py [--threads 2] [--repeats 20]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from timing import print_table, time_ms

from lmlab.ops.short_conv import short_conv

SHAPES = [(64, 64, 192, 3), (8, 256, 768, 4), (8, 512, 1536, 4)]
"""(batch, time, channels, width)."""


def depthwise_conv1d(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The textbook form: left-padded ``conv1d`` with one group per channel."""
    padded = F.pad(x.transpose(1, 2), (weight.shape[1] - 1, 0))
    return F.conv1d(padded, weight[:, None], groups=x.shape[-1]).transpose(1, 2)


def measure(batch: int, time: int, channels: int, width: int, repeats: int) -> tuple:
    """One table row: both forms' forward + backward ms, the speed-up and their difference."""
    x = torch.randn(batch, time, channels, requires_grad=True)
    weight = torch.randn(channels, width, requires_grad=True)
    grad = torch.randn(batch, time, channels)
    error = (short_conv(x, weight)[0] - depthwise_conv1d(x, weight)).abs().max().item()
    conv1d_ms = time_ms(lambda: depthwise_conv1d(x, weight).backward(grad), repeats, warmup=3)
    lmlab_ms = time_ms(lambda: short_conv(x, weight)[0].backward(grad), repeats, warmup=3)
    return (
        f"{batch}x{time}x{channels}, W={width}",
        f"{conv1d_ms:.2f}",
        f"{lmlab_ms:.2f}",
        f"{conv1d_ms / lmlab_ms:.2f}x",
        f"{error:.1e}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"forward + backward, float32, {args.threads} threads, median of {args.repeats}")
    print_table(
        ("shape B x T x D", "conv1d ms", "lmlab ms", "speed-up", "max abs diff"),
        (measure(*shape, args.repeats) for shape in SHAPES),
        align="lrrrr",
    )


if __name__ == "__main__":
    main()
