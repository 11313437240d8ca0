"""Diagonal-plus-low-rank (DPLR) delta rule: the state transition of RWKV-7 "Goose".

Per head, with the state ``S`` of shape ``[K, V]`` (keys x values, lmlab's orientation)::

    S_t = diag(exp(log_decay_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T
        = (diag(w_t) + b_t a_t^T) S_{t-1} + k_t v_t^T
    o_t = scale * S_t^T q_t

``a_t`` is the vector that *reads* the old state (contracted with ``S_{t-1}``) and ``b_t`` the
vector along which the read-out is written back. This is the argument convention of fla's
``chunk_dplr_delta_rule(q, k, v, a, b, gk)`` and ``chunk_rwkv7`` (its ``naive.py`` computes
``(S * a).sum(keys) * b``), so RWKV-7 code written against fla maps over unchanged.

RWKV-7 mapping (BlinkDL's ``rwkv_v7_demo``: ``state = state * w + state @ ab + v k^T`` with
``ab = (-kk)(kk * a)^T`` on a ``[V, K]`` state; transposed to lmlab's ``[K, V]`` state this is
``S_t = diag(w) S + (kk * a)((-kk)^T S) + k v^T``)::

    q = r                                   # receptance
    a = -kappa_hat                          # kappa_hat = L2-normalised removal key (kk)
    b = kappa_hat * iclr                    # iclr = in-context learning rate, sigmoid(...)
    log_decay = -exp(-0.5) * sigmoid(...)   # i.e. w = exp(log_decay) in (0.545, 1)
    k = k * (1 + (iclr - 1) * k_a)          # RWKV-7's replacement key, done by the caller
    scale = 1.0                             # RWKV-7 does not scale r
The bonus term ``(r * k * r_k).sum() * v`` and the group norm are the mixer's business.

Chunk form (generalised WY representation). Inside a chunk, with ``G_t`` the cumulative log
decay (inclusive, ``G^-_t = G_{t-1}``) and ``u_t = S_{t-1}^T a_t`` the value read by ``a_t``,
every state is ``S_t = e^{G_t} [S_0 + sum_{s<=t} e^{-G_s} (b_s u_s^T + k_s v_s^T)]``. The
``u_t`` then solve the unit lower-triangular system ``(I - A_ab) U = A_ak V + (a e^{G^-}) S_0``
with ``A_xy[t, s] = sum_c x_t[c] y_s[c] e^{G^-_t[c] - G_s[c]}`` (s < t), so ``U = U0 + W S_0``
with ``U0, W`` independent of the incoming state. All of that is batched matmuls over the
chunks; only ``U = U0 + W S``, ``S <- e^{G_end} S + B_end^T U + K_end^T V`` (two small matmuls
per chunk) runs in a Python loop, and the outputs follow as ``Q e^{G} S + A_qb U + A_qk V``.

Stability: ``e^{G_t - G_s}`` is factorised as ``e^{G_t} e^{-G_s}`` only when no chunk's total
decay exceeds ``_EXP_LIMIT`` (60 in float32: always true for RWKV-7, whose log decay is above
-0.61 per step). Otherwise the chunk is cut into blocks of ``_SUB`` steps: a block's own rows
are factorised around the middle of its decay range (factors <= e^{4 |log_decay|}), the rows
below it around its end (factors <= 1). Cumulative log decays are summed in float64, so the
float32 chunk form is as accurate as the float32 step-by-step loop (~2e-7 relative, gradients
included) for per-channel log decays down to about -20 per step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lmlab.ops.checks import check_core_args
from lmlab.ops.triangular import unit_lower_solve

# Sub-block length for strong decays, and the largest exponent a factor may carry per dtype.
_SUB = 8
_EXP_LIMIT = {torch.float32: 60.0, torch.float64: 600.0}


def dplr_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    log_decay: torch.Tensor,
    *,
    scale: float | None = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    mode: str = "chunk",
    chunk_size: int = 32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the DPLR recurrence over ``[B, T, H, *]`` inputs.

    ``q, k, a, b, log_decay``: ``[B, T, H, K]``; ``v``: ``[B, T, H, V]``; ``initial_state``:
    ``[B, H, K, V]``. ``scale=None`` means ``K ** -0.5``; RWKV-7 uses the default 1.0.
    ``chunk_size=32`` is the fastest on CPU (16 and 64 are within ~10%).
    Returns ``o`` (dtype of ``v``) and the final state (float32, or float64 if any input is
    float64) or ``None`` unless ``output_final_state``. A T=1 call (the decode step) runs the
    recurrent step in either mode.
    """
    check_core_args(
        q, k, v, initial_state, mode, chunk_size, like_q={"a": a, "b": b, "log_decay": log_decay}
    )
    out_dtype = v.dtype
    inputs = (q, k, v, a, b, log_decay)
    dtype = torch.float64 if torch.float64 in {x.dtype for x in inputs} else torch.float32
    if scale is None:
        scale = q.shape[-1] ** -0.5
    # [B, T, H, D] -> [B, H, T, D] in the compute dtype; the query carries the scale.
    q, k, v, a, b, g = (x.transpose(1, 2).to(dtype).contiguous() for x in inputs)
    if scale != 1.0:
        q = q * scale
    state = None if initial_state is None else initial_state.to(dtype)
    # Autocast would run the matmuls in bfloat16 (slower on CPU, and no triangular solve).
    with torch.autocast(q.device.type, enabled=False):
        if mode == "recurrent" or q.shape[2] == 1:
            o, state = _recurrent(q, k, v, a, b, g, state)
        else:
            o, state = _chunked(q, k, v, a, b, g, state, chunk_size)
    return o.transpose(1, 2).to(out_dtype), state if output_final_state else None


def _recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The oracle: one step per token, literally the recurrence in the module docstring."""
    batch, heads, _, key_dim = q.shape
    if state is None:
        state = q.new_zeros(batch, heads, key_dim, v.shape[-1])
    outputs = []
    # unbind, not x[:, :, t]: indexing would make autograd build a full-size gradient per step.
    for q_t, k_t, v_t, a_t, b_t, g_t in zip(
        *(x.unbind(2) for x in (q, k, v, a, b, g)), strict=True
    ):
        read = torch.einsum("bhk,bhkv->bhv", a_t, state)
        state = (
            g_t.exp()[..., None] * state
            + b_t[..., None] * read[..., None, :]
            + k_t[..., None] * v_t[..., None, :]
        )
        outputs.append(torch.einsum("bhk,bhkv->bhv", q_t, state))
    return torch.stack(outputs, dim=2), state


def _chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    g: torch.Tensor,
    state: torch.Tensor | None,
    size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunkwise-parallel form (see the module docstring), inputs ``[B, H, T, D]``."""
    batch, heads, time, key_dim = q.shape
    value_dim = v.shape[-1]
    n_chunks = -(-time // size)
    pad = n_chunks * size - time
    # Zero padding at the end is an identity transition (no decay, nothing read or written).
    if pad:
        q, k, v, a, b, g = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, a, b, g))
    q, k, v, a, b, g = (x.unflatten(2, (n_chunks, size)) for x in (q, k, v, a, b, g))
    # Log decays accumulate in float64: a float32 cumsum would put an error of eps * |G| into
    # every e^{G_t - G_s} (1e-5 relative at -10 per step over a chunk of 32).
    cum = g.to(torch.float64).cumsum(-2)  # G_t, inclusive
    last = cum[..., -1:, :]  # G at the chunk's end
    if bool(last.min() >= -_EXP_LIMIT[q.dtype]):
        # e^{G_t - G_s} = e^{G_t} e^{-G_s}: no chunk spans a decay beyond the float range, so
        # every factor derives from e^{G} and e^{-G} (each rounded once from float64; not 1/e^G,
        # whose derivative -1/(e^G)^2 overflows float32).
        e, e_inv = _exp(cum, q), _exp(-cum, q)
        e_last = e[..., -1:, :]
        a_dec = a * F.pad(e[..., :-1, :], (0, 0, 1, 0), value=1.0)  # a e^{G^-}: reads S0
        q_dec = q * e
        b_in, k_in = b * e_inv, k * e_inv
        b_end, k_end = b_in * e_last, k_in * e_last  # writes, decayed to the chunk's end
        steps = torch.arange(size, device=q.device)
        strict = steps[:, None] > steps[None, :]
        incl = steps[:, None] >= steps[None, :]
        a_ab = torch.where(strict, a_dec @ b_in.mT, 0.0)
        a_ak = torch.where(strict, a_dec @ k_in.mT, 0.0)
        a_qb = torch.where(incl, q_dec @ b_in.mT, 0.0)
        a_qk = torch.where(incl, q_dec @ k_in.mT, 0.0)
    else:
        cum_excl = cum - g  # G_{t-1}
        a_dec = a * _exp(cum_excl, a)
        q_dec = q * _exp(cum, q)
        to_end = _exp(last - cum, q)
        b_end, k_end = b * to_end, k * to_end
        e_last = _exp(last, q)
        (a_ab, a_ak), (a_qb, a_qk) = _decayed_products(
            ((a, cum_excl, True), (q, cum, False)), (b, k), cum, math.gcd(size, _SUB)
        )

    # U = U0 + W S0 from (I - A_ab) U = A_ak V + (a e^{G^-}) S0.
    u0, w = unit_lower_solve(-a_ab, a_ak @ v, a_dec)

    # Across chunks: U = U0 + W S0, S_end = e^{G_end} S0 + B_end^T U + K_end^T V.
    decay = e_last.mT.flatten(0, 1).unbind(1)  # [B*H, K, 1] per chunk
    k_v = (k_end.mT @ v).flatten(0, 1).unbind(1)
    u0, w, b_end = (x.flatten(0, 1).unbind(1) for x in (u0, w, b_end))
    if state is None:
        state = q.new_zeros(batch, heads, key_dim, value_dim)
    state = state.flatten(0, 1)
    starts, reads = [], []
    # unbind (not indexing) so that autograd assembles each gradient with one stack, not
    # n_chunks full-size zero tensors.
    for u0_n, w_n, b_n, kv_n, d_n in zip(u0, w, b_end, k_v, decay, strict=True):
        starts.append(state)
        reads.append(torch.baddbmm(u0_n, w_n, state))
        state = torch.baddbmm(torch.addcmul(kv_n, d_n, state), b_n.mT, reads[-1])
    starts, reads = (torch.stack(x, 1).unflatten(0, (batch, heads)) for x in (starts, reads))
    o = q_dec @ starts + a_qb @ reads + a_qk @ v
    return o.flatten(2, 3)[:, :, :time], state.unflatten(0, (batch, heads))


def _decayed_products(
    rows: tuple[tuple[torch.Tensor, torch.Tensor, bool], ...],
    cols: tuple[torch.Tensor, ...],
    cum_y: torch.Tensor,
    sub: int,
) -> list[list[torch.Tensor]]:
    """``P[t, s] = sum_c x_t[c] y_s[c] exp(cum_x_t[c] - cum_y_s[c])`` on s < t (``strict``)
    or s <= t, else 0, for every ``(x, cum_x, strict)`` in ``rows`` and ``y`` in ``cols``.

    Inputs ``[..., C, K]``, outputs ``[..., C, C]``; callers guarantee ``cum_x_t <= cum_y_s``
    on kept entries and that ``cum_x`` starts at most at the decay before the chunk (0).
    ``exp(cum_x - cum_y)`` is factorised into a row and a column factor around a reference
    per block of ``sub`` columns: halfway (in log decay) through the block for its own rows,
    so both factors stay within e^{span/2}, and the block's end for the rows below it (both
    factors <= 1).
    """
    size = cum_y.shape[-2]
    n = size // sub
    cyb = cum_y.unflatten(-2, (n, sub))
    ends = cyb[..., -1:, :]  # [.., n, 1, K]
    starts = F.pad(ends[..., :-1, :, :], (0, 0, 0, 0, 1, 0))  # log decay before each block
    middle = (starts + ends) / 2
    col_factors = [y.unflatten(-2, (n, sub)) * _exp(middle - cyb, y) for y in cols]
    local = torch.arange(sub, device=cum_y.device)
    out = []
    for x, cum_x, strict in rows:
        xb = x.unflatten(-2, (n, sub)) * _exp(cum_x.unflatten(-2, (n, sub)) - middle, x)
        keep = local[:, None] > local[None, :] if strict else local[:, None] >= local[None, :]
        diags = [torch.where(keep, xb @ yb.mT, 0.0) for yb in col_factors]  # [.., n, sub, sub]
        out.append(
            [
                d.squeeze(-3) if n == 1 else _assemble(d, x, cum_x, y, cyb)
                for d, y in zip(diags, cols, strict=True)
            ]
        )
    return out


def _assemble(
    diag: torch.Tensor, x: torch.Tensor, cum_x: torch.Tensor, y: torch.Tensor, cyb: torch.Tensor
) -> torch.Tensor:
    """The full ``[.., C, C]`` matrix from its diagonal blocks ``[.., n, sub, sub]`` plus the
    blocks below them, each column block factorised around its last step."""
    *_, n, sub, _ = diag.shape
    size = n * sub
    out = diag.new_zeros(*diag.shape[:-3], size, size)
    for j in range(n):
        block = slice(j * sub, (j + 1) * sub)
        out[..., block, block] = diag[..., j, :, :]
        if j + 1 < n:
            edge = cyb[..., j, -1:, :]
            below = x[..., block.stop :, :] * _exp(cum_x[..., block.stop :, :] - edge, x)
            right = y[..., block, :] * _exp(edge - cyb[..., j, :, :], y)
            out[..., block.stop :, block] = below @ right.mT
    return out


def _exp(exponent: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``exp`` of a float64 log decay, in the compute dtype of ``like``."""
    return exponent.exp().to(like.dtype)
