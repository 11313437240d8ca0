"""Gated DeltaNet: strong decays and its Mamba-2 decay initialisation (the layer is
checked against a from-the-paper reference in ``test_deltanet.py``)."""

import math

import torch
import torch.nn.functional as F
from mixer_checks import (
    check_modes_agree,
    clone_with,
    make_mixer,
    random_input,
)

NAME = "gated_deltanet"


def test_strong_decay_chunk_matches_recurrent() -> None:
    """Decays near exp(-16) per step: the chunk form must neither overflow nor lose accuracy."""
    mixer = make_mixer(NAME, chunk_size=16)
    with torch.no_grad():
        mixer.a_log.fill_(math.log(16.0))
        mixer.dt_bias.fill_(2.0)
    check_modes_agree(mixer, clone_with(mixer, mode="recurrent"), time=40)


def test_decay_initialisation_spans_memory_lengths() -> None:
    mixer = make_mixer(NAME, d_model=64, n_heads=16)
    a = mixer.a_log.exp()
    dt = F.softplus(mixer.dt_bias)
    assert ((a > 0) & (a < 16)).all()
    assert ((dt >= 1e-4 - 1e-12) & (dt <= 0.1 + 1e-12)).all()
    assert a.std() > 2 and dt.max() / dt.min() > 3


def test_value_heads_twice_as_wide_by_default() -> None:
    mixer = make_mixer(NAME, d_model=32, n_heads=2)
    assert (mixer.key_dim, mixer.value_dim) == (16, 32)
    _, state = mixer(random_input(1, 3, 32))
    assert state["recurrent"].shape == (1, 2, 16, 32)
