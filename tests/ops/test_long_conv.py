"""Causal long convolution: FFT == direct == explicit loop == token-by-token, gradients too."""

from __future__ import annotations

import pytest
import torch
from conftest import max_rel_err

from lmlab.ops.long_conv import causal_long_conv, causal_long_conv_step


def make_inputs(
    batch: int = 2, time: int = 9, channels: int = 3, taps: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, time, channels, generator=gen, dtype=torch.float64)
    filt = torch.randn(channels, taps or time + 5, generator=gen, dtype=torch.float64)
    bias = torch.randn(channels, generator=gen, dtype=torch.float64)
    return u, filt, bias


def grads_of(fn, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(out.shape, generator=gen, dtype=torch.float64)  # same for every dtype
    (out * weight.to(out.dtype)).sum().backward()
    return tuple(leaf.grad for leaf in leaves)


def test_direct_matches_explicit_loop() -> None:
    u, filt, bias = make_inputs(time=6)
    expected = torch.zeros_like(u)
    for t in range(6):
        for s in range(t + 1):
            expected[:, t] += filt[:, t - s] * u[:, s]
    expected += bias * u
    assert max_rel_err(causal_long_conv(u, filt, bias, mode="direct"), expected) < 1e-14


@pytest.mark.parametrize("time", [1, 7, 64, 100])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fft_matches_direct_with_gradients(time: int, with_bias: bool) -> None:
    u, filt, bias = make_inputs(time=time, seed=time)
    extra = (bias,) if with_bias else ()
    fft = causal_long_conv(u, filt, *extra)
    direct = causal_long_conv(u, filt, *extra, mode="direct")
    assert max_rel_err(fft, direct) < 1e-12
    grads_fft = grads_of(lambda *t: causal_long_conv(*t), u, filt, *extra)
    grads_direct = grads_of(lambda *t: causal_long_conv(*t, mode="direct"), u, filt, *extra)
    for got, want in zip(grads_fft, grads_direct, strict=True):
        assert max_rel_err(got, want) < 1e-12


def test_float32_fft_on_a_long_sequence_with_gradients() -> None:
    u, filt, bias = make_inputs(batch=1, time=1500, channels=4)
    filt = filt * torch.exp(-torch.arange(filt.shape[1], dtype=torch.float64) / 300)
    y = causal_long_conv(u.float(), filt.float(), bias.float())
    assert y.dtype == torch.float32
    assert max_rel_err(y, causal_long_conv(u, filt, bias, mode="direct")) < 1e-5
    grads = grads_of(causal_long_conv, u.float(), filt.float(), bias.float())
    expected = grads_of(lambda *t: causal_long_conv(*t, mode="direct"), u, filt, bias)
    for got, want in zip(grads, expected, strict=True):
        assert max_rel_err(got, want) < 1e-5


def test_bfloat16_input_keeps_its_dtype() -> None:
    u, filt, bias = make_inputs(time=30)
    y = causal_long_conv(u.bfloat16(), filt.bfloat16(), bias.bfloat16())
    assert y.dtype == torch.bfloat16
    reference = causal_long_conv(u.bfloat16().double(), filt.bfloat16().double(), bias.bfloat16())
    assert max_rel_err(y, reference) < 1e-2


def test_bfloat16_autocast_still_computes_in_float32() -> None:
    u, filt, bias = (t.float() for t in make_inputs(time=30))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        results = [causal_long_conv(u, filt, bias, mode=m) for m in ("fft", "direct")]
        step = causal_long_conv_step(u, filt, bias)
    expected = causal_long_conv(u.double(), filt.double(), bias.double())
    for y in results:
        assert y.dtype == torch.float32
        assert max_rel_err(y, expected) < 1e-6
    assert max_rel_err(step, expected[:, -1:]) < 1e-6


def test_taps_beyond_the_sequence_are_ignored() -> None:
    u, filt, _ = make_inputs(time=8, taps=20)
    changed = filt.clone()
    changed[:, 8:] = 100.0
    assert torch.equal(causal_long_conv(u, filt), causal_long_conv(u, changed))
    assert torch.equal(causal_long_conv_step(u, filt), causal_long_conv_step(u, changed))


def test_token_by_token_decode_matches_full_with_gradients() -> None:
    u, filt, bias = make_inputs(time=12)
    full = causal_long_conv(u, filt, bias)

    def stepwise(u: torch.Tensor, filt: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [causal_long_conv_step(u[:, : t + 1], filt, bias) for t in range(u.shape[1])], 1
        )

    assert max_rel_err(stepwise(u, filt, bias), full) < 1e-12
    grads_step = grads_of(stepwise, u, filt, bias)
    grads_full = grads_of(causal_long_conv, u, filt, bias)
    for got, want in zip(grads_step, grads_full, strict=True):
        assert max_rel_err(got, want) < 1e-12


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((torch.zeros(2, 5, 3), torch.zeros(3, 4)), "filt must be"),
        ((torch.zeros(2, 5, 3), torch.zeros(2, 8)), "filt must be"),
        ((torch.zeros(2, 5, 3), torch.zeros(3, 8), torch.zeros(2)), "bias must be"),
        ((torch.zeros(5, 3), torch.zeros(3, 8)), "u must be"),
    ],
)
def test_invalid_arguments_raise(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        causal_long_conv(*args)
    with pytest.raises(ValueError, match=message):
        causal_long_conv_step(*args)


def test_unknown_mode_raises() -> None:
    u, filt, _ = make_inputs()
    with pytest.raises(ValueError, match="mode"):
        causal_long_conv(u, filt, mode="circular")
