"""RWKV-7 time mixing: the generic mixer contract plus the official step-by-step formulation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from mixer_checks import (
    assert_close,
    check_bfloat16,
    check_decode_matches_full,
    check_learns,
    check_modes_agree,
    check_segments_match_whole,
    clone_with,
    make_mixer,
    random_input,
)

from lmlab.errors import LmlabError


def rwkv7(seed: int = 0, **options) -> torch.nn.Module:
    """A float64 mixer whose official zero-initialised LoRA inputs are perturbed, so that decay,
    learning rate and gate depend on the data as they do after training."""
    mixer = make_mixer("rwkv7", seed=seed, **options)
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for lora in (mixer.decay, mixer.learning_rate, mixer.gate):
            lora.down.weight.normal_(std=0.3, generator=generator)
        mixer.mix.uniform_(0, 1, generator=generator)
    return mixer


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


@pytest.mark.parametrize(("time", "chunk_size"), [(1, 16), (7, 16), (63, 16), (65, 32), (200, 64)])
def test_chunk_matches_recurrent(time, chunk_size):
    chunk = rwkv7(chunk_size=chunk_size)
    check_modes_agree(chunk, clone_with(chunk, mode="recurrent"), time=time)


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_decode_matches_full(mode):
    check_decode_matches_full(rwkv7(mode=mode, chunk_size=4))


def test_segments_match_whole():
    check_segments_match_whole(rwkv7(chunk_size=8))


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


def test_bfloat16():
    check_bfloat16(rwkv7())


def test_learns():
    final, unigram = check_learns("rwkv7", steps=80)
    assert final < 0.8 * unigram, f"final loss {final:.3f} vs unigram entropy {unigram:.3f}"
