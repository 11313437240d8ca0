"""Mamba-3 (Lahoti et al., "Mamba-3: Improved Sequence Modeling using State Space
Principles") on lmlab's gated-linear-attention core: the SISO variant, and MIMO as an option.

Per head (``P`` channels of ``x``, state size ``N``), with ``dt_t = softplus(dt_raw + dt_bias)``,
``A = -exp(A_log)`` and a data-dependent ``lambda_t = sigmoid(.)`` per head, Mamba-3 replaces
Mamba-2's exponential-Euler step by the exponential-trapezoidal one

    h_t = alpha_t h_{t-1} + beta_t U_{t-1} + gamma_t U_t,      U_t = B_t X_t^T,
    alpha_t = exp(dt_t A),  beta_t = (1 - lambda_t) dt_t alpha_t,  gamma_t = lambda_t dt_t

(``lambda = 1`` is Mamba-2), with a complex-valued diagonal ``A + i theta_t``: the state turns by
a data-dependent angle ``dt_t theta_t`` per pair of state channels each step. SISO
(``mimo_rank = 1``): ``U_t = B_t x_t^T`` is rank one, read out as ``y_t = C_t^T h_t + D x_t``.

MIMO (``mimo_rank = R > 1``, the paper's section on multi-input multi-output SSMs, parameterised
as the official code, state-spaces/mamba ``modules/mamba3.py``): ``B_t, C_t`` get ``R`` columns
each (``R`` times the B/C projection, per-rank B/C biases, the BC norm per column, the same
angles for every column), the input is lifted per rank by a learned per-channel scale,
``X_t[:, r] = x_t * w_x[r]`` (``w_x = 1 / R`` at initialisation), so that ``U_t = sum_r
B_t[:, r] X_t[:, r]^T`` has rank ``R``; each column of ``C_t`` reads ``o_t[r] = C_t[:, r]^T h_t +
D X_t[:, r]``, gated per rank by ``silu(z_t * w_z[r])`` (``w_z = 1``) and summed with learned
per-channel weights ``w_o[r]`` (``1 / R``) back to ``P`` channels. The state stays ``N x P``;
reads and writes cost ``R`` times SISO's, which on a GPU fills the tensor cores that SISO's
decode leaves idle; on CPU it is simply ``R`` times the core's work.

How it maps onto the core, derived:

1. *Rotation as RoPE.* A complex state that turns by ``dt_t theta_t`` per step equals a real
   state in a frame rotated by the cumulative angle ``phi_t = sum_{s<=t} dt_s theta_s``: rotate
   every column of ``B_t`` and ``C_t`` by ``phi_t`` (RoPE with data-dependent angles, "rotate
   halves" pairs); the readout then sees ``C_t^T R(phi_s - phi_t) B_s``. The trapezoid's
   ``B_{t-1}`` is rotated by its own ``phi_{t-1}``, since ``phi_t - dt_t theta_t = phi_{t-1}``.
2. *Trapezoid as a shifted input.* Write ``h_t = g_t + gamma_t U_t``. Then ``g_t = alpha_t
   g_{t-1} + w_t U_{t-1}`` with ``w_t = alpha_t (gamma_{t-1} + (1 - lambda_t) dt_t)``: a
   gated-linear-attention recurrence whose input at step ``t`` is the previous token's, keys
   ``w_t B_{t-1}``, values ``X_{t-1}``, with the per-head log decay ``dt_t A``. The output is
   the core's ``C_t^T g_t`` plus the own-token term ``gamma_t C_t^T B_t X_t^T``.
3. *Rank R as R sub-steps.* The core's step writes one outer product and reads one query, so
   each token becomes ``R`` consecutive core steps (a sequence of ``T R`` steps): step
   ``(t, r)`` writes ``w_t B_{t-1}[:, r] X_{t-1}[:, r]^T`` and reads with ``C_t[:, r]``; the
   token's decay ``dt_t A`` sits on its first step and ``0`` on the others. Read ``(t, r)`` then
   sees ``alpha_t g_{t-1}`` and the writes ``r' <= r`` of its token; the missing writes
   ``r' > r`` (decay 1 inside a token) are an exact ``R x R`` correction computed directly,
   as the own-token term is. The final state is ``g_T``; decode runs the same ``R`` steps for
   one token. ``chunk_size`` counts core steps, so a chunk holds ``chunk_size / R`` tokens
   (the official code recommends chunks of ``64 / R`` tokens for MIMO).

The previous token's ``B`` columns, ``x`` and ``gamma`` (zeros at the start of the stream) and
the angle are carried in the decode state.

B and C are RMS-normalised (per group and column, learnable weight) and then get learnable
per-head (and per-column) biases initialised to ones (the paper's BC norm and bias); there is no
short convolution (the trapezoid is the paper's replacement for it). As Mamba-2 here: one input
projection, ``ngroups`` shared B/C maps, ``A ~ U(1, 16)``, ``dt`` log-uniform in [1e-3, 0.1],
``D = 1``, the output ``out(rms_norm(y * silu(z)) * w)``. Deviations: the angles ``theta`` are
one per pair of state channels and group (projected from ``x``), rotating all ``N`` state
channels; ``lambda`` has no bias (starts at 0.5); MIMO's rms_norm comes after the rank
reduction (the official MIMO layer normalises each rank before ``w_o``, or, by default, not at
all); MIMO's extra parameters are not paid for by a narrower MLP (the paper matches parameter
counts that way).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config.schema import ModelConfig
from lmlab.errors import LmlabError
from lmlab.layers.base import TokenMixer
from lmlab.layers.common import (
    MambaHeadOptions,
    at_least_float32,
    mamba_heads,
    reset_mamba_decay,
)
from lmlab.layers.registry import register_token_mixer
from lmlab.ops.gated_linear_attention import gated_linear_attention
from lmlab.ops.rope import apply_rope


@register_token_mixer("mamba3")
class Mamba3(TokenMixer):
    """Mamba-2 with a trapezoidal step, a rotating (complex) state, normalised B, C and, as an
    option, a rank-R (MIMO) state update."""

    @dataclass
    class Options(MambaHeadOptions):
        """As Mamba-2's; ``d_state`` must be even (state channels rotate in pairs) and
        ``chunk_size`` counts core steps, ``mimo_rank`` per token."""

        mimo_rank: int = 1
        """R, the rank of each state update: 1 is SISO; R > 1 is MIMO (R columns of B and C,
        R times the state work; the paper's MIMO uses 4)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, options: Options) -> None:
        super().__init__()
        self.options = options
        self.d_inner = options.expand * cfg.d_model
        self.n_heads = mamba_heads("mamba3", cfg.d_model, options)
        if options.d_state < 2 or options.d_state % 2:
            raise LmlabError(
                f"mamba3: d_state={options.d_state} must be even and >= 2 (state channels "
                "rotate in pairs); change model.mixer_options.mamba3.d_state"
            )
        rank = options.mimo_rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise LmlabError(
                f"mamba3: mimo_rank={rank!r} must be an integer >= 1 (1: SISO, e.g. 4: MIMO); "
                "change model.mixer_options.mamba3.mimo_rank"
            )
        self.mode = options.mode
        self.head_dim, self.d_state, self.ngroups, self.rank = (
            options.head_dim,
            options.d_state,
            options.ngroups,
            rank,
        )
        bc = rank * self.ngroups * self.d_state
        self.splits = [
            self.d_inner,
            self.d_inner,
            bc,
            bc,
            self.ngroups * self.d_state // 2,
            self.n_heads,
            self.n_heads,
        ]
        self.in_proj = nn.Linear(cfg.d_model, sum(self.splits), bias=False)
        self.b_norm = nn.RMSNorm(self.d_state, eps=cfg.norm_eps)
        self.c_norm = nn.RMSNorm(self.d_state, eps=cfg.norm_eps)
        # SISO keeps its [H, N] biases (and so its checkpoints); MIMO has one per column.
        per_rank = () if rank == 1 else (rank,)
        self.b_bias = nn.Parameter(torch.empty(*per_rank, self.n_heads, self.d_state))
        self.c_bias = nn.Parameter(torch.empty(*per_rank, self.n_heads, self.d_state))
        if rank > 1:
            self.mimo_x, self.mimo_z, self.mimo_o = (
                nn.Parameter(torch.empty(rank, self.n_heads, self.head_dim)) for _ in range(3)
            )
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm = nn.RMSNorm(self.d_inner // self.ngroups, eps=cfg.norm_eps)
        self.out = nn.Linear(self.d_inner, cfg.d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Mamba-2's decay and step initialisation, ``D = 1``, B/C biases of ones (the paper);
        MIMO's lift and reduction weights ``1 / R`` and its gate scales 1 (the official code)."""
        reset_mamba_decay(self.A_log, self.dt_bias, 1.0, 16.0)
        with torch.no_grad():
            self.D.fill_(1.0)
            self.b_bias.fill_(1.0)
            self.c_bias.fill_(1.0)
            if self.rank > 1:
                self.mimo_x.fill_(1.0 / self.rank)
                self.mimo_z.fill_(1.0)
                self.mimo_o.fill_(1.0 / self.rank)

    def _per_head(self, t: torch.Tensor, width: int) -> torch.Tensor:
        """``[..., groups * width]`` -> ``[..., heads, width]`` (each group's heads share)."""
        lead = t.shape[:-1]
        grouped = t.view(*lead, self.ngroups, 1, width)
        return grouped.expand(*lead, self.ngroups, self.n_heads // self.ngroups, width).reshape(
            *lead, self.n_heads, width
        )

    def _normed(self, t: torch.Tensor, norm: nn.RMSNorm, bias: torch.Tensor) -> torch.Tensor:
        """The BC norm per column and group (in the weight's dtype: float32 under autocast),
        then the bias: ``[B, T, R * groups * N]`` -> ``[B, T, R, heads, N]``."""
        batch, time, _ = t.shape
        normed = norm(t.view(batch, time, self.rank, self.ngroups, -1).to(norm.weight.dtype))
        return self._per_head(normed.flatten(3), self.d_state) + bias

    def _lift(self, xs: torch.Tensor) -> torch.Tensor:
        """``X[r] = x * w_x[r]``: ``[B, T, H, P]`` -> ``[B, T, R, H, P]`` (SISO: ``x``)."""
        if self.rank == 1:
            return xs[:, :, None]
        return xs[:, :, None] * self.mimo_x.to(xs.dtype)

    def _gated(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``sum_r w_o[r] * y[r] * silu(z * w_z[r])``: ``[B, T, R, H, P]`` -> ``[B, T, H, P]``
        (SISO: ``y * silu(z)``)."""
        if self.rank == 1:
            return y[:, :, 0] * F.silu(z)
        gates = F.silu(z[:, :, None] * self.mimo_z.to(z.dtype))
        return (y * gates * self.mimo_o.to(y.dtype)).sum(2)

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        batch, time, _ = x.shape
        rank, heads = self.rank, self.n_heads
        z, xs, b, c, theta, dt, lam = self.in_proj(x).split(self.splits, dim=-1)
        xs = xs.view(batch, time, heads, self.head_dim)
        b, c = (
            self._normed(t, norm, bias)
            for t, norm, bias in ((b, self.b_norm, self.b_bias), (c, self.c_norm, self.c_bias))
        )  # [B, T, R, H, N]
        dt = F.softplus(at_least_float32(dt) + self.dt_bias)  # [B, T, H]
        log_alpha = -torch.exp(self.A_log.to(dt.dtype)) * dt
        lam = torch.sigmoid(at_least_float32(lam))
        gamma = lam * dt
        # The cumulative angle in float64: a long sum whose value matters modulo 2 pi.
        steps = dt.unsqueeze(-1).double() * self._per_head(theta, self.d_state // 2).double()
        angle0 = 0.0 if state is None else state["angle"][:, None]
        angle = angle0 + steps.cumsum(dim=1)  # [B, T, H, N/2], the same for every column
        cos, sin = (f(angle).to(b.dtype)[:, :, None] for f in (torch.cos, torch.sin))
        b, c = apply_rope(b, cos, sin), apply_rope(c, cos, sin)
        # The previous token's B, x and gamma, shifted in (zeros at the start of the stream).
        if state is None:
            prev = (
                b.new_zeros(batch, 1, *b.shape[2:]),
                xs.new_zeros(batch, 1, *xs.shape[2:]),
                gamma.new_zeros(batch, 1, heads),
            )
        else:
            prev = (
                state["b"][:, None].to(b.dtype),
                state["x"][:, None].to(xs.dtype),
                state["gamma"][:, None],
            )
        b_prev = torch.cat((prev[0], b[:, :-1]), dim=1)
        v, v_prev = self._lift(xs), self._lift(torch.cat((prev[1], xs[:, :-1]), dim=1))
        gamma_prev = torch.cat((prev[2], gamma[:, :-1]), dim=1)
        weight = log_alpha.exp() * (gamma_prev + (1.0 - lam) * dt)  # alpha (gamma_{t-1} + ...)
        k_prev = (b_prev * weight[:, :, None, :, None]).to(b.dtype)
        # Token t is the core's steps (t, 0), ..., (t, R - 1); its decay acts on the first.
        no_decay = log_alpha.new_zeros(batch, time, rank - 1, heads)
        log_decay = torch.cat((log_alpha[:, :, None], no_decay), dim=2)
        core_steps = (batch, time * rank, heads, -1)
        y, recurrent = gated_linear_attention(
            c.reshape(core_steps),
            k_prev.reshape(core_steps),
            v_prev.reshape(core_steps),
            log_decay.reshape(batch, time * rank, heads),
            scale=1.0,
            initial_state=None if state is None else state["recurrent"],
            output_final_state=True,
            mode=self.mode,
            chunk_size=self.options.chunk_size,
        )
        y = y.view(batch, time, rank, heads, self.head_dim)
        # The own token, gamma_t C_t^T B_t X_t^T, and the skip D X_t, for every read column.
        skip = torch.eye(rank, dtype=gamma.dtype, device=gamma.device)[..., None] * self.D
        y = y + _mix(gamma[:, :, None, None] * _dots(c, b) + skip, v)
        if rank > 1:  # read (t, r) has not yet seen the writes (t, r' > r) of its own token
            later = torch.ones(rank, rank, dtype=torch.bool, device=x.device).triu(1)
            y = y + _mix(_dots(c, k_prev) * later[..., None], v_prev)
        y = self._gated(y, z.view(batch, time, heads, self.head_dim))
        y = self.norm(y.reshape(batch, time, self.ngroups, -1).to(self.norm.weight.dtype))
        new_state = {
            "recurrent": recurrent,
            "angle": angle[:, -1],
            "b": b[:, -1],
            "x": xs[:, -1],
            "gamma": gamma[:, -1],
        }
        return self.out(y.reshape(batch, time, self.d_inner)), new_state

    def extra_flops_per_token(self, context: int) -> float:
        """``R`` writes and ``R`` reads of the ``N x P`` state per head (two ``N x P`` products
        each), the rotation of B and C and the own-token term, as SISO counts them; MIMO adds
        two ``R x R`` blocks of column pairs per token as computed (own token, and the missing
        writes with the half that the mask zeroes: a dot of ``N`` and a product of ``P`` per
        pair), the lift, the per-rank gates and the reduction."""
        heads, n, p, rank = self.n_heads, self.d_state, self.head_dim, self.rank
        flops = 4.0 * rank * heads * n * p + 8.0 * rank * heads * n
        if rank > 1:
            flops += heads * (2.0 * 2 * rank * rank * (n + p) + 5.0 * rank * p)
        return flops


def _dots(c: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``c[r] . k[r']`` for every pair of columns of a token: two ``[B, T, R, H, N]`` ->
    ``[B, T, R, R, H]``, in their dtype (float32 under autocast, as the GLA core)."""
    if c.shape[2] == 1:  # SISO: the elementwise form, bit for bit what SISO has computed
        return (c * k).sum(-1)[:, :, None]
    with torch.autocast(c.device.type, enabled=False):
        return torch.einsum("btrhn,btshn->btrsh", c, k)


def _mix(weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``sum_r' weights[r, r'] v[r']``: ``[B, T, R, R, H]``, ``[B, T, R, H, P]`` ->
    ``[B, T, R, H, P]`` in ``v``'s dtype."""
    with torch.autocast(v.device.type, enabled=False):
        return torch.einsum("btrsh,btshp->btrhp", weights.to(v.dtype), v)
