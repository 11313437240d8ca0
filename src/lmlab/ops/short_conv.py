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
    # Autocast would run conv1d in bfloat16, which is slower than float32 on CPU.
    with torch.autocast(x.device.type, enabled=False):
        if time == 1:
            # Decode: one dot product per channel; conv1d's setup costs more than the math.
            y = torch.einsum("bwd,dw->bd", padded.to(dtype), w)[:, None]
            if b is not None:
                y = y + b
        else:
            y = F.conv1d(padded.to(dtype).transpose(1, 2), w[:, None], b, groups=channels)
            y = y.transpose(1, 2)
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype), tail


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
