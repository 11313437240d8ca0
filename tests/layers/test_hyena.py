"""Hyena: safari's reference formulation, causality and autocast at the default sine frequency
(the generic contract, FFT vs direct convolution included, is in ``test_mixer_contract.py``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from mixer_checks import (
    assert_close,
    make_mixer,
    random_input,
)

from lmlab.errors import LmlabError


def safari_filters(f: torch.nn.Module, length: int) -> torch.Tensor:
    """safari's ``HyenaFilter.filter``: a positional table of ``l_max`` rows built with
    ``linspace`` (``PositionalEmbedding``), the sine MLP, the exponential modulation."""
    rows, bands = f.l_max, f.bands
    t = torch.linspace(0, 1, rows, dtype=torch.float64)[:, None]
    w = 2 * math.pi * torch.linspace(0, rows - 1, rows, dtype=torch.float64)[:, None] / rows
    z = torch.exp(-1j * torch.linspace(1e-4, bands - 1, bands, dtype=torch.float64)[None] * w)
    h = torch.cat([t, z.real, z.imag], dim=-1)
    for layer in (f.first, *f.hidden):
        h = torch.sin(f.sine_frequency * layer(h))
    channels = f.last.out_features
    deltas = torch.linspace(math.log(1e-2) / 1.5, math.log(1e-2) / 0.3, channels)
    return (f.last(h) * torch.exp(-t * deltas.abs().double()))[:length]


def safari_fftconv(u: torch.Tensor, k: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """safari's ``fftconv_ref`` on ``u [B, C, L]``, ``k [C, L]``: ``y = k * u + D u``."""
    length = u.shape[-1]
    k_f = torch.fft.rfft(k, n=2 * length) / (2 * length)
    u_f = torch.fft.rfft(u, n=2 * length)
    y = torch.fft.irfft(u_f * k_f, n=2 * length, norm="forward")[..., :length]
    return y + u * skip[:, None]


def safari_forward(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """safari's ``HyenaOperator.forward`` (``order`` gates, ``Conv1d`` short filter), with one
    long convolution per gate, or one fewer (safari's code) when ``m.first_filtered == 1``."""
    width, length = x.shape[-1], x.shape[1]
    u = m.proj(x).transpose(1, 2)
    u = F.conv1d(
        u,
        m.short_weight,
        m.short_bias,
        padding=m.short_weight.shape[-1] - 1,
        groups=u.shape[1],
    )[..., :length]
    *gates, v = u.split(width, dim=1)
    k = safari_filters(m.filter, length).T.reshape(-1, width, length)
    skip = m.filter.skip.view(-1, width)
    for n, gate in enumerate(reversed(gates)):
        if n >= m.first_filtered:
            index = n - m.first_filtered
            v = safari_fftconv(v, k[index], skip[index])
        v = v * gate
    return m.out(v.transpose(1, 2))


@pytest.mark.parametrize("code_form", [False, True])
def test_matches_safari_formulation(code_form):
    mixer = make_mixer("hyena", l_max=64, code_form=code_form)
    x = random_input(2, 40, 32)
    with torch.no_grad():
        y, _ = mixer(x)
        expected = safari_forward(mixer, x)
    assert_close(y, expected, 1e-9, "mixer vs safari formulation")


def test_causal():
    mixer = make_mixer("hyena")
    x = random_input(1, 30, 32).requires_grad_(True)
    y, _ = mixer(x)
    y[:, 12].sum().backward()
    past, future = x.grad[:, :13].abs().max(), x.grad[:, 13:].abs().max()
    assert past > 0 and future < 1e-12 * past, "FFT round-off is the only allowed leak"


def test_bad_options_are_rejected():
    with pytest.raises(LmlabError, match="emb_dim"):
        make_mixer("hyena", emb_dim=4)
    with pytest.raises(LmlabError, match="order"):
        make_mixer("hyena", order=1, code_form=True)


def test_autocast_at_default_frequency():
    mixer = make_mixer("hyena").float()
    x = random_input(2, 40, 32).float()
    with torch.no_grad():
        reference, _ = mixer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, _ = mixer(x)
    assert_close(y.float(), reference, 5e-2, "bfloat16 autocast vs float32")
