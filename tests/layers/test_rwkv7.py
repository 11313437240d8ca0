"""RWKV-7 time mixing: the official step-by-step formulation (the generic contract is in
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


def rwkv7(**options) -> torch.nn.Module:
    """A float64 mixer whose zero-initialised LoRA inputs are perturbed (``mixer_checks``)."""
    return make_mixer("rwkv7", perturb=True, **options)


def official_step(
    m: torch.nn.Module, x: torch.Tensor, x_prev: torch.Tensor, state: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of the official RNN form (RWKV-LM ``rwkv_v7_demo_rnn.py``): state ``[V, K]``
    per head, ``state = state * w + (state @ -kk) (kk * a)^T + v k^T``, out ``state @ r``, the
    decay in its unfused form ``exp(-exp(-softplus(-w) - 0.5))``."""
    batch, width = x.shape
    heads, dim = m.n_heads, m.head_dim
    mix = m.mix.view(6, width)
    xr, xw, xk, xv, xa, xg = (x + (x_prev - x) * mix[i] for i in range(6))
    r, k, v = m.receptance(xr), m.key(xk), m.value(xv)
    w = torch.exp(-torch.exp(-F.softplus(-m.decay(xw)) - 0.5))
    a = torch.sigmoid(m.learning_rate(xa))
    g = m.gate(xg)
    kk = F.normalize((k * m.k_k).view(batch, heads, dim), dim=-1)
    k = k * (1 + (a - 1) * m.k_a)
    r, k, v, w, a = (t.view(batch, heads, dim) for t in (r, k, v, w, a))
    state = (
        state * w.unsqueeze(-2)
        + (state @ -kk.unsqueeze(-1)) * (kk * a).unsqueeze(-2)
        + v.unsqueeze(-1) * k.unsqueeze(-2)
    )
    out = (state @ r.unsqueeze(-1)).view(batch, heads * dim)
    out = F.group_norm(out, heads, m.norm.weight, m.norm.bias, m.norm.eps)
    out = out + ((r * k * m.r_k.view(heads, dim)).sum(-1, keepdim=True) * v).view(batch, -1)
    return m.out(out * g), state


def test_matches_official_recurrence():
    mixer = rwkv7()
    x = random_input(2, 11, 32)
    with torch.no_grad():
        y, _ = mixer(x)
        state = x.new_zeros(2, mixer.n_heads, mixer.head_dim, mixer.head_dim)
        previous = torch.zeros_like(x[:, 0])
        steps = []
        for t in range(x.shape[1]):
            out, state = official_step(mixer, x[:, t], previous, state)
            steps.append(out)
            previous = x[:, t]
    assert_close(y, torch.stack(steps, 1), 1e-10, "mixer vs official RNN step")


def test_state_carries_previous_token():
    mixer = rwkv7()
    x = random_input(2, 5, 32)
    with torch.no_grad():
        _, state = mixer(x)
        step, _ = mixer(x[:, -1:], state)
        state["shift"] = torch.zeros_like(state["shift"])
        shifted_away, _ = mixer(x[:, -1:], state)
    assert (step - shifted_away).abs().max() > 1e-3, "the previous token must affect the output"


def test_official_init():
    mixer = make_mixer("rwkv7", d_model=256, n_heads=4)
    log_decay = -math.exp(-0.5) * torch.sigmoid(mixer.decay.up.bias)
    assert log_decay.max() < 0 and log_decay.min() > -math.exp(-0.5)
    assert mixer.decay.down.weight.abs().max() == 0  # the decay starts data-independent
    # LoRA widths max(32, round(2.5 sqrt(256) / 32) * 32) and max(32, round(5 sqrt(256) / 32) * 32)
    assert mixer.decay.down.out_features == 32 and mixer.gate.down.out_features == 64


def test_bad_rank_is_rejected():
    with pytest.raises(LmlabError, match="decay_rank"):
        make_mixer("rwkv7", decay_rank=-1)
