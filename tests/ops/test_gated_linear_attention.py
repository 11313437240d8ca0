"""Gated linear attention: the chunk form against the step-by-step oracle, and the oracle itself
against the closed-form attention-matrix expression."""

from __future__ import annotations

import importlib

import pytest
import torch

from lmlab.ops.gated_linear_attention import gated_linear_attention

# The module (lmlab.ops exports the function under the same name), to watch its internals.
gla = importlib.import_module("lmlab.ops.gated_linear_attention")
decay_kind = gla._decay_kind

B, H, K, V = 2, 2, 8, 6
KINDS = ("none", "head", "channel")


def make_inputs(
    kind: str,
    T: int,
    dtype: torch.dtype = torch.float64,
    max_decay: float = 3.0,
    initial_state: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor | None]:
    """Random q, k, v, log decays uniform in [-max_decay, 0] and an optional initial state."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    decay_shape = {"none": None, "head": (B, T, H), "channel": (B, T, H, K)}[kind]
    log_decay = None
    if decay_shape is not None:
        log_decay = (-max_decay * torch.rand(*decay_shape, generator=gen, dtype=torch.float64)).to(
            dtype
        )
    return {
        "q": rand(B, T, H, K),
        "k": rand(B, T, H, K),
        "v": rand(B, T, H, V),
        "log_decay": log_decay,
        "initial_state": rand(B, H, K, V) if initial_state else None,
    }


def run_with_grads(
    inputs: dict[str, torch.Tensor | None], compute_dtype: torch.dtype | None = None, **kwargs
) -> dict[str, torch.Tensor]:
    """Output, final state and the gradient of every input under a fixed random loss."""
    leaves = {
        name: x.detach().to(compute_dtype or x.dtype).requires_grad_()
        for name, x in inputs.items()
        if x is not None
    }
    args = {name: leaves.get(name) for name in inputs}
    o, state = gated_linear_attention(
        args["q"],
        args["k"],
        args["v"],
        args["log_decay"],
        initial_state=args["initial_state"],
        output_final_state=True,
        **kwargs,
    )
    gen = torch.Generator().manual_seed(123)
    o_weight = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    s_weight = torch.randn(state.shape, generator=gen, dtype=torch.float64)
    loss = (o.double() * o_weight).sum() + (state.double() * s_weight).sum()
    loss.backward()
    return {"o": o, "state": state} | {f"grad {n}": leaf.grad for n, leaf in leaves.items()}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """Max error relative to the largest expected entry (entries near zero are not special)."""
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    error = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
    assert error <= rtol, f"{what}: relative error {error:.2e} > {rtol:.0e}"


def assert_all_close(actual: dict, expected: dict, rtol: float) -> None:
    assert actual.keys() == expected.keys()
    for name, value in actual.items():
        assert_close(value, expected[name], rtol, name)


def closed_form(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None,
    initial_state: torch.Tensor | None,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """o_i = scale * sum_{j<=i} (q_i * exp(b_i - b_j) . k_j) v_j + scale * (q_i * exp(b_i)) S_0,
    with b the cumulative log decay: the unrolled recurrence, no loop."""
    T = q.shape[1]
    if log_decay is None:
        log_decay = torch.zeros_like(q)
    elif log_decay.dim() == 3:
        log_decay = log_decay[..., None].expand_as(q)
    b = log_decay.cumsum(1)  # [B, T, H, K]
    diff = b[:, :, None] - b[:, None, :]  # [B, i, j, H, K]
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None, :, :, None, None]
    weights = torch.where(causal, diff, -torch.inf).exp()
    scores = torch.einsum("bihk,bjhk,bijhk->bhij", q, k, weights)
    o = scale * torch.einsum("bhij,bjhv->bihv", scores, v)
    state = torch.einsum("bjhk,bjhv,bjhk->bhkv", k, v, (b[:, -1:] - b).exp())
    if initial_state is not None:
        o = o + scale * torch.einsum("bihk,bhkv->bihv", q * b.exp(), initial_state)
        state = state + b[:, -1, :, :, None].exp() * initial_state
    return o, state


@pytest.mark.parametrize("kind", KINDS)
def test_recurrent_oracle_matches_closed_form(kind: str) -> None:
    inputs = make_inputs(kind, T=6)
    o, state = gated_linear_attention(
        *(inputs[n] for n in ("q", "k", "v", "log_decay")),
        initial_state=inputs["initial_state"],
        output_final_state=True,
        mode="recurrent",
    )
    o_ref, state_ref = closed_form(*inputs.values(), scale=K**-0.5)
    assert_close(o, o_ref, 1e-12, "o")
    assert_close(state, state_ref, 1e-12, "state")


def test_plain_linear_attention_is_masked_attention() -> None:
    """No decay, no state: o = tril(scale * q k^T) v, the textbook form."""
    inputs = make_inputs("none", T=9, initial_state=False)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    scores = torch.einsum("bihk,bjhk->bhij", q, k).tril() * 0.5
    expected = torch.einsum("bhij,bjhv->bihv", scores, v)
    for mode in ("recurrent", "chunk"):
        o, state = gated_linear_attention(q, k, v, scale=0.5, mode=mode, chunk_size=4)
        assert state is None
        assert_close(o, expected, 1e-12, mode)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("T", [1, 7, 63, 65, 200])
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_chunk_matches_recurrent_float64(kind: str, T: int, chunk_size: int) -> None:
    """Outputs, final state and gradients of every input; the initial state only on odd T, to
    keep both with and without it while halving the run time."""
    inputs = make_inputs(kind, T, initial_state=T % 2 == 1, seed=T)
    expected = run_with_grads(inputs, mode="recurrent")
    actual = run_with_grads(inputs, mode="chunk", chunk_size=chunk_size)
    assert_all_close(actual, expected, 1e-10)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("chunk_size", [1, 5, 20])
def test_chunk_odd_chunk_sizes(kind: str, chunk_size: int) -> None:
    """Chunk sizes that are not powers of two (the per-channel form rounds them up)."""
    inputs = make_inputs(kind, 23)
    expected = run_with_grads(inputs, mode="recurrent")
    actual = run_with_grads(inputs, mode="chunk", chunk_size=chunk_size, scale=0.3)
    assert_all_close(actual, run_with_grads(inputs, mode="recurrent", scale=0.3), 1e-10)
    assert not torch.allclose(actual["o"], expected["o"])  # the scale argument is honoured


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("max_decay", [1.0, 10.0, 60.0])
def test_chunk_float32_matches_float64_oracle(kind: str, max_decay: float) -> None:
    """Realistic precision, including decays strong enough to overflow a naive factorisation
    (exp(+10 * 64) is inf in any float format) and long chunks."""
    inputs = make_inputs(kind, 150, max_decay=max_decay)
    expected = run_with_grads(inputs, mode="recurrent")
    actual = run_with_grads(inputs, compute_dtype=torch.float32, mode="chunk", chunk_size=128)
    assert all(x.dtype == torch.float32 for x in actual.values())
    assert_all_close(actual, expected, 1e-5)


@pytest.mark.parametrize("kind", ["head", "channel"])
@pytest.mark.parametrize("fraction", [0.98, 1.02])
def test_decay_forms_either_side_of_the_span_limit(
    kind: str, fraction: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunks whose decay spans just under (one factorisation) and just over (masked exponent
    per head, halving per channel) the float32 limit all match the float64 oracle."""
    chosen = []
    monkeypatch.setattr(
        gla, "_decay_kind", lambda *args: chosen.append(decay_kind(*args)) or chosen[-1]
    )
    T, C = 150, 64
    inputs = make_inputs(kind, T)
    gen = torch.Generator().manual_seed(7)
    shape = inputs["log_decay"].shape
    jitter = 1.0 - 0.01 * torch.rand(shape, generator=gen, dtype=torch.float64)
    # C - 1 steps after a chunk's first one make its span.
    inputs["log_decay"] = -fraction * 2 * gla._HALF_SPAN[torch.float32] / (C - 1) * jitter
    expected = run_with_grads(inputs, mode="recurrent")
    actual = run_with_grads(inputs, compute_dtype=torch.float32, mode="chunk", chunk_size=C)
    assert_all_close(actual, expected, 1e-5)
    beyond = {"head": "head", "channel": "channel_split"}[kind]
    assert chosen == [beyond if fraction > 1 else "factorised"]


@pytest.mark.parametrize("kind", KINDS)
def test_chunk_bfloat16(kind: str) -> None:
    inputs = make_inputs(kind, 40, dtype=torch.bfloat16)
    expected = run_with_grads(inputs, compute_dtype=torch.float64, mode="recurrent")
    actual = run_with_grads(inputs, mode="chunk", chunk_size=16)
    assert actual["o"].dtype == torch.bfloat16
    assert actual["state"].dtype == torch.float32
    assert actual["grad q"].dtype == torch.bfloat16
    assert_all_close(actual, expected, 3e-2)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_prefill_then_decode_matches_full_sequence(kind: str, mode: str) -> None:
    T, prefix = 12, 5
    inputs = make_inputs(kind, T)
    q, k, v, log_decay, s0 = inputs.values()
    full, full_state = gated_linear_attention(
        q, k, v, log_decay, initial_state=s0, output_final_state=True
    )

    def step(t0: int, t1: int, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = None if log_decay is None else log_decay[:, t0:t1]
        return gated_linear_attention(
            q[:, t0:t1],
            k[:, t0:t1],
            v[:, t0:t1],
            gate,
            initial_state=state,
            output_final_state=True,
            mode=mode,
        )

    outputs = []
    o, state = step(0, prefix, s0)
    outputs.append(o)
    for t in range(prefix, T):
        o, state = step(t, t + 1, state)
        outputs.append(o)
    assert_close(torch.cat(outputs, 1), full, 1e-12, "decoded outputs")
    assert_close(state, full_state, 1e-12, "final state")


@pytest.mark.parametrize("kind", KINDS)
def test_two_segments_match_one_sequence(kind: str) -> None:
    T, split = 150, 70
    inputs = make_inputs(kind, T, initial_state=False)
    full = run_with_grads(inputs)

    def segment(t0: int, t1: int) -> dict[str, torch.Tensor | None]:
        return {
            n: None if x is None else x[:, t0:t1] for n, x in inputs.items() if n != "initial_state"
        }

    first = run_with_grads({**segment(0, split), "initial_state": None})
    o1, s1 = gated_linear_attention(*segment(0, split).values(), output_final_state=True)
    second = run_with_grads({**segment(split, T), "initial_state": s1})
    assert_close(torch.cat([first["o"], second["o"]], 1), full["o"], 1e-12, "outputs")
    assert_close(second["state"], full["state"], 1e-12, "final state")
    assert_close(o1, first["o"], 0.0, "first segment")


@pytest.mark.parametrize("kind", KINDS)
def test_chunk_gradcheck(kind: str) -> None:
    """The hand-written backward of the chunk form against finite differences."""
    inputs = make_inputs(kind, 7)
    leaves = [x.detach().requires_grad_() for x in inputs.values() if x is not None]

    def fn(*xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v, *rest = xs
        gate = rest[0] if kind != "none" else None
        o, state = gated_linear_attention(
            q, k, v, gate, initial_state=rest[-1], output_final_state=True, chunk_size=4
        )
        return o, state

    assert torch.autograd.gradcheck(fn, leaves, fast_mode=True)


@pytest.mark.parametrize("kind", KINDS)
def test_autocast_keeps_float32(kind: str) -> None:
    """Under bfloat16 autocast the matmuls must stay float32 (forward and backward)."""
    inputs = make_inputs(kind, 40, dtype=torch.float32)
    expected = run_with_grads(inputs, chunk_size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = run_with_grads(inputs, chunk_size=16)
    assert_all_close(actual, expected, 1e-6)


def test_final_state_only_when_asked_and_inputs_untouched() -> None:
    inputs = make_inputs("channel", 10, dtype=torch.float32)
    copies = {n: x.clone() for n, x in inputs.items()}
    o, state = gated_linear_attention(*(inputs[n] for n in ("q", "k", "v", "log_decay")))
    assert state is None
    assert o.shape == (B, 10, H, V) and o.dtype == torch.float32 and o.is_contiguous()
    for name, x in inputs.items():
        assert torch.equal(x, copies[name]), f"{name} was modified"


def test_no_grad_inference() -> None:
    inputs = make_inputs("head", 30)
    with torch.no_grad():
        o, _ = gated_linear_attention(*(inputs[n] for n in ("q", "k", "v", "log_decay")))
    expected, _ = gated_linear_attention(
        *(inputs[n] for n in ("q", "k", "v", "log_decay")), mode="recurrent"
    )
    assert_close(o, expected, 1e-12, "o")


def _args(T: int = 4) -> dict:
    return {
        "q": torch.zeros(1, T, 2, 4),
        "k": torch.zeros(1, T, 2, 4),
        "v": torch.zeros(1, T, 2, 3),
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"k": torch.zeros(1, 4, 2, 5)}, "q and k"),
        ({"q": torch.zeros(4, 2, 4), "k": torch.zeros(4, 2, 4)}, "q and k"),
        ({"v": torch.zeros(1, 3, 2, 3)}, "v must be"),
        ({"log_decay": torch.zeros(1, 4, 2, 3)}, "log_decay must be"),
        ({"log_decay": torch.zeros(1, 4)}, "log_decay must be"),
        ({"initial_state": torch.zeros(1, 2, 3, 4)}, "initial_state must be"),
        ({"mode": "parallel"}, "mode must be"),
        ({"chunk_size": 0}, "chunk_size must be"),
        ({"chunk_size": 16.0}, "chunk_size must be"),
        (_args(0), "at least one time step"),
    ],
)
def test_invalid_arguments(change: dict, message: str) -> None:
    args = {**_args(), **change}
    with pytest.raises(ValueError, match=message):
        gated_linear_attention(
            args.pop("q"), args.pop("k"), args.pop("v"), args.pop("log_decay", None), **args
        )
