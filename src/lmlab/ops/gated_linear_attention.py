"""Gated linear attention: the recurrent core shared by RetNet, GLA, Mamba-2 (SSD) and BDH.

The recurrence, for every batch element and head::

    S_t = exp(log_decay_t) * S_{t-1} + k_t v_t^T        S: [K, V]
    o_t = scale * q_t^T S_t

``log_decay`` is one number per head and step (RetNet, Mamba-2), one per key channel (GLA; the
decay then scales the rows of ``S``) or absent (plain linear attention).

``mode="recurrent"`` is the step-by-step oracle. ``mode="chunk"`` is the training form: inside
a chunk of ``C`` steps the outputs come from a causal ``[C, C]`` attention matrix, across
chunks from the state carried by a loop over chunks. With ``b`` the log decay accumulated from
the chunk start, every decay is ``exp`` of a difference ``b_i - b_j`` taken in the causal
direction (``j <= i``), so never ``> 1`` and nothing overflows however strong the decay:

* factorised (either decay kind, when no chunk's decay spans more than ``2 * _HALF_SPAN``, 60
  in float32: a mean log decay of -0.9 a step over 64 steps): ``q exp(b - m)`` and
  ``k exp(m - b)`` with ``m`` halfway through the chunk's decay, then one masked matmul, as
  cheap as no decay at all;
* stronger per-head decays: the ``[C, C]`` matrix ``b_i - b_j`` is masked above the diagonal
  before the ``exp``;
* stronger per-channel decays would overflow the factors, so the chunk is split in halves
  recursively and each right half sees its left half through queries and keys both decayed to
  the first step of the right half (the secondary chunking of flash-linear-attention, taken
  down to single steps so that no ``[C, C, K]`` tensor is needed);
* across chunks, queries are decayed from the chunk start (``exp(b_i)``) and keys to the chunk
  end (``exp(b_C - b_j)``).

``b`` is accumulated in float64 (the differences of long sums lose precision in float32),
everything else runs in float32 (float64 for float64 inputs). The chunk form has a hand-written
backward: autograd through it spent as long on bookkeeping (zero-filled gradients of views,
broadcast reductions, the state loop) as on the matmuls.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lmlab.ops.checks import check_core_args
from lmlab.ops.fla import fla_gated_linear_attention, use_fla

# Largest |exponent| of a per-channel decay factor in the one-factorisation-per-chunk form:
# factors stay far from overflow, and their products (up to exp(2 * this)) below float32's max.
_HALF_SPAN = {torch.float32: 30.0, torch.float64: 300.0}


def gated_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    mode: str = "chunk",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the gated linear attention recurrence over ``[B, T, H, *]`` inputs.

    Args:
        q, k: ``[B, T, H, K]`` queries and keys.
        v: ``[B, T, H, V]`` values; the output has their dtype.
        log_decay: ``[B, T, H]`` (per head), ``[B, T, H, K]`` (per key channel) or ``None``
            (no decay); finite and ``<= 0``.
        scale: query scale, ``K ** -0.5`` by default.
        initial_state: ``[B, H, K, V]`` state before the first step (zeros if ``None``).
        output_final_state: also return the state after the last step.
        mode: ``"chunk"`` (fast, for training and prefill) or ``"recurrent"`` (the oracle).
        chunk_size: steps per chunk in ``"chunk"`` mode (a per-channel decay rounds it up to a
            power of two).

    Returns:
        ``(o, state)``: ``o`` is ``[B, T, H, V]``; ``state`` is ``[B, H, K, V]`` in float32
        (float64 for float64 inputs) when ``output_final_state`` is set, else ``None``.
    """
    check_core_args(q, k, v, initial_state, mode, chunk_size, log_decay=log_decay)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if use_fla(q, mode):  # CUDA with lmlab[cuda]: fla's Triton kernel (see lmlab.ops.fla)
        return fla_gated_linear_attention(
            q, k, v, log_decay, scale, initial_state, output_final_state
        )
    out_dtype = v.dtype
    dtype = torch.float64 if torch.float64 in {q.dtype, k.dtype, v.dtype} else torch.float32
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    # One layout for both decay kinds: [B, T, H, K] or [B, T, H, 1], broadcast against K.
    gate = None
    if log_decay is not None:
        gate = log_decay.to(dtype)
        gate = gate if gate.dim() == 4 else gate[..., None]
    state = None if initial_state is None else initial_state.to(dtype)
    # Autocast would run the matmuls in bfloat16: less precise, and ~100x slower on most CPUs.
    with torch.autocast(q.device.type, enabled=False):
        if mode == "recurrent":
            o, state = _recurrent(q, k, v, gate, scale, state)
        else:
            o, state = _ChunkGLA.apply(q, k, v, gate, state, scale, chunk_size)
    return o.to(out_dtype), state if output_final_state else None


def _recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor | None,
    scale: float,
    state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition, one step at a time: slow, but obviously right."""
    B, T, H, K = q.shape
    if state is None:
        state = q.new_zeros(B, H, K, v.shape[-1])
    # unbind, not indexing: autograd then builds each input's gradient once, not once per step.
    gates = [None] * T if gate is None else gate.unbind(1)
    outputs = []
    for q_t, k_t, v_t, gate_t in zip(q.unbind(1), k.unbind(1), v.unbind(1), gates, strict=True):
        if gate_t is not None:
            state = state * gate_t[..., None].exp()
        state = state + k_t[..., :, None] * v_t[..., None, :]
        outputs.append(scale * (q_t[..., :, None] * state).sum(-2))
    return torch.stack(outputs, 1), state


class _ChunkGLA(torch.autograd.Function):
    """The chunkwise-parallel form on ``[B, T, H, *]`` inputs, all in one compute dtype.

    Internally everything is ``[B, H, N, C, *]`` (N chunks of C steps, zero-padded at the end;
    padding has log decay 0, so it leaves the state unchanged). ``b`` is ``[..., C, K]`` for a
    per-channel decay and ``[..., C, 1]`` for a per-head one, so the across-chunk code serves
    both.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        gate: torch.Tensor | None,
        state: torch.Tensor | None,
        scale: float,
        chunk_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        T = q.shape[1]
        C = min(chunk_size, T)
        if gate is not None and gate.shape[-1] > 1:
            C = 1 << (C - 1).bit_length()  # the per-channel form halves chunks down to 1 step
        N = -(-T // C)
        q, k, v = (_to_chunks(x, N, C) for x in (q, k, v))
        q *= scale
        # b in float64: decays come from differences b_i - b_j of long sums, and in float32 those
        # lose ~|b| * 6e-8 of absolute precision (1e-5 relative error at log decay -10 a step).
        b = None if gate is None else _to_chunks(gate, N, C).double().cumsum_(-2)

        kind = "none" if b is None else _decay_kind(b, q.dtype)
        o, intra_saved = _intra_forward(kind, q, k, v, b)
        q_gain, k_gain, chunk_decay = _inter_gains(b, q.dtype)
        q_inter = q if q_gain is None else q * q_gain
        k_inter = k if k_gain is None else k * k_gain
        updates = k_inter.mT @ v  # [B, H, N, K, V]: each chunk's own contribution to the state
        starts = updates.new_empty(updates.shape)  # the state entering each chunk
        starts[:, :, 0] = 0.0 if state is None else state
        for n in range(N - 1):
            _decay_add(updates[:, :, n], starts[:, :, n], chunk_decay, n, out=starts[:, :, n + 1])
        final = _decay_add(updates[:, :, -1], starts[:, :, -1], chunk_decay, N - 1)
        _flat(o).baddbmm_(_flat(q_inter), _flat(starts))

        ctx.save_for_backward(q, k, v, starts, q_gain, k_gain, chunk_decay, *intra_saved)
        ctx.kind, ctx.scale, ctx.T = kind, scale, T
        return _from_chunks(o, T), final

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, do: torch.Tensor, d_final: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        with torch.autocast(do.device.type, enabled=False):
            return _ChunkGLA._backward(ctx, do, d_final)

    @staticmethod
    def _backward(
        ctx: torch.autograd.function.FunctionCtx, do: torch.Tensor, d_final: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        q, k, v, starts, q_gain, k_gain, chunk_decay, *intra_saved = ctx.saved_tensors
        N, C = q.shape[2], q.shape[3]
        do = _to_chunks(do, N, C)
        q_inter = q if q_gain is None else q * q_gain
        k_inter = k if k_gain is None else k * k_gain

        # Across chunks: d_starts is the gradient reaching each chunk's entering state,
        # d_updates the gradient of the state leaving each chunk.
        dq_inter = do @ starts.mT
        d_starts = q_inter.mT @ do
        d_updates = d_starts.new_empty(d_starts.shape)
        d_updates[:, :, -1] = d_final
        for n in range(N - 1, 0, -1):
            d_next = d_updates[:, :, n - 1]
            _decay_add(d_starts[:, :, n], d_updates[:, :, n], chunk_decay, n, out=d_next)
        d_state = _decay_add(d_starts[:, :, 0], d_updates[:, :, 0], chunk_decay, 0)
        dk_inter = v @ d_updates.mT
        dv_inter = k_inter @ d_updates

        dq, dk, dv, db = _intra_backward(ctx.kind, q, k, v, intra_saved, do)
        dv += dv_inter
        if db is None:
            dq += dq_inter
            dk += dk_inter
        else:
            dq.addcmul_(dq_inter, q_gain)
            dk.addcmul_(dk_inter, k_gain)
            # q_gain = exp(b), k_gain = exp(b_C - b), chunk_decay = exp(b_C) (b_C: last step).
            width = q_gain.shape[-1]
            db += _sum_to_width(dq_inter * q_inter, width)
            dk_gain = _sum_to_width(dk_inter * k_inter, width)
            db -= dk_gain
            d_chunk_decay = _sum_to_width((d_updates * starts).sum(-1), width)  # [B, H, N, w]
            db[..., -1, :] += dk_gain.sum(-2) + d_chunk_decay * chunk_decay[..., 0]
        dq *= ctx.scale
        d_gate = None
        if db is not None:  # b is the cumulative sum of the gate inside each chunk
            d_gate = _from_chunks(db.flip(-2).cumsum(-2).flip(-2), ctx.T)
        T = ctx.T
        return (
            _from_chunks(dq, T),
            _from_chunks(dk, T),
            _from_chunks(dv, T),
            d_gate,
            d_state if ctx.needs_input_grad[4] else None,
            None,
            None,
        )


def _to_chunks(x: torch.Tensor, N: int, C: int) -> torch.Tensor:
    """``[B, T, H, D]`` -> contiguous ``[B, H, N, C, D]``, zero-padded to ``N * C`` steps."""
    B, T, H, D = x.shape
    out = x.new_empty(B, H, N, C, D)
    steps = out.view(B, H, N * C, D)
    steps[:, :, :T] = x.transpose(1, 2)
    steps[:, :, T:] = 0.0
    return out


def _from_chunks(x: torch.Tensor, T: int) -> torch.Tensor:
    """Contiguous ``[B, H, N, C, D]`` -> contiguous ``[B, T, H, D]``, dropping the padding."""
    B, H, N, C, D = x.shape
    return x.view(B, H, N * C, D)[:, :, :T].transpose(1, 2).contiguous()


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``[..., M, P]`` -> ``[batch, M, P]`` view, for the in-place batched matmuls."""
    return x.view(-1, *x.shape[-2:])


def _decay_add(
    add: torch.Tensor,
    state: torch.Tensor,
    chunk_decay: torch.Tensor | None,
    n: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``add + chunk_decay[n] * state``: one step of the state recurrence across chunks."""
    if chunk_decay is None:
        return torch.add(add, state, out=out)
    return torch.addcmul(add, state, chunk_decay[:, :, n], out=out)


def _sum_to_width(x: torch.Tensor, width: int) -> torch.Tensor:
    """Reduce a per-channel gradient ``[..., K]`` to the decay's width (``K``, or 1 per head)."""
    return x if width > 1 else x.sum(-1, keepdim=True)


def _inter_gains(
    b: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Decays from the chunk start to each step, from each step to the chunk end, and over
    the whole chunk (``[B, H, N, w, 1]``, to scale the state's rows)."""
    if b is None:
        return None, None, None
    b_last = b[..., -1:, :]
    return _exp(b, dtype), _exp(b_last - b, dtype), _exp(b_last.mT, dtype)


def _exp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``exp`` in the compute dtype of a float64 log decay (round first: exp is cheaper)."""
    return x.to(dtype).exp_() if x.dtype != dtype else x.exp()


def _decay_kind(b: torch.Tensor, dtype: torch.dtype) -> str:
    """``"factorised"`` when no chunk's decay spans more than ``2 * _HALF_SPAN`` in any channel,
    else ``"head"`` (masked exponent) or ``"channel_split"`` (the halving form)."""
    span = b[..., 0, :] - b[..., -1, :]
    if bool(span.max() <= 2 * _HALF_SPAN[dtype]):
        return "factorised"
    return "head" if b.shape[-1] == 1 else "channel_split"


def _intra_forward(
    kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: torch.Tensor | None
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Output of each chunk from its own keys, and what :func:`_intra_backward` needs."""
    if kind == "channel_split":
        return _per_channel_forward(q, k, v, b)
    if kind == "factorised":
        # exp(b_i - b_j) = exp(b_i - m) exp(m - b_j) with m halfway through the chunk's decay:
        # both factors within exp(+-_HALF_SPAN), so the causal weights are exact to rounding.
        # Above the diagonal the product can reach exp(2 * _HALF_SPAN) (even inf): tril_ assigns.
        mid = (b[..., :1, :] + b[..., -1:, :]) / 2
        q_gain = _exp(b - mid, q.dtype)
        k_gain = q_gain.reciprocal()
        attn = ((q * q_gain) @ (k * k_gain).mT).tril_()
        return attn @ v, (attn, q_gain, k_gain)
    attn = q @ k.mT
    if kind == "none":
        attn.tril_()
        return attn @ v, (attn,)
    b = b[..., 0]
    # Mask before exp: above the diagonal b_i - b_j > 0 could overflow (to inf, and inf * 0 is
    # nan); zeroing it first makes those entries exp(0) = 1 until the second tril_.
    pair_decay = (b[..., :, None] - b[..., None, :]).to(q.dtype).tril_().exp_().tril_()
    attn *= pair_decay
    return attn @ v, (attn, pair_decay)


def _intra_backward(
    kind: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    saved: list[torch.Tensor],
    do: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of :func:`_intra_forward`'s output with respect to q, k, v and ``b``."""
    if kind == "channel_split":
        return _per_channel_backward(q, k, v, saved[0], do)
    attn = saved[0]
    dv = attn.mT @ do
    d_attn = do @ v.mT
    db = None
    if kind == "factorised":
        q_gain, k_gain = saved[1], saved[2]
        d_attn.tril_()
        dq = (d_attn @ (k * k_gain)).mul_(q_gain)
        dk = (d_attn.mT @ (q * q_gain)).mul_(k_gain)
        # The weight of pair (i, j) is exp(b_i - b_j): q's gain carries +b, k's gain -b.
        return dq, dk, dv, _sum_to_width(dq * q - dk * k, q_gain.shape[-1])
    if kind == "none":
        d_attn.tril_()
    else:
        # attn = (q k^T) * exp(b_i - b_j): the gradient of b_i - b_j is d_attn * attn.
        d_pair = d_attn * attn
        db = (d_pair.sum(-1) - d_pair.sum(-2))[..., None]
        d_attn *= saved[1]
    return d_attn @ k, d_attn.mT @ q, dv, db


def _per_channel_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor]]:
    """Intra-chunk output for a per-channel decay (``b``: ``[..., C, K]``, C a power of two).

    Divide and conquer: a block's right half sees its left half through
    ``(q_i exp(b_i - b_p)) . (k_j exp(b_p - b_j))`` with ``p`` the first step of the right half;
    both exponents are ``<= 0`` since ``j < p <= i``, so no factor overflows and each pair's
    weight is exact. Halving down to single steps covers every pair ``j < i`` once, in
    ``C^2 K`` multiply-adds (a masked ``q k^T`` costs the same) plus ``O(C K log C)``
    elementwise work. Returns the output and, per level, those gains (``[log2 C, ..., C, K]``):
    the backward reuses them, as exp dominates the elementwise cost.
    """
    C = q.shape[-2]
    gains = q.new_empty(C.bit_length() - 1, *q.shape)
    o = (q * k).sum(-1, keepdim=True) * v  # each step with itself: decay exp(0) = 1
    for level, ((_, q_r), (k_l, _), (v_l, _), (b_l, b_r), (_, o_r)) in enumerate(
        _halves(q, k, v, b, o)
    ):
        g_l, g_r = _split(gains[level], 2**level)
        ref = b_r[..., :1, :]
        torch.sub(b_r, ref, out=g_r)  # b is float64: round the small differences, not b
        torch.sub(ref, b_l, out=g_l)
        gains[level].exp_()
        o_r += _mm_square((q_r * g_r) @ (k_l * g_l).mT, v_l)
    return o, (gains,)


def _per_channel_backward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gains: torch.Tensor, do: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`_per_channel_forward` (the decayed halves are recomputed)."""
    do_v = (do * v).sum(-1, keepdim=True)
    dq, dk, dv = do_v * k, do_v * q, (q * k).sum(-1, keepdim=True) * do
    db = torch.zeros_like(q)
    halves = _halves(q, k, v, do, dq, dk, dv, db)
    for level, (
        (_, q_r),
        (k_l, _),
        (v_l, _),
        (_, do_r),
        (_, dq_r),
        (dk_l, _),
        (dv_l, _),
        (
            db_l,
            db_r,
        ),
    ) in enumerate(halves):
        g_l, g_r = _split(gains[level], 2**level)
        q_dec, k_dec = q_r * g_r, k_l * g_l
        d_attn = do_r @ v_l.mT
        dv_l += _mm_square(k_dec @ q_dec.mT, do_r)
        dq_dec = _mm_square(d_attn, k_dec)
        dk_dec = _mm_square(d_attn.mT, q_dec)
        dq_r.addcmul_(dq_dec, g_r)
        dk_l.addcmul_(dk_dec, g_l)
        # g_r = exp(b_r - b_p), g_l = exp(b_p - b_l): the reference b_p cancels in every pair
        # weight exp(b_i - b_j), so only the b_r and b_l terms carry gradient.
        db_r.addcmul_(dq_dec, q_dec)
        db_l.addcmul_(dk_dec, k_dec, value=-1.0)
    return dq, dk, dv, db


def _halves(*xs: torch.Tensor) -> Iterator[tuple[tuple[torch.Tensor, torch.Tensor], ...]]:
    """For block sizes 2, 4, ..., C: the (left half, right half) views of every ``[..., C, D]``."""
    half = 1
    while half < xs[0].shape[-2]:
        yield tuple(_split(x, half) for x in xs)
        half *= 2


def _split(x: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left and right halves of every block of ``2 * half`` steps of ``x``: ``[..., C, D]``."""
    blocks = x.unflatten(-2, (x.shape[-2] // (2 * half), 2, half))
    return blocks[..., 0, :, :], blocks[..., 1, :, :]


def _mm_square(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``a @ x`` for ``a``: ``[..., h, h]``; for h <= 2 as broadcast products, because a batched
    matmul over thousands of 1x1 or 2x2 matrices is ~5x slower on CPU."""
    h = a.shape[-1]
    if h > 2:
        return a @ x
    out = a[..., :, :1] * x[..., None, 0, :]
    if h == 2:
        out.addcmul_(a[..., :, 1:], x[..., None, 1, :])
    return out
