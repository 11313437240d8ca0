"""The model stack, the attention mixer's cache, and generation."""

import pytest
import torch

from lmlab.config.schema import ModelConfig
from lmlab.layers.attention import append_kv, causal_attention
from lmlab.model.generate import SamplingSettings, filter_logits, generate
from lmlab.model.lm import LanguageModel


def tiny_model(**overrides) -> LanguageModel:
    torch.manual_seed(0)
    settings = {"vocab_size": 50, "d_model": 32, "n_layers": 2, "n_heads": 4} | overrides
    return LanguageModel(ModelConfig(**settings)).eval()


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("position", ["rope", "none"])
def test_cached_decode_equals_full_recompute(kv_heads, position):
    model = tiny_model(n_kv_heads=kv_heads, position=position)
    tokens = torch.randint(0, 50, (2, 23))
    with torch.no_grad():
        full, _ = model(tokens)
        pieces = []
        logits, state = model(tokens[:, :9])
        pieces.append(logits)
        logits, state = model(tokens[:, 9:14], state)  # a multi-token chunk after a prefill
        pieces.append(logits)
        for t in range(14, 23):
            logits, state = model(tokens[:, t : t + 1], state)
            pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)
    assert state.position == 23


def test_gqa_equals_mha_with_repeated_kv_heads():
    torch.manual_seed(0)
    q = torch.randn(1, 5, 4, 8)
    k = torch.randn(1, 5, 2, 8)
    v = torch.randn(1, 5, 2, 8)
    grouped = causal_attention(q, k, v, offset=0)
    repeated = causal_attention(
        q, k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2), offset=0
    )
    torch.testing.assert_close(grouped, repeated)


def test_kv_cache_grows_by_doubling_without_losing_entries():
    k = torch.randn(1, 3, 2, 4)
    state = append_kv(None, k, k)
    with torch.no_grad():
        for _ in range(10):
            step = torch.randn(1, 1, 2, 4)
            state = append_kv(state, step, step)
            k = torch.cat([k, step], 1)
    assert state["length"] == 13
    assert state["k"].shape[1] >= 13
    torch.testing.assert_close(state["k"][:, :13], k)


def test_kv_cache_with_gradients_holds_exactly_its_entries():
    """Carried across training segments (truncated BPTT), the cache must grow by what is
    appended, not double on every call."""
    state = None
    for _ in range(12):
        step = torch.randn(1, 4, 2, 4, requires_grad=True)
        state = append_kv(state, step, step)
    assert state["length"] == 48
    assert state["k"].shape[1] == 48


def test_parameter_count_ties_embeddings_and_counts_flops():
    tied = tiny_model()
    untied = tiny_model(tie_embeddings=False)
    assert untied.num_parameters() - tied.num_parameters() == 50 * 32
    assert tied.head.weight is tied.embed.weight
    linear_weights = sum(m.weight.numel() for m in tied.modules() if isinstance(m, torch.nn.Linear))
    attention_extra = 2 * 4 * 4 * 8 * 64  # layers * 4 * heads * head_dim * context
    assert tied.flops_per_token(64) == 2 * linear_weights + attention_extra


def test_residual_output_projections_are_scaled_down():
    model = tiny_model(n_layers=8, d_model=256, n_heads=4)
    out_std = model.blocks[0].mixer.out.weight.std().item()
    qkv_std = model.blocks[0].mixer.qkv.weight.std().item()
    assert out_std == pytest.approx(qkv_std / 4, rel=0.1)


def test_state_detach_and_size():
    model = tiny_model()
    tokens = torch.randint(0, 50, (1, 6))
    _, state = model(tokens)
    assert state.layers[0]["k"].requires_grad
    detached = state.detach()
    assert not detached.layers[0]["k"].requires_grad
    assert detached.nbytes() == 2 * 2 * 6 * 4 * 8 * 4  # layers * (k, v) * T * heads * dim * fp32


def test_greedy_generation_matches_argmax_of_recompute():
    model = tiny_model()
    prompt = torch.randint(0, 50, (1, 4))
    out = generate(model, prompt, 12, SamplingSettings(temperature=0))
    with torch.no_grad():
        for t in range(4, out.shape[1]):
            logits, _ = model(out[:, :t])
            assert out[0, t] == logits[0, -1].argmax()


def test_sampling_is_seeded_and_respects_top_k():
    model = tiny_model()
    prompt = torch.randint(0, 50, (1, 3))
    settings = SamplingSettings(temperature=1.0, top_k=1)
    greedy = generate(model, prompt, 8, SamplingSettings(temperature=0))
    assert torch.equal(generate(model, prompt, 8, settings, seed=3), greedy)
    wide = SamplingSettings(temperature=1.5)
    assert torch.equal(
        generate(model, prompt, 8, wide, seed=5), generate(model, prompt, 8, wide, seed=5)
    )


def test_top_p_and_min_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = filter_logits(logits, SamplingSettings(temperature=1.0, top_p=0.7)).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    kept = filter_logits(logits, SamplingSettings(temperature=1.0, min_p=0.5)).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    kept = filter_logits(logits, SamplingSettings(temperature=1.0, top_p=0.5)).isfinite()
    assert kept.tolist() == [[True, False, False, False]]


def test_swiglu_hidden_width_and_gate():
    from lmlab.layers.mlp import SwiGLU

    cfg = ModelConfig(vocab_size=10, d_model=96)
    assert cfg.resolved_mlp_hidden == 256  # 8/3 * 96 = 256, already a multiple of 64
    mlp = SwiGLU(cfg, 0, None)
    x = torch.randn(2, 3, 96)
    gate, up = mlp.gate_up(x).chunk(2, dim=-1)
    expected = mlp.out(torch.nn.functional.silu(gate) * up)
    torch.testing.assert_close(mlp(x), expected)
