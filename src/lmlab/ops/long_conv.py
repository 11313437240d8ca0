"""Causal long convolution (Hyena's global filter), by FFT for training and direct for decode.

``y[b, t, d] = sum_{s <= t} filt[d, t - s] * u[b, s, d]  (+ bias[d] * u[b, t, d])``

The FFT path zero-pads to ``2T`` so the circular convolution equals the linear (causal) one,
and runs in float32 (float64 for float64 inputs) whatever the input dtype or autocast:
``rfft`` has no bfloat16 kernel on CPU and its rounding error grows with ``T``.

Decode: a long convolution has no finite recurrent state (Hyena's filters are implicit, not
an SSM), so one new token needs every past input of the layer. The decode state is the input
history ``[B, T_past, D]``: append the new input and call :func:`causal_long_conv_step`, which
costs ``O(T * D)`` per token instead of an FFT over the whole history.
"""

from __future__ import annotations

import torch


def causal_long_conv(
    u: torch.Tensor, filt: torch.Tensor, bias: torch.Tensor | None = None, *, mode: str = "fft"
) -> torch.Tensor:
    """Causal depthwise convolution of ``u: [B, T, D]`` with ``filt: [D, T_f]`` (``T_f >= T``;
    the first ``T`` taps are used); ``bias: [D]`` adds the skip term ``bias * u``.

    ``mode="fft"`` is the ``O(T log T)`` path; ``mode="direct"`` is the ``O(T^2)`` oracle.
    Returns ``y`` with the dtype of ``u``.
    """
    _check_args(u, filt, bias)
    if mode not in ("fft", "direct"):
        raise ValueError(f"mode must be 'fft' or 'direct', got {mode!r}")
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    time = u.shape[1]
    x = u.to(dtype)
    taps = filt[:, :time].to(dtype)
    with torch.autocast(u.device.type, enabled=False):  # keep the promised precision
        if mode == "fft":
            y = _FFTConv.apply(x, taps)
        else:
            lags = torch.arange(time, device=u.device)
            lag = lags[:, None] - lags[None, :]  # t - s
            toeplitz = torch.where(lag >= 0, taps[:, lag.clamp(min=0)], 0.0)  # [D, T, T]
            y = torch.einsum("dts,bsd->btd", toeplitz, x)
    if bias is not None:
        y = y + bias.to(dtype) * x
    return y.to(u.dtype)


class _FFTConv(torch.autograd.Function):
    """``y = irfft(rfft(x) * rfft(taps))[:T]`` over ``2T`` points, transforming along the
    contiguous last axis of ``[B, D, T]``; the backward is two more products of spectra, both
    exact because the zero padding keeps the circular correlations from wrapping:

        dx = irfft(G * conj(H))[:T],    dtaps = irfft(sum_b G * conj(X))[:T]

    with ``G = rfft(dy)``. Autograd's own formulas for ``rfft`` and ``irfft`` go through
    complex-to-complex transforms and zero fills, which made a Hyena layer's two long
    convolutions cost about a third of its training step on CPU.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, taps: torch.Tensor
    ) -> torch.Tensor:
        time = x.shape[1]
        x_f = torch.fft.rfft(x.transpose(1, 2), n=2 * time)  # [B, D, T + 1]
        taps_f = torch.fft.rfft(taps, n=2 * time)  # [D, T + 1]
        ctx.save_for_backward(x_f, taps_f)
        y = torch.fft.irfft(x_f * taps_f, n=2 * time)[..., :time]
        return y.transpose(1, 2).contiguous()

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x_f, taps_f = ctx.saved_tensors
        time = grad.shape[1]
        grad_f = torch.fft.rfft(grad.transpose(1, 2), n=2 * time)
        d_x = d_taps = None
        if ctx.needs_input_grad[0]:
            d_x = torch.fft.irfft(grad_f * taps_f.conj(), n=2 * time)[..., :time].transpose(1, 2)
        if ctx.needs_input_grad[1]:
            d_taps = torch.fft.irfft((grad_f * x_f.conj()).sum(0), n=2 * time)[..., :time]
        return d_x, d_taps


def causal_long_conv_step(
    u_history: torch.Tensor, filt: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The output for the newest token only: ``causal_long_conv(u_history, ...)[:, -1:]``.

    ``u_history: [B, T, D]`` holds every input of the layer so far, the new one last; returns
    ``[B, 1, D]`` in the dtype of ``u_history``.
    """
    _check_args(u_history, filt, bias)
    dtype = torch.float64 if u_history.dtype == torch.float64 else torch.float32
    time = u_history.shape[1]
    x = u_history.to(dtype)
    taps = filt[:, :time].to(dtype)  # tap j multiplies the input j steps back
    with torch.autocast(u_history.device.type, enabled=False):
        y = torch.einsum("btd,dt->bd", x.flip(1), taps)
    if bias is not None:
        y = y + bias.to(dtype) * x[:, -1]
    return y[:, None].to(u_history.dtype)


def _check_args(u: torch.Tensor, filt: torch.Tensor, bias: torch.Tensor | None) -> None:
    if u.dim() != 3 or u.shape[1] == 0:
        raise ValueError(f"u must be [batch, time >= 1, channels], got shape {tuple(u.shape)}")
    _, time, channels = u.shape
    if filt.dim() != 2 or filt.shape[0] != channels or filt.shape[1] < time:
        raise ValueError(
            f"filt must be [channels={channels}, taps >= time={time}], got {tuple(filt.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (channels,):
        raise ValueError(f"bias must be [channels={channels}], got {tuple(bias.shape)}")
