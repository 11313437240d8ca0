"""Multi-head latent attention: the naive per-head oracle and the size of the latent cache."""

import math

import pytest
import torch
from mixer_checks import (
    assert_close,
    check_bfloat16,
    check_decode_matches_full,
    check_segments_match_whole,
    make_mixer,
    random_input,
)
from torch import nn

from lmlab.config.schema import ModelConfig
from lmlab.errors import LmlabError
from lmlab.layers.registry import build_token_mixer


@pytest.mark.parametrize(
    "options",
    [
        {"differential": True},
        {"differential": True, "q_lora_rank": 12, "kv_lora_rank": 10, "rope_head_dim": 8},
    ],
)
def test_differential_decode_and_segments_equal_full(options):
    """The contract covers plain MLA; the differential read-out has its own cached path."""
    mixer = make_mixer("mla", d_model=32, n_heads=4, **options)
    check_decode_matches_full(mixer, time=15, prefix=5)
    check_decode_matches_full(mixer, time=6, prefix=1)
    check_segments_match_whole(mixer, time=31, cut=12)


def test_matches_naive_per_head_attention():
    """Explicit per-head keys/values built from the latent, softmax with a causal mask."""
    mixer = make_mixer("mla", d_model=32, n_heads=4, kv_lora_rank=10, rope_head_dim=4)
    x = random_input(2, 9, 32)
    heads, dim, rope = 4, 8, 4
    with torch.no_grad():
        y, _ = mixer(x)
        q = mixer.q_proj(x).view(2, 9, heads, dim + rope)
        latent, k_rope = mixer.kv_down(x).split([10, rope], -1)
        kv = mixer.kv_up(mixer.kv_norm(latent)).view(2, 9, heads, 2 * dim)
        q_rope = mixer.rotary(q[..., dim:])
        k_rope = mixer.rotary(k_rope[:, :, None])[:, :, 0]
        logits = torch.einsum("bthd,bshd->bhts", q[..., :dim], kv[..., :dim])
        logits = logits + torch.einsum("bthd,bsd->bhts", q_rope, k_rope)
        causal = torch.ones(9, 9, dtype=torch.bool).tril()
        weights = (logits / (dim + rope) ** 0.5).masked_fill(~causal, float("-inf")).softmax(-1)
        o = torch.einsum("bhts,bshd->bthd", weights, kv[..., dim:])
        expected = mixer.out(o.reshape(2, 9, heads * dim))
    assert_close(y, expected, 1e-10, "MLA vs naive per-head attention")


def test_differential_matches_naive_two_map_attention():
    """Two maps from the query/key halves (each rope half rotated on its own), subtracted with
    the learned lambda, normalised per head and scaled by 1 - lambda_init (0.2 at layer 0)."""
    mixer = make_mixer("mla", d_model=32, n_heads=4, kv_lora_rank=10, differential=True)
    x = random_input(2, 9, 32)
    heads, dim, rope = 4, 8, 4
    with torch.no_grad():
        mixer.differential.lambdas.normal_(std=0.5)
        y, _ = mixer(x)
        q = mixer.q_proj(x).view(2, 9, heads, dim + rope)
        latent, k_rope = mixer.kv_down(x).split([10, rope], -1)
        kv = mixer.kv_up(mixer.kv_norm(latent)).view(2, 9, heads, 2 * dim)
        q_rope = mixer.rotary(q[..., dim:].reshape(2, 9, 2 * heads, 2)).view(2, 9, heads, rope)
        k_rope = mixer.rotary(k_rope.view(2, 9, 2, 2)).view(2, 9, rope)
        causal = torch.ones(9, 9, dtype=torch.bool).tril()
        outputs = []
        for j in range(2):
            nope, half = slice(4 * j, 4 * j + 4), slice(2 * j, 2 * j + 2)
            logits = torch.einsum("bthd,bshd->bhts", q[..., nope], kv[..., nope])
            logits = logits + torch.einsum("bthd,bsd->bhts", q_rope[..., half], k_rope[..., half])
            weights = (logits / math.sqrt(6)).masked_fill(~causal, float("-inf")).softmax(-1)
            outputs.append(torch.einsum("bhts,bshd->bthd", weights, kv[..., dim:]))
        lq1, lk1, lq2, lk2 = mixer.differential.lambdas
        lam = torch.exp(lq1 @ lk1) - torch.exp(lq2 @ lk2) + 0.2
        o = outputs[0] - lam * outputs[1]
        gain = mixer.differential.norm.weight
        o = o / o.square().mean(-1, keepdim=True).add(1e-5).sqrt() * gain * 0.8
        expected = mixer.out(o.reshape(2, 9, heads * dim))
    assert_close(y, expected, 1e-10, "differential MLA vs naive two-map attention")


class RoundedLinear(nn.Linear):
    """A projection that is not a plain linear map (as BitLinear is not): inputs rounded."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.round())


@pytest.mark.parametrize("differential", [False, True])
def test_decode_equals_full_when_the_up_projection_is_not_linear(differential):
    mixer = make_mixer("mla", d_model=32, n_heads=4, differential=differential)
    rounded = RoundedLinear(mixer.kv_up.in_features, mixer.kv_up.out_features, bias=False)
    rounded.weight = mixer.kv_up.weight
    mixer.kv_up = rounded.double()
    check_decode_matches_full(mixer, time=12, prefix=4)


def test_cache_holds_only_latent_and_rope_key_and_is_smaller_than_gqa():
    """At DeepSeek-V2's ratios (latent 4 head_dim, rope key head_dim / 2) MLA caches 4.5
    head_dim per token, GQA 2 head_dim per key/value head: smaller from 3 kv heads on."""
    cfg = ModelConfig(d_model=256, n_heads=8, n_kv_heads=4)
    mla = build_token_mixer("mla", cfg, 0)
    gqa = build_token_mixer("attention", cfg, 0)
    assert mla.cache_bytes_per_token() == (4 * 32 + 16) * 4
    assert gqa.cache_bytes_per_token() == 2 * 4 * 32 * 4
    assert mla.cache_bytes_per_token() < gqa.cache_bytes_per_token()
    with torch.no_grad():
        _, state = mla(torch.randn(1, 10, 256))
        _, gqa_state = gqa(torch.randn(1, 10, 256))
    assert state["latent"].shape == (1, 10, 128) and state["k_rope"].shape == (1, 10, 16)
    mla_bytes = sum(t.numel() * t.element_size() for t in (state["latent"], state["k_rope"]))
    gqa_bytes = sum(t.numel() * t.element_size() for t in (gqa_state["k"], gqa_state["v"]))
    assert mla_bytes == 10 * mla.cache_bytes_per_token()
    assert gqa_bytes == 10 * gqa.cache_bytes_per_token()


def test_bad_options_are_rejected():
    with pytest.raises(LmlabError, match="rope_head_dim"):
        make_mixer("mla", d_model=32, n_heads=4, rope_head_dim=3)
    with pytest.raises(LmlabError, match="multiple of 4 with differential"):
        make_mixer("mla", d_model=32, n_heads=4, rope_head_dim=6, differential=True)
    with pytest.raises(LmlabError, match="even head_dim"):
        make_mixer("mla", d_model=36, n_heads=4, rope_head_dim=4, differential=True)


def test_differential_bfloat16():
    check_bfloat16(make_mixer("mla", d_model=32, n_heads=4, q_lora_rank=16, differential=True))
