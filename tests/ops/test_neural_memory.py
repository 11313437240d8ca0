"""Titans neural memory: the oracle against the paper's equations written out (linear memory,
analytic gradient; MLP memory, autograd), the chunked form against the oracle (outputs, final
state and every gradient), decode, segments and validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err

from lmlab.ops.neural_memory import MemoryState, neural_memory

B, H, K, V = 2, 2, 8, 6  # K != V catches transposed layouts
GATES = ("lr", "log_momentum", "log_retain")


def _inputs(t: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> dict[str, torch.Tensor]:
    """As the layer makes them: unit q and k, theta in (0, 0.5), eta and 1 - alpha in (e^-1, 1),
    and a non-zero initial memory."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen, dtype=torch.float64)

    inputs = {
        "q": F.normalize(rand(B, t, H, K), dim=-1),
        "k": F.normalize(rand(B, t, H, K), dim=-1),
        "v": rand(B, t, H, V),
        "lr": 0.5 * uniform(B, t, H),
        "log_momentum": -uniform(B, t, H),
        "log_retain": -uniform(B, t, H),
        "memory": 0.3 * rand(B, H, K, V),
    }
    return {name: x.to(dtype) for name, x in inputs.items()}


def _call(x: dict[str, torch.Tensor], start, **kwargs) -> tuple[torch.Tensor, MemoryState]:
    return neural_memory(
        x["q"],
        x["k"],
        x["v"],
        *(x[g] for g in GATES),
        initial_state=start,
        output_final_state=True,
        **kwargs,
    )


def _start(x: dict[str, torch.Tensor], memory: str) -> tuple[torch.Tensor, ...]:
    return (x["memory"],) if memory == "linear" else _mlp_weights()


def _open_state(chunk_size: int, memory: str) -> MemoryState:
    """A state in the middle of a chunk with non-zero momentum, as a prefill leaves it."""
    prefix = _inputs(chunk_size + chunk_size // 2 + 1, seed=3)
    _, state = _call(
        prefix, _start(prefix, memory), memory=memory, mode="recurrent", chunk_size=chunk_size
    )
    assert state.seen == (chunk_size // 2 + 1) % chunk_size
    return state


def _run(
    x: dict[str, torch.Tensor], start: str, grad: bool, memory: str = "linear", **kwargs
) -> tuple[torch.Tensor, ...]:
    """Output, final state and (optionally) every input's gradient for a fixed cotangent;
    ``start``: ``weights`` (initial memory) or ``open`` (a mid-chunk state)."""
    leaves = {n: t.detach().clone().requires_grad_(grad) for n, t in x.items()}
    del leaves["memory"]
    if start == "weights":
        weights = [w.to(x["q"].dtype).requires_grad_(grad) for w in _start(x, memory)]
        leaves.update((f"w{i}", w) for i, w in enumerate(weights))
        begin = tuple(weights)
    else:
        opened = _open_state(kwargs["chunk_size"], memory)
        parts = [tuple(w.to(x["q"].dtype).requires_grad_(grad) for w in p) for p in opened[:3]]
        leaves.update((f"s{i}", w) for i, w in enumerate(sum(parts, ())))
        begin = MemoryState(*parts, opened.seen)
    o, state = _call(leaves, begin, memory=memory, **kwargs)
    outputs = (o, *state.memory, *state.momentum, *state.anchor)
    if not grad:
        return outputs
    gen = torch.Generator().manual_seed(1)
    cotangents = [
        torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype) for t in outputs
    ]
    return (*outputs, *torch.autograd.grad(outputs, list(leaves.values()), cotangents))


def _mlp_weights(seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(B, H, K, 12, generator=gen, dtype=torch.float64) / K**0.5
    w2 = 0.3 * torch.randn(B, H, 12, V, generator=gen, dtype=torch.float64)
    return w1, w2


@pytest.mark.parametrize(
    ("chunk_size", "start"),
    # A chunk of one token is never open.
    [(1, "weights")] + [(c, s) for c in (4, 16) for s in ("weights", "open")],
)
@pytest.mark.parametrize("t", [1, 7, 37, 64])
@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_chunk_matches_recurrent_float64(chunk_size: int, t: int, start: str, memory: str) -> None:
    x = _inputs(t)
    if memory == "mlp":  # the deeper memory's inner steps need smaller rates to stay bounded
        x["lr"] = 0.1 * x["lr"]
    ref = _run(x, start, grad=True, memory=memory, mode="recurrent", chunk_size=chunk_size)
    got = _run(x, start, grad=True, memory=memory, mode="chunk", chunk_size=chunk_size)
    for g, r in zip(got, ref, strict=True):
        assert g.dtype == r.dtype == torch.float64
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_chunk_matches_recurrent_float32() -> None:
    truth = _run(_inputs(45), "weights", grad=True, mode="recurrent", chunk_size=16)
    x = _inputs(45, dtype=torch.float32)
    got = _run(x, "weights", grad=True, mode="chunk", chunk_size=16)
    rec = _run(x, "weights", grad=True, mode="recurrent", chunk_size=16)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    for g, r32, r in zip(got, rec, truth, strict=True):
        assert rel_err(g, r32) < 1e-5
        assert rel_err(g, r) < 1e-5


def test_bfloat16_inputs_accumulate_in_float32() -> None:
    x = _inputs(40, dtype=torch.bfloat16)
    ref = _run(
        {n: t.double() for n, t in x.items()}, "weights", grad=True, mode="recurrent", chunk_size=16
    )
    got = _run(x, "weights", grad=True, mode="chunk", chunk_size=16)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert rel_err(got[0], ref[0]) < 1e-2
    assert rel_err(got[1], ref[1]) < 1e-5
    for g, r in zip(got[4:], ref[4:], strict=True):
        assert g.dtype == torch.bfloat16 and rel_err(g, r) < 3e-2


@pytest.mark.parametrize("mode", ["recurrent", "chunk"])
@pytest.mark.parametrize("chunk_size", [1, 3])
def test_linear_memory_follows_the_paper_equations(mode: str, chunk_size: int) -> None:
    """``S_t = eta S_{t-1} - theta 2 k^T (k M_g - v)``, ``M_t = (1 - alpha) M_{t-1} + S_t``,
    ``y_t = q_t M_t``, ``M_g`` the memory at the start of the token's chunk (the previous one
    for chunk_size 1)."""
    x = _inputs(8)
    memory = anchor = x["memory"]
    momentum = torch.zeros_like(memory)
    expected = []
    for t in range(8):
        if t % chunk_size == 0:
            anchor = memory
        k_t, v_t = x["k"][:, t, :, None], x["v"][:, t, :, None]
        theta, eta, retain = (
            x["lr"][:, t, :, None, None],
            x["log_momentum"][:, t, :, None, None].exp(),
            x["log_retain"][:, t, :, None, None].exp(),
        )
        momentum = eta * momentum - theta * 2 * k_t.mT @ (k_t @ anchor - v_t)
        memory = retain * memory + momentum
        expected.append((x["q"][:, t, :, None] @ memory).squeeze(2))
    o, state = _call(x, (x["memory"],), mode=mode, chunk_size=chunk_size)
    torch.testing.assert_close(o, torch.stack(expected, 1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state.memory[0], memory, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state.momentum[0], momentum, rtol=1e-10, atol=1e-12)


def test_mlp_memory_follows_the_paper_equations() -> None:
    """The 2-layer memory ``silu(k W_1) W_2``, per-token gradients by autograd (chunk_size 2)."""
    x = _inputs(6)
    weights = anchor = _mlp_weights()
    momentum = tuple(torch.zeros_like(w) for w in weights)
    expected = []
    for t in range(6):
        if t % 2 == 0:
            anchor = tuple(w.detach().requires_grad_(True) for w in weights)
        k_t, v_t = x["k"][:, t, :, None], x["v"][:, t, :, None]
        loss = (F.silu(k_t @ anchor[0]) @ anchor[1] - v_t).square().sum()
        grads = torch.autograd.grad(loss, anchor)
        theta, eta, retain = (
            x["lr"][:, t, :, None, None],
            x["log_momentum"][:, t, :, None, None].exp(),
            x["log_retain"][:, t, :, None, None].exp(),
        )
        momentum = tuple(eta * s - theta * g for s, g in zip(momentum, grads, strict=True))
        weights = tuple((retain * w + s).detach() for w, s in zip(weights, momentum, strict=True))
        q_t = x["q"][:, t, :, None]
        expected.append((F.silu(q_t @ weights[0]) @ weights[1]).squeeze(2))
    o, _ = _call(x, _mlp_weights(), memory="mlp", mode="recurrent", chunk_size=2)
    torch.testing.assert_close(o, torch.stack(expected, 1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("memory", "mode"), [(m, mode) for m in ("linear", "mlp") for mode in ("chunk", "recurrent")]
)
def test_decode_step_by_step_matches_full_forward(memory: str, mode: str) -> None:
    x = _inputs(19)
    start = (x["memory"],) if memory == "linear" else _mlp_weights()
    kwargs = {"memory": memory, "mode": mode, "chunk_size": 4}
    full, full_state = _call(x, start, **kwargs)
    outs = []
    for t in range(19):
        o, start = _call(
            {n: y[:, t : t + 1] if n != "memory" else y for n, y in x.items()},
            start,
            **kwargs,
        )
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-12)
    for got, want in zip(start[:3], full_state[:3], strict=True):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cut", [3, 16, 21])
def test_segments_match_one_stream(cut: int) -> None:
    x = _inputs(40)
    whole, _ = _call(x, (x["memory"],), chunk_size=8)
    parts = [
        {n: y[:, s] if n != "memory" else y for n, y in x.items()}
        for s in (slice(0, cut), slice(cut, None))
    ]
    first, state = _call(parts[0], (x["memory"],), chunk_size=8)
    second, _ = _call(parts[1], state, chunk_size=8)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"lr": torch.zeros(B, 5, H + 1)}, "lr must be"),
        ({"log_retain": torch.zeros(B, 5)}, "log_retain must be"),
        ({"v": torch.zeros(B, 5, H + 1, V)}, "value_dim"),
        ({"start": (torch.zeros(B, H, V, K),)}, "initial_state weights"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"mode": "parallel"}, "mode"),
        ({"memory": "deep"}, "memory must"),
    ],
)
def test_bad_arguments_are_named(change: dict, match: str) -> None:
    x = {n: t.float() for n, t in _inputs(5).items()}
    start = change.pop("start", (x["memory"],))
    kwargs = {n: change.pop(n) for n in list(change) if n in ("chunk_size", "mode", "memory")}
    with pytest.raises(ValueError, match=match):
        _call(x | change, start, **kwargs)
