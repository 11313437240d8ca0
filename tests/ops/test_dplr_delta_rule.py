"""The DPLR delta rule: oracle sanity, chunk == recurrent (values, states, gradients), decode."""

from __future__ import annotations

import pytest
import torch
from conftest import max_rel_err

from lmlab.ops.dplr_delta_rule import dplr_delta_rule

NAMES = ("q", "k", "v", "a", "b", "log_decay")


def make_inputs(
    batch: int = 2,
    time: int = 13,
    heads: int = 2,
    key_dim: int = 8,
    value_dim: int = 6,
    dtype: torch.dtype = torch.float64,
    min_log_decay: float = -1.0,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """RWKV-7-shaped inputs: a = -kappa_hat, b = kappa_hat * iclr (a contractive transition)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    shape = (batch, time, heads, key_dim)
    kappa = torch.nn.functional.normalize(randn(*shape), dim=-1)
    iclr = torch.rand(*shape, generator=gen, dtype=torch.float64)
    inputs = {
        "q": randn(*shape),
        "k": randn(*shape) * 0.5,
        "v": randn(batch, time, heads, value_dim),
        "a": -kappa,
        "b": kappa * iclr,
        "log_decay": min_log_decay * torch.rand(*shape, generator=gen, dtype=torch.float64),
    }
    return {name: x.to(dtype) for name, x in inputs.items()}


def make_state(inputs: dict[str, torch.Tensor], seed: int = 1) -> torch.Tensor:
    batch, _, heads, key_dim = inputs["q"].shape
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, heads, key_dim, inputs["v"].shape[-1])
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(inputs["v"].dtype)


def run_with_grads(
    inputs: dict[str, torch.Tensor], state: torch.Tensor | None, **kwargs
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Output, final state and the gradients of a fixed random loss w.r.t. every input."""
    leaves = {name: x.detach().clone().requires_grad_() for name, x in inputs.items()}
    if state is not None:
        leaves["initial_state"] = state.detach().clone().requires_grad_()
    o, final = dplr_delta_rule(
        *(leaves[n] for n in NAMES),
        initial_state=leaves.get("initial_state"),
        output_final_state=True,
        **kwargs,
    )
    gen = torch.Generator().manual_seed(7)
    weight_o = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    weight_s = torch.randn(final.shape, generator=gen, dtype=torch.float64)
    loss = (o.double() * weight_o).sum() + (final.double() * weight_s).sum()
    loss.backward()
    return o.detach(), final.detach(), {n: x.grad for n, x in leaves.items()}


def explicit_matrices(inputs: dict[str, torch.Tensor], state: torch.Tensor) -> torch.Tensor:
    """Reference written independently: build each transition matrix and multiply."""
    batch, time, heads, _ = inputs["q"].shape
    out = torch.zeros_like(inputs["v"])
    for bi in range(batch):
        for hi in range(heads):
            s = state[bi, hi].clone()
            for t in range(time):
                q, k, v, a, b, g = (inputs[n][bi, t, hi] for n in NAMES)
                transition = torch.diag(g.exp()) + torch.outer(b, a)
                s = transition @ s + torch.outer(k, v)
                out[bi, t, hi] = s.T @ q
    return out


def test_oracle_matches_explicit_transition_matrices() -> None:
    inputs = make_inputs(batch=1, time=6, heads=2, key_dim=4, value_dim=3)
    state = make_state(inputs)
    o, _ = dplr_delta_rule(*(inputs[n] for n in NAMES), initial_state=state, mode="recurrent")
    assert max_rel_err(o, explicit_matrices(inputs, state)) < 1e-12


def test_oracle_without_decay_or_low_rank_is_causal_linear_attention() -> None:
    inputs = make_inputs(time=9)
    inputs["a"] = torch.zeros_like(inputs["a"])
    inputs["b"] = torch.zeros_like(inputs["b"])
    inputs["log_decay"] = torch.zeros_like(inputs["log_decay"])
    o, _ = dplr_delta_rule(*(inputs[n] for n in NAMES), scale=0.5, mode="recurrent")
    q, k, v = (inputs[n].transpose(1, 2) for n in "qkv")
    scores = (q @ k.transpose(-1, -2)).tril()
    assert max_rel_err(o, (0.5 * scores @ v).transpose(1, 2)) < 1e-12


@pytest.mark.parametrize("time", [7, 63, 65, 200])
@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunk_matches_recurrent_float64(time: int, chunk_size: int, with_state: bool) -> None:
    inputs = make_inputs(time=time, seed=time)
    state = make_state(inputs) if with_state else None
    o_ref, s_ref, g_ref = run_with_grads(inputs, state, mode="recurrent")
    o, s, grads = run_with_grads(inputs, state, mode="chunk", chunk_size=chunk_size)
    assert max_rel_err(o, o_ref) < 1e-10
    assert max_rel_err(s, s_ref) < 1e-10
    assert grads.keys() == g_ref.keys()
    for name, grad in grads.items():
        assert max_rel_err(grad, g_ref[name]) < 1e-9, name


@pytest.mark.parametrize(
    ("min_log_decay", "chunk_size"),
    [(-1.0, 32), (-1.5, 64), (-10.0, 32), (-10.0, 16), (-20.0, 64), (-10.0, 12)],
)
def test_chunk_float32_matches_float64_oracle(min_log_decay: float, chunk_size: int) -> None:
    """Weak decays take the one-block path, strong ones (chunk decay beyond e^-60) the blocks."""
    inputs = make_inputs(time=100, key_dim=16, value_dim=8, min_log_decay=min_log_decay)
    state = make_state(inputs)
    o_ref, s_ref, g_ref = run_with_grads(inputs, state, mode="recurrent")
    inputs32 = {n: x.float() for n, x in inputs.items()}
    o, s, grads = run_with_grads(inputs32, state.float(), mode="chunk", chunk_size=chunk_size)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    assert max_rel_err(o, o_ref) < 2e-6
    assert max_rel_err(s, s_ref) < 2e-6
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        assert max_rel_err(grad, g_ref[name]) < 2e-6, name


def test_bfloat16_inputs_stay_close() -> None:
    inputs = {n: x.bfloat16() for n, x in make_inputs(time=40).items()}
    reference = {n: x.double() for n, x in inputs.items()}
    o_ref, _ = dplr_delta_rule(*(reference[n] for n in NAMES), mode="recurrent")
    for mode in ("recurrent", "chunk"):
        o, state = dplr_delta_rule(
            *(inputs[n] for n in NAMES), mode=mode, chunk_size=16, output_final_state=True
        )
        assert o.dtype == torch.bfloat16 and state.dtype == torch.float32
        assert max_rel_err(o, o_ref) < 2e-2, mode


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_bfloat16_autocast_still_computes_in_float32(mode: str) -> None:
    inputs = {n: x.float() for n, x in make_inputs(time=20).items()}
    expected, _ = dplr_delta_rule(*(inputs[n] for n in NAMES), mode=mode, chunk_size=8)
    leaves = {n: x.clone().requires_grad_() for n, x in inputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        o, _ = dplr_delta_rule(*(leaves[n] for n in NAMES), mode=mode, chunk_size=8)
    assert o.dtype == torch.float32
    assert max_rel_err(o, expected) < 1e-6
    o.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in leaves.values())


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_prefill_then_decode_matches_full(mode: str) -> None:
    inputs = make_inputs(time=20)
    full, full_state = dplr_delta_rule(
        *(inputs[n] for n in NAMES), output_final_state=True, mode=mode, chunk_size=8
    )
    prefix = 11
    outputs, state = [], None
    pieces = [slice(0, prefix)] + [slice(t, t + 1) for t in range(prefix, 20)]
    for piece in pieces:
        o, state = dplr_delta_rule(
            *(inputs[n][:, piece] for n in NAMES),
            initial_state=state,
            output_final_state=True,
            mode=mode,
            chunk_size=8,
        )
        outputs.append(o)
    assert max_rel_err(torch.cat(outputs, dim=1), full) < 1e-12
    assert max_rel_err(state, full_state) < 1e-12


def test_two_segments_with_carried_state_equal_one_sequence() -> None:
    inputs = make_inputs(time=70)
    state0 = make_state(inputs)
    full, full_state = dplr_delta_rule(
        *(inputs[n] for n in NAMES), initial_state=state0, output_final_state=True
    )
    first, state = dplr_delta_rule(
        *(inputs[n][:, :33] for n in NAMES), initial_state=state0, output_final_state=True
    )
    second, state = dplr_delta_rule(
        *(inputs[n][:, 33:] for n in NAMES), initial_state=state, output_final_state=True
    )
    assert max_rel_err(torch.cat((first, second), dim=1), full) < 1e-12
    assert max_rel_err(state, full_state) < 1e-12


def test_scale_none_means_inverse_sqrt_key_dim() -> None:
    inputs = make_inputs(time=5, key_dim=16)
    args = [inputs[n] for n in NAMES]
    o_none, none_state = dplr_delta_rule(*args, scale=None)
    o_explicit, _ = dplr_delta_rule(*args, scale=0.25)
    o_default, _ = dplr_delta_rule(*args)
    assert none_state is None
    assert max_rel_err(o_none, o_explicit) < 1e-14
    assert max_rel_err(o_default, 4 * o_explicit) < 1e-12


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mode": "parallel"}, "mode"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"initial_state": torch.zeros(2, 2, 8, 5)}, "initial_state"),
    ],
)
def test_invalid_arguments_raise(change: dict, message: str) -> None:
    inputs = make_inputs(time=4)
    with pytest.raises(ValueError, match=message):
        dplr_delta_rule(*(inputs[n] for n in NAMES), **change)


def test_mismatched_shapes_raise() -> None:
    inputs = make_inputs(time=4)
    inputs["b"] = inputs["b"][..., :4]
    with pytest.raises(ValueError, match="b must have the shape of q"):
        dplr_delta_rule(*(inputs[n] for n in NAMES))
    inputs = make_inputs(time=4)
    inputs["v"] = inputs["v"][:, :3]
    with pytest.raises(ValueError, match="v must be"):
        dplr_delta_rule(*(inputs[n] for n in NAMES))
