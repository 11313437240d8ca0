"""The (gated) delta rule: the recurrent core of DeltaNet, Gated DeltaNet and Kimi Delta Attention.

Per head, with a key-by-value state ``S`` (``[K, V]``)::

    S_t = diag(exp(log_decay_t)) S_{t-1}                  # decay first (skipped for DeltaNet)
    S_t = S_t + beta_t k_t (v_t - S_t^T k_t)^T            # delta update reads the decayed state
    o_t = scale * S_t^T q_t

``log_decay`` is ``None`` (DeltaNet, Yang et al. 2024), ``[B, T, H]`` (one decay per head: Gated
DeltaNet, Yang et al. 2025) or ``[B, T, H, K]`` (one decay per key channel, multiplying the rows of
``S``: Kimi Delta Attention).

``mode="recurrent"`` is the step-by-step oracle. ``mode="chunk"`` is the training form: inside a
chunk the residuals ``u_t = beta_t (v_t - S_t^T k_t)`` satisfy a unit lower-triangular system
``(I + A) U = diag(beta) (V - (K * Gamma) S_0)`` (the WY / UT-transform representation), so one
triangular solve per chunk gives ``U = U~ - W S_0``, and outputs and the next state are matmuls.
Decay factors are formed as exponentials of non-positive log-decay differences, so strong decays
underflow to zero instead of overflowing (see :func:`_channel_decayed_grams` for the one place
that needs more care).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmlab.ops.checks import check_core_args
from lmlab.ops.fla import fla_gated_delta_rule, use_fla
from lmlab.ops.triangular import unit_lower_solve

__all__ = ["gated_delta_rule"]

_SUBCHUNK = 16
_CLAMP = 40.0
# Largest |exponent| of a per-channel decay factor when a whole chunk is factorised around its
# middle; chunks spanning more take the sub-chunked path.
_HALF_SPAN = {torch.float32: 30.0, torch.float64: 300.0}


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_decay: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    mode: str = "chunk",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the (gated) delta rule over ``[B, T, H, *]`` inputs.

    ``q, k``: ``[B, T, H, K]`` (keys are expected L2-normalised by the caller); ``v``:
    ``[B, T, H, V]``; ``beta``: ``[B, T, H]`` (any real values, e.g. ``2 * sigmoid`` for negative
    eigenvalues); ``log_decay``: ``None``, ``[B, T, H]`` or ``[B, T, H, K]``, finite and ``<= 0``;
    ``initial_state``: ``[B, H, K, V]``. Returns ``o`` (``[B, T, H, V]``, dtype of ``v``) and the
    final state (``[B, H, K, V]`` in the accumulation dtype: float32, or float64 for float64
    inputs) when ``output_final_state`` is set, else ``None``.
    """
    check_core_args(
        q, k, v, initial_state, mode, chunk_size, log_decay=log_decay, per_head={"beta": beta}
    )
    cdt = torch.float64 if torch.float64 in (q.dtype, k.dtype, v.dtype) else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if use_fla(q, mode):  # CUDA with lmlab[cuda]: fla's Triton kernel (see lmlab.ops.fla)
        result = fla_gated_delta_rule(
            q, k, v, beta, log_decay, scale, initial_state, output_final_state
        )
        if result is not None:
            return result
    g = None
    if log_decay is not None:
        g = log_decay.to(cdt)
        g = g.unsqueeze(-1) if log_decay.dim() == 3 else g  # [B, T, H, 1 or K]
    s0 = None if initial_state is None else initial_state.to(cdt)
    run = _recurrent if mode == "recurrent" else _chunk
    with torch.autocast(q.device.type, enabled=False):  # keep the promised precision
        o, state = run(
            q.to(cdt) * scale, k.to(cdt), v.to(cdt), beta.to(cdt).unsqueeze(-1), g, s0, chunk_size
        )
    return o.to(v.dtype), state if output_final_state else None


def _recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    s0: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: the defining recurrence, one step at a time (``chunk_size`` is unused)."""
    b, t, h, dk = q.shape
    state = q.new_zeros(b, h, dk, v.shape[-1]) if s0 is None else s0
    outs = []
    for i in range(t):
        if g is not None:
            state = state * g[:, i, :, :, None].exp()
        k_i = k[:, i]
        read = torch.einsum("bhk,bhkv->bhv", k_i, state)
        state = state + k_i[..., :, None] * (beta[:, i] * (v[:, i] - read))[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, i], state))
    return torch.stack(outs, dim=1), state


def _chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    g: torch.Tensor | None,
    s0: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise-parallel form: batched per-chunk matmuls, then one ``[K, K] @ [K, V]`` per chunk.

    Tensors are laid out ``[N, B, H, C, *]`` (chunk index first) so that the loop over chunks
    walks contiguous slices.
    """
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    c = min(chunk_size, t)
    pad = -t % c
    n = (t + pad) // c

    def split(x: torch.Tensor) -> torch.Tensor:
        # Zero padding is inert: k = beta = 0 writes nothing and log_decay = 0 keeps the state.
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        return x.unflatten(1, (n, c)).permute(1, 0, 3, 2, 4).contiguous()

    q, k, v, beta = split(q), split(k), split(v), split(beta)
    g_step = None if g is None else split(g)
    g = None if g_step is None else g_step.cumsum(dim=-2)  # log-decay from chunk start to t
    a, p = _decayed_grams((k * beta, q), k, g, g_step)
    k_start, q_start, k_end = k, q, k
    if g is not None:
        decay_start = g.exp()
        k_start, q_start = k * decay_start, q * decay_start
        k_end = k * (g[..., -1:, :] - g).exp()
    # (I + A) [U~, W] = diag(beta) [V, K * Gamma], so that U = U~ - W S_0 for a start state S_0.
    u_tilde, w = unit_lower_solve(a, beta * v, beta * k_start)
    o_intra = p @ u_tilde
    q_eff = q_start - p @ w
    # The next state is M S_0 + B with M = diag(Gamma_C) - K_end^T W and B = K_end^T U~.
    k_end_t = k_end.mT
    inject, k_w = k_end_t @ u_tilde, k_end_t @ w
    decay_end = torch.ones_like(k[..., 0, :]) if g is None else g[..., -1, :].exp()
    m = torch.diag_embed(decay_end.expand_as(k[..., 0, :])) - k_w
    state = q.new_zeros(b, h, dk, dv) if s0 is None else s0
    starts = []
    for m_i, inject_i in zip(m.unbind(0), inject.unbind(0), strict=True):
        starts.append(state)
        state = m_i @ state + inject_i
    o = o_intra + q_eff @ torch.stack(starts)
    return o.permute(1, 0, 3, 2, 4).reshape(b, n * c, h, dv)[:, :t], state


def _decayed_grams(
    xs: tuple[torch.Tensor, ...],
    k: torch.Tensor,
    g: torch.Tensor | None,
    g_step: torch.Tensor | None,
) -> list[torch.Tensor]:
    """Causal ``[..., C, C]`` matrices ``sum_c x_t[c] k_s[c] exp(g_t[c] - g_s[c])``, ``s <= t``.

    ``g`` is the within-chunk cumulative log-decay (``[..., C, 1]`` per head or ``[..., C, K]``
    per channel; ``None``: no decay) and ``g_step`` its per-step increments. Per head the
    ``[C, C]`` exponent is masked before ``exp``. Per channel the exponent has a key axis: when
    every chunk's decay spans at most ``2 * _HALF_SPAN`` it is factorised into row and column
    scales (as cheap as the per-head case), else :func:`_channel_decayed_grams` splits the chunk
    into sub-chunks.
    """
    c_len = k.shape[-2]
    above = torch.triu(torch.ones(c_len, c_len, dtype=torch.bool, device=k.device), diagonal=1)
    if g is None:
        return [(x @ k.mT).masked_fill(above, 0.0) for x in xs]
    if g.shape[-1] == 1:
        decay = (g - g.mT).masked_fill(above, float("-inf")).exp()
        return [(x @ k.mT) * decay for x in xs]
    if bool((g[..., 0, :] - g[..., -1, :]).max() <= 2 * _HALF_SPAN[k.dtype]):
        # exp(g_t - g_s) = exp(g_t - m) exp(m - g_s), m halfway through each chunk's decay: both
        # factors within exp(+-_HALF_SPAN). Above the diagonal the product may overflow; the
        # mask assigns (no inf * 0).
        mid = (g[..., :1, :] + g[..., -1:, :]) / 2
        gain = (g - mid).exp()
        k_dec = k / gain
        return [((x * gain) @ k_dec.mT).masked_fill(above, 0.0) for x in xs]
    return _channel_decayed_grams(xs, k, g, g_step)


def _channel_decayed_grams(
    xs: tuple[torch.Tensor, ...], k: torch.Tensor, g: torch.Tensor, g_step: torch.Tensor
) -> list[torch.Tensor]:
    """Per-channel decayed grams without any overflowing exponential.

    Cut the chunk into sub-chunks of ``sub`` steps; ``b_i`` is the step before sub-chunk ``i``
    and ``e_j`` the last step of sub-chunk ``j``. Across sub-chunks (``j < i``) the decay
    factorises as ``exp(g_t - g_{b_i}) * exp(g_{b_i} - g_{e_j}) * exp(g_{e_j} - g_s)``, each
    factor ``<= 1``, which is a matmul after scaling. Within a sub-chunk the same trick needs one
    factor ``>= 1``: it is done in float64 with the per-step log-decay clamped at
    ``-_CLAMP``, which keeps every exponent within ``sub * _CLAMP < 709`` and changes entries
    only by ``exp(-_CLAMP)``, below float64 resolution.
    """
    c_len = k.shape[-2]
    sub = max(d for d in range(1, min(_SUBCHUNK, c_len) + 1) if c_len % d == 0)
    n = c_len // sub
    g_sub = g.unflatten(-2, (n, sub))  # [..., n, sub, K]
    g_end = g_sub[..., -1, :]  # [..., n, K]
    g_before = F.pad(g_end[..., :-1, :], (0, 0, 1, 0))  # g at b_i; 0 at the chunk start
    lower = torch.tril(torch.ones(n, n, dtype=torch.bool, device=k.device), diagonal=-1)
    link = (g_before.unsqueeze(-2) - g_end.unsqueeze(-3)).masked_fill(
        ~lower[..., None], float("-inf")
    )
    k_right = k.unflatten(-2, (n, sub)) * (g_end.unsqueeze(-2) - g_sub).exp()
    k_across = (link.exp().unsqueeze(-2) * k_right.unsqueeze(-4)).flatten(-3, -2)  # [..., n, C, K]
    row_scale = (g_sub - g_before.unsqueeze(-2)).exp()  # [..., n, sub, K]
    # Within sub-chunks, float64 and the clamped log-decay (see the docstring).
    g64 = g_step.to(torch.float64).clamp(min=-_CLAMP).cumsum(-2).unflatten(-2, (n, sub))
    g64_before = F.pad(g64[..., :-1, -1, :], (0, 0, 1, 0)).unsqueeze(-2)
    k_within = k.to(torch.float64).unflatten(-2, (n, sub)) * (g64_before - g64).exp()
    row_scale64 = (g64 - g64_before).exp()
    above = torch.triu(torch.ones(sub, sub, dtype=torch.bool, device=k.device), diagonal=1)
    # All rows (every x) of a sub-chunk share the column factors: one matmul each for all xs.
    x_sub = torch.stack(xs, dim=-3).unflatten(-2, (n, sub)).transpose(-4, -3)  # [..., n, X, sub, K]
    across = (x_sub * row_scale.unsqueeze(-3)).flatten(-3, -2) @ k_across.mT
    within = (x_sub.to(torch.float64) * row_scale64.unsqueeze(-3)).flatten(-3, -2) @ k_within.mT
    across = across.unflatten(-2, (len(xs), sub))  # [..., n, X, sub, C]
    within = within.unflatten(-2, (len(xs), sub)).masked_fill(above, 0.0).to(across.dtype)
    block_diag = torch.diag_embed(
        within.movedim(-4, -1), dim1=-5, dim2=-2
    )  # [..., n, X, sub, n, sub]
    grams = (across + block_diag.flatten(-2, -1)).transpose(-4, -3).flatten(-3, -2)
    return list(grams.unbind(-3))
