"""Gated DeltaNet: the generic mixer checks and its Mamba-2 decay initialisation (the layer is
checked against a from-the-paper reference in ``test_deltanet.py``)."""

import math

import pytest
import torch
import torch.nn.functional as F
from mixer_checks import (
    check_bfloat16,
    check_decode_matches_full,
    check_learns,
    check_modes_agree,
    check_segments_match_whole,
    clone_with,
    make_mixer,
    random_input,
)

NAME = "gated_deltanet"


@pytest.mark.parametrize(("time", "chunk_size"), [(1, 16), (7, 16), (63, 16), (65, 64), (200, 16)])
def test_chunk_matches_recurrent(time: int, chunk_size: int) -> None:
    mixer = make_mixer(NAME, chunk_size=chunk_size)
    check_modes_agree(mixer, clone_with(mixer, mode="recurrent"), time=time)


def test_strong_decay_chunk_matches_recurrent() -> None:
    """Decays near exp(-16) per step: the chunk form must neither overflow nor lose accuracy."""
    mixer = make_mixer(NAME, chunk_size=16)
    with torch.no_grad():
        mixer.a_log.fill_(math.log(16.0))
        mixer.dt_bias.fill_(2.0)
    check_modes_agree(mixer, clone_with(mixer, mode="recurrent"), time=40)


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_decode_matches_full(mode: str) -> None:
    check_decode_matches_full(make_mixer(NAME, mode=mode, chunk_size=4))


def test_segments_match_whole() -> None:
    check_segments_match_whole(make_mixer(NAME, chunk_size=8))


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


def test_bfloat16() -> None:
    check_bfloat16(make_mixer(NAME))


def test_learns() -> None:
    final, unigram = check_learns(NAME)
    assert final < 0.8 * unigram, f"final loss {final:.3f} vs unigram entropy {unigram:.3f}"
