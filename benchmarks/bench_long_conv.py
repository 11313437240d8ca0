"""Benchmark the causal long convolution (Hyena): lmlab's FFT path against the same FFT product
differentiated by autograd.

Why: ``lmlab.ops.long_conv`` transforms along the contiguous axis and writes the backward as
two more products of spectra; autograd's formulas for ``rfft``/``irfft`` go through
complex-to-complex transforms and zero fills. Times forward + backward of both (median) with
gradients for the input and the filter, on the shapes of a Hyena layer at
growing lengths, and checks that they agree.

    .venv/bin/python benchmarks/bench_long_conv.py [--threads 2] [--repeats 20]
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from timing import versus_main, versus_row

from lmlab.ops.long_conv import causal_long_conv

SHAPES = [(8, 256, 256), (1, 1024, 256), (1, 4096, 256), (1, 8192, 512)]
"""(batch, time, channels)."""


def autograd_fft_conv(u: torch.Tensor, filt: torch.Tensor) -> torch.Tensor:
    """The textbook form: zero-pad to ``2T``, multiply the spectra, keep the first ``T``."""
    n = 2 * u.shape[1]
    spectrum = torch.fft.rfft(u, n=n, dim=1) * torch.fft.rfft(filt, n=n, dim=1).T
    return torch.fft.irfft(spectrum, n=n, dim=1)[:, : u.shape[1]]


def rows(repeats: int) -> Iterator[tuple[str, ...]]:
    for batch, time, channels in SHAPES:
        u = torch.randn(batch, time, channels, requires_grad=True)
        filt = (torch.randn(channels, time) / time**0.5).requires_grad_()
        label = f"{batch}x{time}x{channels}"
        yield versus_row(label, autograd_fft_conv, causal_long_conv, (u, filt), repeats)


if __name__ == "__main__":
    versus_main(__doc__, "autograd FFT", rows)
