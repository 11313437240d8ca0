"""Causal short depthwise convolution with a decode state (Mamba-2, Gated DeltaNet, KDA).

``y[t] = act(bias + sum_{j < W} weight[:, j] * x[t - (W - 1) + j])``: ``weight[:, W - 1]``
multiplies the current input, as in ``nn.Conv1d(D, D, W, groups=D, padding=W - 1)`` truncated
to the first ``T`` outputs (Mamba's layout, with the ``[D, 1, W]`` weight squeezed to
``[D, W]``). Inputs before the sequence come from ``state``, the last ``W - 1`` inputs of the
previous call (zeros when ``None``), so prefill + one-token steps and split segments give the
same outputs as one call over the whole sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_ACTIVATIONS = (None, "silu")


def short_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    state: torch.Tensor | None = None,
    activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Convolve ``x: [B, T, D]`` with ``weight: [D, W]`` (+ ``bias: [D]``), then ``activation``
    (``None`` or ``"silu"``). ``state: [B, W - 1, D]``.

    Returns ``y: [B, T, D]`` (dtype of ``x``; computed in float32, or float64 for float64
    inputs, also under autocast) and the new state: the last ``W - 1`` inputs (dtype of ``x``),
    reaching into ``state`` when ``T < W - 1``.
    """
    _check_args(x, weight, bias, state, activation)
    batch, time, channels = x.shape
    width = weight.shape[1]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    if state is None:
        state = x.new_zeros(batch, width - 1, channels)
    padded = torch.cat((state.to(x.dtype), x), dim=1)  # [B, W - 1 + T, D]
    tail = padded[:, padded.shape[1] - (width - 1) :].clone()
    w = weight.to(dtype)
    b = None if bias is None else bias.to(dtype)
    # Autocast would run the products in bfloat16, which is slower than float32 on CPU.
    with torch.autocast(x.device.type, enabled=False):
        inputs = padded.to(dtype)
        if time == 1:
            # Decode: one dot product per channel.
            y = torch.einsum("bwd,dw->bd", inputs, w)[:, None]
        else:
            y = _ShiftedSum.apply(inputs, w)
        if b is not None:
            y = y + b
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype), tail


class _ShiftedSum(torch.autograd.Function):
    """``y[t] = sum_j w[:, j] * padded[t + j]`` as ``W`` shifted products.

    On CPU this beats a depthwise ``conv1d``, whose backward is slow at these widths (Gated
    DeltaNet and Mamba-2 layers train 1.1-1.2x faster with it: ``benchmarks/bench_short_conv.py``),
    and the hand-written backward accumulates every shift into one gradient in place, where
    autograd would zero-fill a full-size gradient per shifted view and add them up.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, padded: torch.Tensor, w: torch.Tensor
    ) -> torch.Tensor:
        width, time = w.shape[1], padded.shape[1] - w.shape[1] + 1
        y = padded[:, width - 1 :] * w[:, width - 1]
        for j in range(width - 1):
            y.addcmul_(padded[:, j : j + time], w[:, j])
        ctx.save_for_backward(padded, w)
        return y

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        padded, w = ctx.saved_tensors
        width, time = w.shape[1], grad.shape[1]
        d_padded = d_w = None
        if ctx.needs_input_grad[0]:
            d_padded = torch.empty_like(padded)
            d_padded[:, : width - 1] = 0.0
            torch.mul(grad, w[:, width - 1], out=d_padded[:, width - 1 :])
            for j in range(width - 1):
                d_padded[:, j : j + time].addcmul_(grad, w[:, j])
        if ctx.needs_input_grad[1]:
            # Multiply then reduce: einsum's per-channel dot product is ~20x slower on CPU.
            d_w = torch.stack(
                [(grad * padded[:, j : j + time]).sum((0, 1)) for j in range(width)], dim=1
            )
        return d_padded, d_w


def _check_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    state: torch.Tensor | None,
    activation: str | None,
) -> None:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if x.dim() != 3 or x.shape[1] == 0:
        raise ValueError(f"x must be [batch, time >= 1, channels], got shape {tuple(x.shape)}")
    batch, _, channels = x.shape
    if weight.dim() != 2 or weight.shape[0] != channels or weight.shape[1] < 1:
        raise ValueError(
            f"weight must be [channels={channels}, width >= 1], got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (channels,):
        raise ValueError(f"bias must be [channels={channels}], got {tuple(bias.shape)}")
    expected = (batch, weight.shape[1] - 1, channels)
    if state is not None and tuple(state.shape) != expected:
        raise ValueError(
            f"state must be [batch, width - 1, channels] = {expected}, got {tuple(state.shape)}"
        )
