"""Differential attention: two softmax maps subtracted with a learned lambda."""

import math

import pytest
import torch
from mixer_checks import (
    assert_close,
    make_mixer,
    random_input,
)

from lmlab.config.schema import ModelConfig
from lmlab.errors import LmlabError
from lmlab.layers.differential import lambda_init
from lmlab.layers.registry import build_token_mixer


def test_lambda_init_follows_the_paper_schedule():
    assert lambda_init(0) == pytest.approx(0.2)
    assert lambda_init(3) == pytest.approx(0.8 - 0.6 * math.exp(-0.9))
    assert lambda_init(100) == pytest.approx(0.8, abs=1e-6)


def test_matches_naive_explicit_softmax():
    mixer = make_mixer("diff_attention", d_model=32, n_heads=2)
    x = random_input(2, 10, 32)
    heads, dim, half = 2, 16, 8
    with torch.no_grad():
        y, _ = mixer(x)
        q, k, v = mixer.qkv(x).view(2, 10, 3, heads, dim).unbind(2)
        q = mixer.rotary(q.reshape(2, 10, 2 * heads, half)).view(2, 10, heads, 2, half)
        k = mixer.rotary(k.reshape(2, 10, 2 * heads, half)).view(2, 10, heads, 2, half)
        causal = torch.ones(10, 10, dtype=torch.bool).tril()
        maps = []
        for j in range(2):
            logits = torch.einsum("bthd,bshd->bhts", q[:, :, :, j], k[:, :, :, j]) / math.sqrt(half)
            maps.append(logits.masked_fill(~causal, float("-inf")).softmax(-1))
        lq1, lk1, lq2, lk2 = mixer.differential.lambdas
        lam = torch.exp(lq1 @ lk1) - torch.exp(lq2 @ lk2) + 0.2
        o = torch.einsum("bhts,bshd->bthd", maps[0] - lam * maps[1], v)
        gain = mixer.differential.norm.weight
        o = o / o.square().mean(-1, keepdim=True).add(1e-5).sqrt() * gain * 0.8
        expected = mixer.out(o.reshape(2, 10, heads * dim))
    assert_close(y, expected, 1e-10, "diff attention vs naive")


def test_unsupported_settings_are_rejected():
    with pytest.raises(LmlabError, match="position"):
        build_token_mixer("diff_attention", ModelConfig(d_model=32, position="alibi"), 0)
    with pytest.raises(LmlabError, match="divisible by 4"):
        build_token_mixer("diff_attention", ModelConfig(d_model=24, n_heads=4), 0)
