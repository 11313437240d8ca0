"""The neural long-term memory of Titans (Behrouz, Zhong & Mirrokni 2025, "Titans: Learning to
Memorize at Test Time"): a memory model ``M`` trained while the sequence is read, by gradient
descent with momentum and weight decay on the associative loss.

Per head, with data-dependent scalars ``theta_t >= 0`` (learning rate), ``eta_t in (0, 1]``
(momentum decay) and ``1 - alpha_t in (0, 1]`` (the forgetting gate's retention), the paper's
equations (its eq. 13-14 with eq. 12's loss) are

    l(M; k_t, v_t) = || M(k_t) - v_t ||^2
    S_t = eta_t S_{t-1} - theta_t grad l(M_g; k_t, v_t)          (momentum: the "surprise")
    M_t = (1 - alpha_t) M_{t-1} + S_t
    y_t = M_t(q_t)                                                (read after the write)

where ``M_g`` is the memory at the start of the token's chunk: the paper's parallel training
(its section 3.2) takes every gradient of a chunk of ``chunk_size`` tokens at the chunk's
initial memory, which makes ``chunk_size`` part of the model (``chunk_size=1``: the fully
online rule, ``M_g = M_{t-1}``). Chunks are counted from the start of the stream.

``memory="linear"``: ``M(k) = k M`` with ``M: [K, V]``, so ``grad l = 2 k^T (k M_g - v)``; the
recurrence is then a gated delta rule with momentum. ``memory="mlp"``: the paper's deeper memory
with two layers, ``M(k) = silu(k W_1) W_2``.

``mode="recurrent"`` is the oracle: token by token, the gradient taken by ``torch.func.grad``
of the loss above. ``mode="chunk"`` is the paper's chunked form, exact by construction for the
same chunk boundaries; for the linear memory: With ``a_t = prod_{j<=t} (1 - alpha_j)`` and
``e_t = prod_{j<=t} eta_j`` from the chunk start, ``L_a[t, s] = a_t / a_s`` and
``L_e[s, i] = e_s / e_i`` (lower triangular), the momentum and memory recurrences unroll to

    S_t = e_t S_0 - sum_{i<=t} (e_t / e_i) theta_i u_i
    M_t = a_t M_0 + (L_a e)_t S_0 - sum_{i<=t} (L_a L_e)[t, i] theta_i u_i,   u_i = 2 k_i^T r_i

with ``r_i = k_i M_g - v_i``; so outputs ``Q M_t`` are one masked ``Q K^T`` matmul weighted by
``L_a L_e`` against ``R``, and the chunk's end state is a ``K^T R`` product. Decays are formed
as exponentials of non-positive log differences (nothing overflows).

The MLP memory unrolls the same way, because each token's gradient of each layer is an outer
product ``x_j^T g_j`` (the layer's input and the loss gradient at its output, both at ``M_g``):
the first layer's reads ``q_t W_1,t`` are the formula above with ``(k, g_1)``, and the second
layer's reads with ``(silu(q_t W_1,t), silu(k W_1,g), r)``; no per-token weights are formed.

The state is a :class:`MemoryState`: memory, momentum, the open chunk's gradient base and how
many of its tokens were seen, so a stream can stop and resume anywhere (a ``T = 1`` call with
a state is the decode step).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from lmlab.ops.checks import MODES
from lmlab.ops.chunks import AlignedChunks

__all__ = ["MEMORIES", "MemoryState", "neural_memory"]

MEMORIES = ("linear", "mlp")


class MemoryState(NamedTuple):
    """The memory between two calls; each field holds one tensor per memory weight (linear:
    ``M [B, H, K, V]``; mlp: ``W_1 [B, H, K, N]``, ``W_2 [B, H, N, V]``), in float32 (float64
    for float64 inputs)."""

    memory: tuple[torch.Tensor, ...]
    """``M_t``, the memory after the last token."""
    momentum: tuple[torch.Tensor, ...]
    """``S_t``, the momentum (surprise) after the last token."""
    anchor: tuple[torch.Tensor, ...]
    """``M_g``: the memory at the start of the open chunk, where its gradients are taken."""
    seen: int
    """Tokens of the open chunk already consumed, ``0 <= seen < chunk_size``."""


def neural_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    log_momentum: torch.Tensor,
    log_retain: torch.Tensor,
    *,
    initial_state: tuple[torch.Tensor, ...] | MemoryState,
    memory: str = "linear",
    output_final_state: bool = False,
    mode: str = "chunk",
    chunk_size: int = 16,
) -> tuple[torch.Tensor, MemoryState | None]:
    """Run the Titans memory over ``[B, T, H, *]`` queries, keys and values.

    ``lr`` (``theta``, ``>= 0``), ``log_momentum`` (``log eta``, ``<= 0``) and ``log_retain``
    (``log(1 - alpha)``, ``<= 0``): ``[B, T, H]``. ``initial_state``: the memory's initial weights
    (a tuple, ``(M,)`` or ``(W_1, W_2)`` batched as in :class:`MemoryState`; momentum zero) or a
    :class:`MemoryState` from an earlier call. Returns ``o`` (``[B, T, H, V]``, dtype of ``v``)
    and, when ``output_final_state``, the state after the last token, else ``None``.
    """
    _check(q, k, v, (lr, log_momentum, log_retain), initial_state, memory, mode, chunk_size)
    cdt = torch.float64 if torch.float64 in (q.dtype, k.dtype, v.dtype) else torch.float32
    if isinstance(initial_state, MemoryState):
        state = MemoryState(
            *(tuple(w.to(cdt) for w in part) for part in initial_state[:3]), initial_state.seen
        )
    else:
        weights = tuple(w.to(cdt) for w in initial_state)
        state = MemoryState(weights, tuple(torch.zeros_like(w) for w in weights), weights, 0)
    run = _recurrent if mode == "recurrent" else _chunk
    with torch.autocast(q.device.type, enabled=False):  # keep the promised precision
        gates = tuple(g.to(cdt) for g in (lr, log_momentum, log_retain))
        o, state = run(q.to(cdt), k.to(cdt), v.to(cdt), *gates, state, chunk_size, memory)
    return o.to(v.dtype), state if output_final_state else None


def _apply(memory: str, weights: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
    """``M(x)`` for ``x: [B, H, 1, K]``."""
    if memory == "linear":
        return x @ weights[0]
    return F.silu(x @ weights[0]) @ weights[1]


def _recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    log_momentum: torch.Tensor,
    log_retain: torch.Tensor,
    state: MemoryState,
    chunk_size: int,
    memory: str,
) -> tuple[torch.Tensor, MemoryState]:
    """The oracle: the module docstring's equations, one token at a time."""

    def loss(weights: tuple[torch.Tensor, ...], key: torch.Tensor, value: torch.Tensor):
        # Summed over batch and heads, whose memories are independent.
        return (_apply(memory, weights, key) - value).square().sum()

    grad = torch.func.grad(loss)
    weights, momentum, anchor, seen = state
    outs = []
    for t in range(q.shape[1]):
        theta, eta, retain = (
            g[:, t, :, None, None] for g in (lr, log_momentum.exp(), log_retain.exp())
        )
        surprise = grad(anchor, k[:, t, :, None], v[:, t, :, None])
        momentum = tuple(eta * s - theta * u for s, u in zip(momentum, surprise, strict=True))
        weights = tuple(retain * w + s for w, s in zip(weights, momentum, strict=True))
        outs.append(_apply(memory, weights, q[:, t, :, None]))
        seen += 1
        if seen == chunk_size:  # the next chunk's gradients are taken at this memory
            anchor, seen = weights, 0
    return torch.cat(outs, dim=2).transpose(1, 2), MemoryState(weights, momentum, anchor, seen)


def _chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    log_momentum: torch.Tensor,
    log_retain: torch.Tensor,
    state: MemoryState,
    chunk_size: int,
    memory: str,
) -> tuple[torch.Tensor, MemoryState]:
    """The chunked form (module docstring), one chunk per loop step.

    Every per-token gradient is a sum of outer products ``x^T g`` per weight (the layer's
    input ``x`` and the loss gradient ``g`` at its output, both at ``M_g``), so a token's read
    of any weight ``W_t`` unrolls like the linear memory's, with the reading features ``x_q``:
    ``x_q W_t = a_t x_q W_0 + (L_a e)_t x_q S_0 - sum_j (L_a L_e)[t, j] theta_j (x_q . x_j) g_j``
    (:func:`_read`). For the MLP memory the second layer's reading features are
    ``silu(q W_1,t)``, known once the first layer is read.

    Padded in front by the open chunk's ``seen`` tokens and at the end to whole chunks. The
    padding is inert: ``theta = 0`` and zero log gates keep the momentum, and a mask keeps its
    steps from adding the momentum into the memory (``M_t = M_{t-1}`` there, so the factor
    ``L_a`` is taken over live steps ``s`` only); its outputs are dropped.
    """
    c = chunk_size
    chunks = AlignedChunks(q.shape[1], state.seen, c)
    split = chunks.split

    q, k, v = split(q), split(k), split(v)
    theta = split(lr[..., None])  # [N, B, H, C, 1]
    retain_cum = split(log_retain[..., None]).cumsum(-2)  # log a_t from the chunk start
    momentum_cum = split(log_momentum[..., None]).cumsum(-2)  # log e_t
    live = split(torch.ones_like(lr[:1, :, :1, None])).mT  # [N, 1, 1, 1, C]: 0 on padding
    above = torch.triu(torch.ones(c, c, dtype=torch.bool, device=q.device), diagonal=1)

    def ratios(cum: torch.Tensor) -> torch.Tensor:  # [t, s] = exp(cum_t - cum_s), s <= t
        return (cum - cum.mT).masked_fill(above, float("-inf")).exp()

    # Everything that depends on the inputs only, batched over all chunks at once.
    decay_retain = ratios(retain_cum) * live  # L_a over live steps s
    both = decay_retain @ ratios(momentum_cum)  # L_a L_e
    e = momentum_cum.exp()
    mix = both * theta.mT  # (L_a L_e)[t, j] theta_j
    query_scores = (q @ k.mT) * mix  # the first layer's reads share q and k
    # Per chunk: the retention a_t, (L_a e)_t, and the weights of each token's gradient in
    # the chunk-end memory and momentum (e_C / e_j).
    decays = (retain_cum.exp(), decay_retain @ e, theta * both[..., -1, :, None])
    to_momentum = theta * (momentum_cum[..., -1:, :] - momentum_cum).exp()
    # Per-chunk views by unbind: its backward stacks once, where indexing in the loop would
    # fill and add a whole-sequence gradient per chunk (quadratic in T).
    q, k, v, query_scores, mix, to_momentum, e = (
        x.unbind(0) for x in (q, k, v, query_scores, mix, to_momentum, e)
    )
    decays = tuple(d.unbind(0) for d in decays)
    weights, momenta, anchor, _ = state
    outs = []
    for i in range(chunks.count):
        chunk = tuple(d[i] for d in decays)
        if memory == "linear":
            inputs = (k[i],)
            out_grads = (2.0 * (k[i] @ anchor[0] - v[i]),)  # grad l = k^T out_grad
            y = _read(q[i], query_scores[i], weights[0], momenta[0], out_grads[0], chunk)
        else:
            pre = k[i] @ anchor[0]
            hidden = F.silu(pre)
            out_grad = 2.0 * (hidden @ anchor[1] - v[i])
            gate = torch.sigmoid(pre)
            pre_grad = (out_grad @ anchor[1].mT) * gate * (1.0 + pre * (1.0 - gate))  # silu'
            inputs, out_grads = (k[i], hidden), (pre_grad, out_grad)
            read = F.silu(_read(q[i], query_scores[i], weights[0], momenta[0], pre_grad, chunk))
            scores = (read @ hidden.mT) * mix[i]
            y = _read(read, scores, weights[1], momenta[1], out_grad, chunk)
        outs.append(y)
        updated = [
            _chunk_end(w, m, x, g, chunk, to_momentum[i], e[i][..., -1:, :])
            for w, m, x, g in zip(weights, momenta, inputs, out_grads, strict=True)
        ]
        weights, momenta = tuple(u[0] for u in updated), tuple(u[1] for u in updated)
        if chunks.closes(i):  # a closed chunk: the next one's gradient base
            anchor = weights
    o = chunks.merge(outs)
    return o, MemoryState(weights, momenta, anchor, chunks.next_seen)


def _read(
    features: torch.Tensor,
    scores: torch.Tensor,
    weight: torch.Tensor,
    momentum: torch.Tensor,
    out_grad: torch.Tensor,
    decays: tuple[torch.Tensor, ...],
) -> torch.Tensor:
    """``x_q W_t`` for every token of a chunk; ``scores``: ``(x_q x^T) * mix`` (``[C, C]``)."""
    retain, into_memory, _ = decays
    return retain * (features @ weight) + into_memory * (features @ momentum) - scores @ out_grad


def _chunk_end(
    weight: torch.Tensor,
    momentum: torch.Tensor,
    inputs: torch.Tensor,
    out_grad: torch.Tensor,
    decays: tuple[torch.Tensor, ...],
    to_momentum: torch.Tensor,
    momentum_decay: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One weight and its momentum at the end of a chunk (gradients ``inputs^T out_grad``)."""
    retain, into_memory, to_memory = decays
    new_weight = (
        retain[..., -1:, :] * weight
        + into_memory[..., -1:, :] * momentum
        - inputs.mT @ (to_memory * out_grad)
    )
    return new_weight, momentum_decay * momentum - inputs.mT @ (to_momentum * out_grad)


def _check(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: tuple[torch.Tensor, ...],
    initial: tuple[torch.Tensor, ...] | MemoryState,
    memory: str,
    mode: str,
    chunk_size: int,
) -> None:
    """Raise ``ValueError`` naming the expected layout for the first bad argument."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if memory not in MEMORIES:
        raise ValueError(f"memory must be one of {MEMORIES}, got {memory!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q, k must be [batch, time, heads, key_dim] and v [batch, time, heads, value_dim], "
            f"got {tuple(q.shape)}, {tuple(k.shape)} and {tuple(v.shape)}"
        )
    b, t, h, dk = q.shape
    if t < 1:
        raise ValueError("the core needs at least one time step, got T=0")
    for name, g in zip(("lr", "log_momentum", "log_retain"), gates, strict=True):
        if g.shape != (b, t, h):
            raise ValueError(f"{name} must be [B, T, H] = {(b, t, h)}, got {tuple(g.shape)}")
    weights = initial.memory if isinstance(initial, MemoryState) else tuple(initial)
    if isinstance(initial, MemoryState) and not 0 <= initial.seen < chunk_size:
        raise ValueError(f"initial_state.seen={initial.seen} must lie in [0, {chunk_size})")
    count = 1 if memory == "linear" else 2
    shapes = [tuple(w.shape) for w in weights]
    ok = len(shapes) == count and shapes[0][:3] == (b, h, dk) and shapes[-1][-1] == v.shape[-1]
    if ok and count == 2:
        ok = shapes[1][:3] == (b, h, shapes[0][3])
    if not ok:
        expected = "(M [B, H, K, V],)" if count == 1 else "(W_1 [B, H, K, N], W_2 [B, H, N, V])"
        raise ValueError(f"initial_state weights must be {expected}, got {shapes}")
