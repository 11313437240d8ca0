"""TTT-Linear: the oracle against mini-batch gradient descent written out with autograd, the dual
(chunk) form against the oracle (outputs, final state and every gradient), decode, segments,
validation."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from lmlab.ops.ttt_linear import TTTLinearState, ttt_linear

B, H, D = 2, 2, 8
INPUTS = ("q", "k", "v", "ln_weight", "ln_bias", "lr")


def _inputs(t: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs as the layer produces them: learning rates in (0, 1), a perturbed LN, and a
    non-zero start ``W_0, b_0``."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    inputs = {
        "q": rand(B, t, H, D),
        "k": rand(B, t, H, D),
        "v": rand(B, t, H, D),
        "ln_weight": 1 + 0.3 * rand(H, D),
        "ln_bias": 0.3 * rand(H, D),
        "lr": torch.rand(B, t, H, generator=gen, dtype=torch.float64),
        "initial_state": 0.3 * rand(B, H, D, D),
        "initial_state_bias": 0.3 * rand(B, H, 1, D),
    }
    return {name: x.to(dtype) for name, x in inputs.items()}


def _open_state(mini_batch_size: int, seed: int = 3) -> TTTLinearState:
    """A state in the middle of a mini-batch, as a prefill leaves it."""
    prefix = _inputs(mini_batch_size // 2 + 1, seed=seed)
    _, state = ttt_linear(
        *(prefix[n] for n in INPUTS),
        initial_state=prefix["initial_state"],
        initial_state_bias=prefix["initial_state_bias"],
        mini_batch_size=mini_batch_size,
        output_final_state=True,
        mode="recurrent",
    )
    assert state.seen == (mini_batch_size // 2 + 1) % mini_batch_size
    return state


def _run(
    inputs: dict[str, torch.Tensor], start: str, grad: bool, **kwargs
) -> tuple[torch.Tensor, ...]:
    """Output, final state tensors and (optionally) every input's gradient for a fixed cotangent.

    ``start``: ``none``, ``tensor`` (W_0, b_0) or ``open`` (a mid-mini-batch state)."""
    leaves = {n: x.detach().clone().requires_grad_(grad) for n, x in inputs.items()}
    if start == "none":
        del leaves["initial_state"], leaves["initial_state_bias"]
        begin = {}
    elif start == "tensor":
        begin = {"initial_state": leaves["initial_state"]}
        begin["initial_state_bias"] = leaves["initial_state_bias"]
    else:
        del leaves["initial_state"], leaves["initial_state_bias"]
        open_state = _open_state(kwargs["mini_batch_size"])
        tensors = [x.to(inputs["q"].dtype).requires_grad_(grad) for x in open_state[:4]]
        leaves.update(zip(("w", "b", "gw", "gb"), tensors, strict=True))
        begin = {"initial_state": TTTLinearState(*tensors, open_state.seen)}
    o, state = ttt_linear(*(leaves[n] for n in INPUTS), output_final_state=True, **begin, **kwargs)
    outputs = (o, *state[:4])
    if not grad:
        return outputs
    gen = torch.Generator().manual_seed(1)
    # A closed mini-batch leaves zero accumulators, constants without a gradient.
    live = [x for x in outputs if x.requires_grad]
    cotangents = [
        torch.randn(x.shape, generator=gen, dtype=torch.float64).to(x.dtype) for x in live
    ]
    return (*outputs, *torch.autograd.grad(live, list(leaves.values()), cotangents))


@pytest.mark.parametrize(
    ("mini_batch_size", "start"),
    # A mini-batch of one token is never open.
    [(1, "none"), (1, "tensor")] + [(c, s) for c in (4, 16) for s in ("none", "tensor", "open")],
)
@pytest.mark.parametrize("t", [1, 7, 37, 64])
def test_chunk_matches_recurrent_float64(mini_batch_size: int, t: int, start: str) -> None:
    inputs = _inputs(t)
    ref = _run(inputs, start, grad=True, mode="recurrent", mini_batch_size=mini_batch_size)
    got = _run(inputs, start, grad=True, mode="chunk", mini_batch_size=mini_batch_size)
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == r.dtype == torch.float64
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_chunk_matches_recurrent_float32() -> None:
    truth = _run(_inputs(45), "tensor", grad=True, mode="recurrent", mini_batch_size=16)
    inputs = _inputs(45, dtype=torch.float32)
    got = _run(inputs, "tensor", grad=True, mode="chunk", mini_batch_size=16)
    rec = _run(inputs, "tensor", grad=True, mode="recurrent", mini_batch_size=16)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    for g, r32, r in zip(got, rec, truth, strict=True):
        assert rel_err(g, r32) < 1e-5
        assert rel_err(g, r) < 1e-5


def test_bfloat16_inputs_accumulate_in_float32() -> None:
    inputs = _inputs(40, dtype=torch.bfloat16)
    exact = {n: x.double() for n, x in inputs.items()}
    ref = _run(exact, "tensor", grad=True, mode="recurrent", mini_batch_size=16)
    got = _run(inputs, "tensor", grad=True, mode="chunk", mini_batch_size=16)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert rel_err(got[0], ref[0]) < 1e-2
    assert rel_err(got[1], ref[1]) < 1e-5  # exact inputs, float32 accumulation
    for g, r in zip(got[5:], ref[5:], strict=True):
        assert g.dtype == torch.bfloat16 and rel_err(g, r) < 3e-2


@pytest.mark.parametrize("mode", ["recurrent", "chunk"])
@pytest.mark.parametrize("mini_batch_size", [1, 3])
def test_matches_mini_batch_gradient_descent_with_autograd(mode: str, mini_batch_size: int):
    """The definition with the inner gradients taken by ``torch.autograd``: with
    ``mini_batch_size=1`` plain per-token gradient descent ``W_t = W_{t-1} - lr_t grad l_t``,
    otherwise gradients at each mini-batch's initial weights with steps ``lr_j / (i + 1)``."""
    t, c = 8, mini_batch_size
    x = _inputs(t)
    ln_w, ln_b = x["ln_weight"][:, None], x["ln_bias"][:, None]

    def ln(z: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(z, (D,), eps=1e-6) * ln_w + ln_b

    w0, b0 = x["initial_state"], x["initial_state_bias"]
    expected = []
    for start in range(0, t, c):
        w0 = w0.detach().requires_grad_(True)
        b0 = b0.detach().requires_grad_(True)
        grads = []
        for j in range(start, min(start + c, t)):
            k_j = x["k"][:, j, :, None]
            loss = 0.5 * (ln(k_j @ w0 + b0) - (x["v"][:, j, :, None] - k_j)).square().sum()
            g_w, g_b = torch.autograd.grad(loss, (w0, b0))
            grads.append((x["lr"][:, j, :, None, None] * g_w, x["lr"][:, j, :, None, None] * g_b))
            i = j - start
            w_i = w0 - sum(g[0] for g in grads) / (i + 1)
            b_i = b0 - sum(g[1] for g in grads) / (i + 1)
            q_j = x["q"][:, j, :, None]
            expected.append((q_j + ln(q_j @ w_i + b_i)).squeeze(2).detach())
        w0, b0 = w_i, b_i
    o, state = ttt_linear(
        *(x[n] for n in INPUTS),
        initial_state=x["initial_state"],
        initial_state_bias=x["initial_state_bias"],
        mini_batch_size=c,
        output_final_state=True,
        mode=mode,
    )
    torch.testing.assert_close(o, torch.stack(expected, dim=1), rtol=1e-10, atol=1e-12)
    if t % c == 0:  # the last mini-batch closed: its weights are the state passed on
        torch.testing.assert_close(state.weight, w0.detach(), rtol=1e-10, atol=1e-12)
        assert state.seen == 0 and not state.grad_weight.any()
    else:
        assert state.seen == t % c


@pytest.mark.parametrize("mode", ["recurrent", "chunk"])
@pytest.mark.parametrize("mini_batch_size", [4, 16])
def test_decode_step_by_step_matches_full_forward(mode: str, mini_batch_size: int) -> None:
    x = _inputs(23)
    begin = {"initial_state": x["initial_state"], "initial_state_bias": x["initial_state_bias"]}
    kwargs = {"mini_batch_size": mini_batch_size, "output_final_state": True, "mode": mode}
    full, full_state = ttt_linear(*(x[n] for n in INPUTS), **begin, **kwargs)
    outs = []
    for t in range(23):
        step = [x[n][:, t : t + 1] if n in ("q", "k", "v", "lr") else x[n] for n in INPUTS]
        o, state = ttt_linear(*step, **begin, **kwargs)
        begin = {"initial_state": state}
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-12)
    for a, b in zip(state[:4], full_state[:4], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert state.seen == full_state.seen == 23 % mini_batch_size


@pytest.mark.parametrize("cut", [3, 16, 21])
def test_segments_match_one_stream(cut: int) -> None:
    x = _inputs(40)
    kwargs = {"mini_batch_size": 8, "output_final_state": True}
    whole, _ = ttt_linear(*(x[n] for n in INPUTS), **kwargs)
    parts = [
        {n: x[n][:, s] if n in ("q", "k", "v", "lr") else x[n] for n in INPUTS}
        for s in (slice(0, cut), slice(cut, None))
    ]
    first, state = ttt_linear(*(parts[0][n] for n in INPUTS), **kwargs)
    second, _ = ttt_linear(*(parts[1][n] for n in INPUTS), initial_state=state, **kwargs)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-10, atol=1e-12)


def test_zero_learning_rate_keeps_the_initial_model() -> None:
    """With lr = 0 nothing is learnt: ``o = q + LN(q W_0 + b_0)`` for every token."""
    x = _inputs(11)
    x["lr"] = torch.zeros_like(x["lr"])
    o, state = ttt_linear(
        *(x[n] for n in INPUTS),
        initial_state=x["initial_state"],
        initial_state_bias=x["initial_state_bias"],
        mini_batch_size=4,
        output_final_state=True,
    )
    z = x["q"].transpose(1, 2) @ x["initial_state"] + x["initial_state_bias"]
    ln = torch.nn.functional.layer_norm(z, (D,), eps=1e-6) * x["ln_weight"][:, None]
    expected = x["q"] + (ln + x["ln_bias"][:, None]).transpose(1, 2)
    torch.testing.assert_close(o, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.weight, x["initial_state"], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"lr": torch.zeros(B, 5, H + 1)}, "lr must be"),
        ({"ln_weight": torch.ones(H, D + 1)}, "ln_weight"),
        ({"v": torch.zeros(B, 5, H, D + 1)}, "q, k and v"),
        ({"initial_state": torch.zeros(B, H, D, D + 1)}, "initial_state must"),
        ({"initial_state_bias": torch.zeros(B, H, D)}, "initial_state_bias"),
        ({"mini_batch_size": 0}, "mini_batch_size"),
        ({"mode": "parallel"}, "mode"),
    ],
)
def test_bad_arguments_are_named(change: dict, match: str) -> None:
    args = {n: x.float() for n, x in _inputs(5).items()} | change
    kwargs = {n: args.pop(n) for n in list(args) if n not in INPUTS}
    with pytest.raises(ValueError, match=match):
        ttt_linear(*(args[n] for n in INPUTS), **kwargs)


def test_open_state_with_a_bias_or_out_of_range_position_is_refused() -> None:
    x = _inputs(3)
    state = _open_state(4)
    with pytest.raises(ValueError, match="initial_state_bias must be None"):
        ttt_linear(
            *(x[n] for n in INPUTS),
            initial_state=state,
            initial_state_bias=x["initial_state_bias"],
            mini_batch_size=4,
        )
    with pytest.raises(ValueError, match="seen"):
        ttt_linear(*(x[n] for n in INPUTS), initial_state=state, mini_batch_size=2)
