"""Benchmark the causal long convolution (Hyena): lmlab's FFT path against the same FFT product
differentiated by autograd.

Why: ``lmlab.ops.long_conv`` transforms along the contiguous axis and writes the backward as
two more products of spectra; autograd's formulas for ``rfft``/``irfft`` go through
complex-to-complex transforms and zero fills. Times forward + backward of both (timed in turns,
median) with gradients for the input and the filter, on the shapes of a Hyena layer at
growing lengths, and checks that they agree.

    .venv/bin/python benchmarks/bench_long_conv.py [--threads 2] [--repeats 20]
"""

from __future__ import annotations

import argparse

import torch
from timing import interleaved_ms, print_table

from lmlab.ops.long_conv import causal_long_conv

SHAPES = [(8, 256, 256), (1, 1024, 256), (1, 4096, 256), (1, 8192, 512)]
"""(batch, time, channels)."""


def autograd_fft_conv(u: torch.Tensor, filt: torch.Tensor) -> torch.Tensor:
    """The textbook form: zero-pad to ``2T``, multiply the spectra, keep the first ``T``."""
    n = 2 * u.shape[1]
    spectrum = torch.fft.rfft(u, n=n, dim=1) * torch.fft.rfft(filt, n=n, dim=1).T
    return torch.fft.irfft(spectrum, n=n, dim=1)[:, : u.shape[1]]


def measure(batch: int, time: int, channels: int, repeats: int) -> tuple:
    """One table row: both forms' forward + backward ms, the speed-up and their difference."""
    u = torch.randn(batch, time, channels, requires_grad=True)
    filt = (torch.randn(channels, time) / time**0.5).requires_grad_()
    grad = torch.randn(batch, time, channels)
    error = (causal_long_conv(u, filt) - autograd_fft_conv(u, filt)).abs().max().item()
    measured = interleaved_ms(
        {
            "autograd": lambda: autograd_fft_conv(u, filt).backward(grad),
            "lmlab": lambda: causal_long_conv(u, filt).backward(grad),
        },
        repeats,
        warmup=3,
    )
    return (
        f"{batch}x{time}x{channels}",
        f"{measured['autograd']:.2f}",
        f"{measured['lmlab']:.2f}",
        f"{measured['autograd'] / measured['lmlab']:.2f}x",
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
        ("shape B x T x D", "autograd FFT ms", "lmlab ms", "speed-up", "max abs diff"),
        (measure(*shape, args.repeats) for shape in SHAPES),
        align="lrrrr",
    )


if __name__ == "__main__":
    main()
