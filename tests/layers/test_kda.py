"""Kimi Delta Attention: strong decays and its per-channel decay (the layer is checked
against a from-the-paper reference in ``test_deltanet.py``)."""

import math

import torch
import torch.nn.functional as F
from mixer_checks import (
    check_modes_agree,
    clone_with,
    make_mixer,
)

NAME = "kda"


def test_strong_decay_chunk_matches_recurrent() -> None:
    """Per-channel decays down to about exp(-16) per step, mixed with slow ones."""
    mixer = make_mixer(NAME, chunk_size=16)
    with torch.no_grad():
        mixer.a_log.fill_(math.log(16.0))
        mixer.dt_bias.copy_(torch.linspace(-6.0, 2.0, mixer.dt_bias.numel()).view_as(mixer.dt_bias))
    check_modes_agree(mixer, clone_with(mixer, mode="recurrent"), time=40)


def test_decay_is_per_key_channel() -> None:
    mixer = make_mixer(NAME, d_model=32, n_heads=2, gate_rank=4)
    assert mixer.dt_bias.shape == (2, 16) and mixer.a_log.shape == (2, 1)
    assert mixer.decay_up.in_features == 4 and mixer.gate_up.in_features == 4
    a = mixer.a_log.exp()
    dt = F.softplus(mixer.dt_bias)
    assert ((a >= 1) & (a <= 16)).all()
    assert ((dt >= 1e-4 - 1e-12) & (dt <= 0.1 + 1e-12)).all()
    assert dt.max() / dt.min() > 3
