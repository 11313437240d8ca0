"""The gated delta rule: the recurrent oracle against explicit formulas, the chunk form against
the oracle (outputs, final state and every gradient), decode and segment carrying, validation."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

from lmlab.ops.gated_delta_rule import gated_delta_rule

# The module (lmlab.ops exports the function under the same name), to watch its internals.
gdr = importlib.import_module("lmlab.ops.gated_delta_rule")

B, H, K, V = 2, 2, 8, 6  # K != V catches transposed state layouts
DECAYS = ("none", "head", "channel")


def _inputs(
    t: int, decay: str, dtype: torch.dtype = torch.float64, strong: bool = False, seed: int = 0
) -> dict[str, torch.Tensor | None]:
    """Random inputs as a mixer would produce them: unit keys, beta in (0, 2), log-decays <= 0."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    shape = {"none": None, "head": (B, t, H), "channel": (B, t, H, K)}[decay]
    log_decay = None
    if shape is not None:
        # Strong: uniform in [-10, 0] per step; otherwise a typical -softplus gate.
        raw = rand(*shape)
        log_decay = (
            -10 * torch.rand(shape, generator=gen, dtype=torch.float64)
            if strong
            else -F.softplus(raw)
        )
    inputs = {
        "q": rand(B, t, H, K),
        "k": F.normalize(rand(B, t, H, K), dim=-1),
        "v": rand(B, t, H, V),
        "beta": 2 * torch.sigmoid(rand(B, t, H)),
        "log_decay": log_decay,
        "initial_state": rand(B, H, K, V),
    }
    return {name: None if x is None else x.to(dtype) for name, x in inputs.items()}


def _run(inputs: dict, with_state: bool, grad: bool, **kwargs) -> tuple[torch.Tensor, ...]:
    """Output, final state and (optionally) the gradients of every input given a fixed cotangent."""
    leaves = {
        n: x.detach().clone().requires_grad_(grad) for n, x in inputs.items() if x is not None
    }
    if not with_state:
        leaves.pop("initial_state")
    o, state = gated_delta_rule(
        leaves["q"],
        leaves["k"],
        leaves["v"],
        leaves["beta"],
        leaves.get("log_decay"),
        initial_state=leaves.get("initial_state"),
        output_final_state=True,
        **kwargs,
    )
    if not grad:
        return o, state
    gen = torch.Generator().manual_seed(1)
    cot_o = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.dtype)
    cot_s = torch.randn(state.shape, generator=gen, dtype=torch.float64).to(state.dtype)
    grads = torch.autograd.grad((o, state), list(leaves.values()), (cot_o, cot_s))
    return (o, state, *grads)


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("t", [1, 7, 63, 65, 200])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_matches_recurrent_float64(decay: str, t: int, with_state: bool) -> None:
    inputs = _inputs(t, decay)
    ref = _run(inputs, with_state, grad=True, mode="recurrent")
    for chunk_size in (16, 64):
        got = _run(inputs, with_state, grad=True, mode="chunk", chunk_size=chunk_size)
        assert len(got) == len(ref)
        for g, r in zip(got, ref, strict=True):
            assert g.dtype == r.dtype == torch.float64
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("decay", DECAYS)
def test_chunk_matches_recurrent_float32(decay: str) -> None:
    inputs = _inputs(130, decay, dtype=torch.float32)
    ref = _run(_inputs(130, decay), True, grad=True, mode="recurrent")  # float64 truth
    got32 = _run(inputs, True, grad=True, mode="chunk", chunk_size=64)
    rec32 = _run(inputs, True, grad=True, mode="recurrent")
    assert got32[0].dtype == torch.float32 and got32[1].dtype == torch.float32
    for g, r32, r in zip(got32, rec32, ref, strict=True):
        assert rel_err(g, r32) < 1e-5
        assert rel_err(g, r) < 1e-5


@pytest.mark.parametrize("decay", DECAYS)
def test_bfloat16_inputs(decay: str) -> None:
    inputs = _inputs(40, decay, dtype=torch.bfloat16)
    exact = {n: None if x is None else x.double() for n, x in inputs.items()}
    ref = _run(exact, True, grad=True, mode="recurrent")
    got = _run(inputs, True, grad=True, mode="chunk", chunk_size=16)
    o, state = got[:2]
    assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
    assert rel_err(o, ref[0]) < 5e-3
    assert rel_err(state, ref[1]) < 1e-5  # inputs are exact in float64; accumulation is float32
    for g, r in zip(got[2:], ref[2:], strict=True):
        assert g.dtype == torch.bfloat16
        assert rel_err(g, r) < 1e-2


@pytest.mark.parametrize("decay", ["head", "channel"])
def test_strong_decay_long_chunks_stay_finite(decay: str) -> None:
    """log_decay down to -10 per step: within-chunk cumulative decays reach e^-600."""
    inputs = _inputs(150, decay, dtype=torch.float32, strong=True)
    ref = _run(_inputs(150, decay, strong=True), True, grad=True, mode="recurrent")
    got = _run(inputs, True, grad=True, mode="chunk", chunk_size=64)
    for g, r in zip(got, ref, strict=True):
        assert torch.isfinite(g).all()
        assert rel_err(g, r) < 1e-5


@pytest.mark.parametrize("fraction", [0.98, 1.02])
def test_per_channel_forms_either_side_of_the_span_limit(
    fraction: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks whose decay spans just under (one factorisation) and just over (sub-chunks) the
    float32 limit both match the float64 oracle."""
    sub_chunked = []
    original = gdr._channel_decayed_grams
    monkeypatch.setattr(
        gdr, "_channel_decayed_grams", lambda *args: sub_chunked.append(1) or original(*args)
    )
    t, c = 150, 64
    exact = _inputs(t, "channel")
    gen = torch.Generator().manual_seed(7)
    jitter = 1.0 - 0.01 * torch.rand(B, t, H, K, generator=gen, dtype=torch.float64)
    # The c - 1 steps after a chunk's first one make its span.
    exact["log_decay"] = -fraction * 2 * gdr._HALF_SPAN[torch.float32] / (c - 1) * jitter
    ref = _run(exact, True, grad=True, mode="recurrent")
    inputs = {n: x.float() for n, x in exact.items()}
    got = _run(inputs, True, grad=True, mode="chunk", chunk_size=c)
    for g, r in zip(got, ref, strict=True):
        assert rel_err(g, r) < 1e-5
    assert bool(sub_chunked) == (fraction > 1)


def test_per_head_decay_equals_uniform_per_channel_decay() -> None:
    """The two decay code paths agree when every key channel shares the head's decay."""
    inputs = _inputs(70, "head")
    per_channel = dict(inputs, log_decay=inputs["log_decay"][..., None].expand(B, 70, H, K))
    for got, want in zip(
        _run(per_channel, True, grad=False), _run(inputs, True, grad=False), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["recurrent", "chunk"])
def test_oracle_with_orthonormal_keys_is_decayed_linear_attention(mode: str) -> None:
    """With orthonormal keys and beta = 1 the delta correction reads nothing, so the rule reduces
    to causal linear attention: o_t = K^-0.5 * sum_{s<=t} exp(g_t - g_s) (q_t . k_s) v_s."""
    t = K
    gen = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(B, H, K, K, generator=gen, dtype=torch.float64))[0]
    k = basis.permute(0, 3, 1, 2)  # [B, T=K, H, K]: step t uses column t of an orthogonal matrix
    q = torch.randn(B, t, H, K, generator=gen, dtype=torch.float64)
    v = torch.randn(B, t, H, V, generator=gen, dtype=torch.float64)
    log_decay = -torch.rand(B, t, H, generator=gen, dtype=torch.float64)
    cum = log_decay.cumsum(1)
    weights = torch.einsum("bthk,bshk->bhts", q, k) * K**-0.5
    weights = (
        weights * (cum.permute(0, 2, 1)[..., :, None] - cum.permute(0, 2, 1)[..., None, :]).exp()
    )
    weights = weights.tril()
    want = torch.einsum("bhts,bshv->bthv", weights, v)
    got, _ = gated_delta_rule(
        q, k, v, torch.ones(B, t, H, dtype=torch.float64), log_decay, mode=mode
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["recurrent", "chunk"])
def test_oracle_per_channel_decay_with_one_hot_keys(mode: str) -> None:
    """One-hot keys write separate rows of S, each decaying with its own channel's gate."""
    t = K
    gen = torch.Generator().manual_seed(4)
    k = torch.eye(K, dtype=torch.float64)[None, :, None, :].expand(B, t, H, K)
    q = torch.randn(B, t, H, K, generator=gen, dtype=torch.float64)
    v = torch.randn(B, t, H, V, generator=gen, dtype=torch.float64)
    log_decay = -torch.rand(B, t, H, K, generator=gen, dtype=torch.float64)
    cum = log_decay.cumsum(1)  # [B, T, H, K]
    # o_t = K^-0.5 sum_{s<=t} q_t[s] exp(cum_t[s] - cum_s[s]) v_s  (key s is channel s)
    own = torch.diagonal(cum, dim1=1, dim2=3)  # [B, H, S]: cum_s[s]
    factor = (cum.permute(0, 2, 1, 3) - own[:, :, None, :]).exp()  # [B, H, T, S]
    weights = (q.permute(0, 2, 1, 3) * factor).tril() * K**-0.5
    want = torch.einsum("bhts,bshv->bthv", weights, v)
    got, _ = gated_delta_rule(
        q, k, v, torch.ones(B, t, H, dtype=torch.float64), log_decay, mode=mode
    )
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_oracle_delta_rule_overwrites_the_value_of_a_repeated_key() -> None:
    """Writing the same unit key twice with beta = 1 replaces the value: S = k v2^T."""
    k = F.normalize(torch.randn(1, 1, 1, K, dtype=torch.float64), dim=-1).expand(1, 2, 1, K)
    v = torch.randn(1, 2, 1, V, dtype=torch.float64)
    q = torch.randn(1, 2, 1, K, dtype=torch.float64)
    _, state = gated_delta_rule(
        q, k, v, torch.ones(1, 2, 1, dtype=torch.float64), mode="recurrent", output_final_state=True
    )
    torch.testing.assert_close(state[0, 0], k[0, 0, 0][:, None] * v[0, 1, 0][None, :])


@pytest.mark.parametrize("decay", DECAYS)
@pytest.mark.parametrize("decode_mode", ["recurrent", "chunk"])
def test_prefill_then_decode_matches_full_call(decay: str, decode_mode: str) -> None:
    t, prefix = 40, 29
    x = _inputs(t, decay)
    full, full_state = _run(x, True, grad=False, mode="chunk", chunk_size=16)

    def part(lo: int, hi: int) -> dict:
        return {n: v if n == "initial_state" or v is None else v[:, lo:hi] for n, v in x.items()}

    out, state = _run(part(0, prefix), True, grad=False, mode="chunk", chunk_size=16)
    outs = [out]
    for i in range(prefix, t):
        step = dict(part(i, i + 1), initial_state=state)
        out, state = _run(step, True, grad=False, mode=decode_mode)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, full_state, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("decay", DECAYS)
def test_two_segments_with_carried_state_match_one_call(decay: str) -> None:
    x = _inputs(150, decay)
    full = _run(x, True, grad=False, chunk_size=32)
    first = {n: v if n == "initial_state" or v is None else v[:, :70] for n, v in x.items()}
    o1, s1 = _run(first, True, grad=False, chunk_size=32)
    second = {n: v if v is None else v[:, 70:] for n, v in x.items() if n != "initial_state"}
    o2, s2 = _run(dict(second, initial_state=s1), True, grad=False, chunk_size=32)
    torch.testing.assert_close(torch.cat((o1, o2), dim=1), full[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s2, full[1], rtol=1e-10, atol=1e-10)


def test_defaults_and_dtypes() -> None:
    x = _inputs(10, "head", dtype=torch.float32)
    o, state = gated_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["log_decay"])
    assert state is None and o.shape == (B, 10, H, V) and o.dtype == torch.float32
    scaled, _ = gated_delta_rule(x["q"], x["k"], x["v"], x["beta"], x["log_decay"], scale=K**-0.5)
    torch.testing.assert_close(o, scaled)
    doubled, _ = gated_delta_rule(
        x["q"], x["k"], x["v"], x["beta"], x["log_decay"], scale=2 * K**-0.5
    )
    torch.testing.assert_close(doubled, 2 * o)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mode": "parallel"}, "mode must be one of"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"k": torch.zeros(B, 5, H, K + 1)}, "q and k"),
        ({"v": torch.zeros(B, 4, H, V)}, "v must be"),
        ({"beta": torch.zeros(B, 5, H, 1)}, "beta must be"),
        ({"log_decay": torch.zeros(B, 5, H, V + K)}, "log_decay must be"),
        ({"initial_state": torch.zeros(B, H, V, K)}, "initial_state must be"),
    ],
)
def test_invalid_arguments_raise(change: dict, message: str) -> None:
    args = {
        "q": torch.zeros(B, 5, H, K),
        "k": torch.zeros(B, 5, H, K),
        "v": torch.zeros(B, 5, H, V),
        "beta": torch.zeros(B, 5, H),
        "log_decay": None,
        "initial_state": None,
        "mode": "chunk",
        "chunk_size": 64,
    }
    args.update(change)
    q, k, v, beta, log_decay = (args.pop(n) for n in ("q", "k", "v", "beta", "log_decay"))
    with pytest.raises(ValueError, match=message):
        gated_delta_rule(q, k, v, beta, log_decay, **args)
