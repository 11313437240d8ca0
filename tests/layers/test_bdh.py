"""BDH: the official attention-matrix formulation (the generic contract is in
``test_mixer_contract.py``)."""

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


def bdh(**options) -> torch.nn.Module:
    """A small float64 BDH (16 neurons per head) with visibly non-zero neurons and gates."""
    return make_mixer("bdh", perturb=True, **({"mlp_multiplier": 1} | options))


def official_rope(x: torch.Tensor) -> torch.Tensor:
    """pathwaysai/bdh's rotation of ``x [B, H, T, N]``: interleaved pairs ``(2j, 2j+1)`` turned
    by ``t / 2**16 ** (2j / N)``, written as phases in turns as in the official code."""
    neurons, time = x.shape[-1], x.shape[-2]
    index = torch.arange(neurons, dtype=torch.float64)
    freqs = 1.0 / (2.0**16) ** ((index / 2).floor() * 2 / neurons) / (2 * math.pi)
    phases = (torch.arange(time, dtype=torch.float64)[:, None] * freqs) % 1 * (2 * math.pi)
    rotated = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).view(x.shape)
    return x * phases.cos() + rotated * phases.sin()


def official_forward(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The official layer body in attention-matrix form, ``(QR @ QR.mT).tril(-1) @ V``, with
    its interleaved RoPE applied to neurons reordered so that its pairs are lmlab's
    rotate-halves pairs ``(j, j + N/2)``; with a forget gate the scores carry the decay mask
    ``(1 - g_j) prod_{j < i < t} g_i``."""
    batch, time, width = x.shape
    heads, neurons = m.n_heads, m.neurons
    x_sparse = F.relu(m.encoder(x)).view(batch, time, heads, neurons).transpose(1, 2)
    half = torch.arange(neurons // 2)
    interleaved = torch.stack((half, half + neurons // 2), dim=-1).flatten()
    qr = official_rope(x_sparse[..., interleaved])
    scores = (qr @ qr.mT).tril(diagonal=-1)
    if m.forget is not None:
        gate = torch.sigmoid(m.forget(x)).transpose(1, 2)  # [B, H, T]
        cumulative = gate.log().cumsum(-1)
        decay = (cumulative[..., :, None] - cumulative[..., None, :]).exp() / gate[..., :, None]
        scores = scores * decay * (1 - gate[..., None, :])
    y_kv = F.layer_norm(scores @ x.unsqueeze(1), (width,), eps=m.eps)
    y_sparse = F.relu(y_kv @ m.encoder_v)
    xy_sparse = (x_sparse * y_sparse).transpose(1, 2).reshape(batch, time, heads * neurons)
    return m.out(xy_sparse)


@pytest.mark.parametrize("forget_gate", [False, True])
def test_matches_official_attention_form(forget_gate):
    mixer = bdh(forget_gate=forget_gate)
    x = random_input(2, 23, 32)
    with torch.no_grad():
        y, _ = mixer(x)
        expected = official_forward(mixer, x)
    # 1e-6: lmlab's rotary tables are float32 whatever the input dtype.
    assert_close(y, expected, 1e-6, "mixer vs official attention form")


def test_first_token_reads_nothing():
    """The diagonal is excluded: with it, token 0 would read ``(q_0 . k_0) u_0 != 0``."""
    mixer = bdh()
    with torch.no_grad():
        y, _ = mixer(random_input(1, 6, 32))
    assert y[:, 0].abs().max() == 0 and y[:, 1].abs().max() > 0


def test_forget_gate_init_spans():
    mixer = make_mixer("bdh", n_heads=4, mlp_multiplier=1, forget_gate=True)
    spans = 1 / (1 - torch.sigmoid(mixer.forget.bias))
    assert torch.allclose(spans, torch.tensor([4.0, 16.0, 64.0, 256.0], dtype=spans.dtype))


def test_neuron_count_is_checked():
    with pytest.raises(LmlabError, match="mlp_multiplier"):
        make_mixer("bdh", d_model=30, n_heads=4, mlp_multiplier=1)
