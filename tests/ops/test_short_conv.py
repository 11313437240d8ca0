"""Causal short convolution: shifted sums == explicit loop == Mamba's padded ``nn.Conv1d``, decode
and segments == whole, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import max_rel_err

from lmlab.ops.short_conv import short_conv


def make_inputs(
    batch: int = 2, time: int = 10, channels: int = 5, width: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return (
        randn(batch, time, channels),
        randn(channels, width),
        randn(channels),
        randn(batch, width - 1, channels),
    )


def explicit_loop(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    state: torch.Tensor,
    activation: str | None,
) -> torch.Tensor:
    """y[t] = bias + sum_j weight[:, j] * (input W - 1 - j steps back); before 0: state."""
    width = weight.shape[1]
    history = torch.cat((state, x), dim=1)
    out = []
    for t in range(x.shape[1]):
        now = t + width - 1  # index of x[:, t] in history
        y = sum(weight[:, j] * history[:, now - (width - 1 - j)] for j in range(width))
        if bias is not None:
            y = y + bias
        out.append(F.silu(y) if activation == "silu" else y)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("time", [1, 2, 9])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_explicit_loop_with_gradients(
    time: int, activation: str | None, with_bias: bool, with_state: bool
) -> None:
    x, weight, bias, state = make_inputs(time=time)
    if not with_bias:
        bias = None
    if not with_state:
        state = torch.zeros_like(state)
    leaves = [t.clone().requires_grad_() for t in (x, weight, state)]
    bias_leaf = None if bias is None else bias.clone().requires_grad_()
    y, tail = short_conv(
        leaves[0], leaves[1], bias_leaf, leaves[2] if with_state else None, activation
    )
    ref_leaves = [t.clone().requires_grad_() for t in (x, weight, state)]
    ref_bias = None if bias is None else bias.clone().requires_grad_()
    expected = explicit_loop(ref_leaves[0], ref_leaves[1], ref_bias, ref_leaves[2], activation)
    assert max_rel_err(y, expected) < 1e-13
    assert torch.equal(tail, torch.cat((state, x), dim=1)[:, -3:])

    weight_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)
    (y * weight_y).sum().backward()
    (expected * weight_y).sum().backward()
    checked = list(zip(leaves, ref_leaves, strict=True))
    if not with_state:
        checked = checked[:2]
    if bias is not None:
        checked.append((bias_leaf, ref_bias))
    for got, want in checked:
        assert max_rel_err(got.grad, want.grad) < 1e-13


def test_prefill_then_steps_match_full() -> None:
    x, weight, bias, _ = make_inputs(time=12)
    full, full_tail = short_conv(x, weight, bias, activation="silu")
    y, tail = short_conv(x[:, :5], weight, bias, activation="silu")
    outputs = [y]
    for t in range(5, 12):
        y, tail = short_conv(x[:, t : t + 1], weight, bias, tail, activation="silu")
        outputs.append(y)
    assert max_rel_err(torch.cat(outputs, dim=1), full) < 1e-14
    assert torch.equal(tail, full_tail)


def test_segments_shorter_than_the_window_match_whole() -> None:
    x, weight, bias, state = make_inputs(time=11)
    full, full_tail = short_conv(x, weight, bias, state)
    outputs, tail = [], state
    for piece in (slice(0, 2), slice(2, 3), slice(3, 9), slice(9, 11)):
        y, tail = short_conv(x[:, piece], weight, bias, tail)
        outputs.append(y)
    assert max_rel_err(torch.cat(outputs, dim=1), full) < 1e-14
    assert torch.equal(tail, full_tail)


def test_short_input_tail_reaches_into_the_state() -> None:
    x, weight, _, state = make_inputs(time=1)
    _, tail = short_conv(x, weight, state=state)
    assert torch.equal(tail, torch.cat((state[:, 1:], x), dim=1))


def test_width_one_is_a_pointwise_scale() -> None:
    x, weight, bias, _ = make_inputs(width=1)
    y, tail = short_conv(x, weight, bias)
    assert tail.shape == (2, 0, 5)
    assert max_rel_err(y, x * weight[:, 0] + bias) < 1e-15


def test_bfloat16_input_keeps_its_dtype() -> None:
    x, weight, bias, state = (t.bfloat16() for t in make_inputs())
    y, tail = short_conv(x, weight, bias, state, activation="silu")
    assert y.dtype == torch.bfloat16 and tail.dtype == torch.bfloat16
    expected = explicit_loop(*(t.double() for t in (x, weight, bias, state)), "silu")
    assert max_rel_err(y, expected) < 1e-2


@pytest.mark.parametrize("time", [1, 7])
def test_bfloat16_autocast_still_computes_in_float32(time: int) -> None:
    x, weight, bias, state = (t.float() for t in make_inputs(time=time))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = short_conv(x, weight, bias, state, activation="silu")
    assert y.dtype == torch.float32
    expected = explicit_loop(*(t.double() for t in (x, weight, bias, state)), "silu")
    assert max_rel_err(y, expected) < 1e-6


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"activation": "relu"}, "activation"),
        ({"weight": torch.zeros(4, 4, dtype=torch.float64)}, "weight must be"),
        ({"bias": torch.zeros(3, dtype=torch.float64)}, "bias must be"),
        ({"state": torch.zeros(2, 4, 5, dtype=torch.float64)}, "state must be"),
    ],
)
def test_invalid_arguments_raise(change: dict, message: str) -> None:
    x, weight, bias, state = make_inputs()
    kwargs = {"weight": weight, "bias": bias, "state": state, "activation": None} | change
    with pytest.raises(ValueError, match=message):
        short_conv(x, **kwargs)


def test_matches_padded_depthwise_conv1d() -> None:
    """The layout Mamba checkpoints use: ``nn.Conv1d(D, D, W, groups=D, padding=W - 1)``, its
    first ``T`` outputs."""
    x, weight, bias, _ = make_inputs(time=11, width=4)
    conv = torch.nn.Conv1d(5, 5, 4, groups=5, padding=3, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(weight[:, None])
        conv.bias.copy_(bias)
        expected = conv(x.transpose(1, 2))[..., :11].transpose(1, 2)
    y, _ = short_conv(x, weight, bias)
    assert max_rel_err(y, expected) < 1e-12
