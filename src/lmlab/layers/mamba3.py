"""Mamba-3, SISO variant (Lahoti et al., "Mamba-3: Improved Sequence Modeling using State Space
Principles"), on lmlab's gated-linear-attention core.

Per head (``P`` channels of ``x``, state size ``N``), with ``dt_t = softplus(dt_raw + dt_bias)``,
``A = -exp(A_log)`` and a data-dependent ``lambda_t = sigmoid(.)`` per head, Mamba-3 replaces
Mamba-2's exponential-Euler step by the exponential-trapezoidal one

    h_t = alpha_t h_{t-1} + beta_t B_{t-1} x_{t-1}^T + gamma_t B_t x_t^T,
    alpha_t = exp(dt_t A),  beta_t = (1 - lambda_t) dt_t alpha_t,  gamma_t = lambda_t dt_t

(``lambda = 1`` is Mamba-2), with a complex-valued diagonal ``A + i theta_t``: the state turns by
a data-dependent angle ``dt_t theta_t`` per pair of state channels each step. Read out as
``y_t = C_t^T h_t + D x_t``.

How it maps onto the core, derived:

1. *Rotation as RoPE.* A complex state that turns by ``dt_t theta_t`` per step equals a real
   state in a frame rotated by the cumulative angle ``phi_t = sum_{s<=t} dt_s theta_s``: rotate
   ``B_t`` and ``C_t`` by ``phi_t`` (RoPE with data-dependent angles, "rotate halves" pairs); the
   readout then sees ``C_t^T R(phi_s - phi_t) B_s``. The trapezoid's ``B_{t-1}`` is rotated by
   its own ``phi_{t-1}``, since ``phi_t - dt_t theta_t = phi_{t-1}``.
2. *Trapezoid as a shifted rank-one input.* With ``u_t = B_t x_t^T`` (rotated ``B``), write
   ``h_t = g_t + gamma_t u_t``. Then ``g_t = alpha_t g_{t-1} + (alpha_t gamma_{t-1} + beta_t)
   u_{t-1}``: a gated-linear-attention recurrence whose input at step ``t`` is the previous
   token's, ``k_t = alpha_t (gamma_{t-1} + (1 - lambda_t) dt_t) B_{t-1}``, ``v_t = x_{t-1}``,
   with the per-head log decay ``dt_t A``. The output is the core's ``C_t^T g_t`` plus the
   diagonal term ``gamma_t (C_t . B_t) x_t``. The previous token's ``B, x, gamma`` (zeros at the
   start of the stream) and the angle are carried in the decode state.

B and C are RMS-normalised (per group, learnable weight) and then get learnable per-head
biases initialised to ones (the paper's BC norm and bias); there is no short convolution (the
trapezoid is the paper's replacement for it). As Mamba-2 here: one input projection, ``ngroups``
shared B/C maps, ``A ~ U(1, 16)``, ``dt`` log-uniform in [1e-3, 0.1], ``D = 1``, the output
``out(rms_norm(y * silu(z)) * w)``. Deviations: the angles ``theta`` are one per pair of state
channels and group (projected from ``x``), rotating all ``N`` state channels; ``lambda`` has no
bias (starts at 0.5); MIMO is not built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config.schema import ModelConfig
from lmlab.errors import LmlabError
from lmlab.layers.base import TokenMixer
from lmlab.layers.common import at_least_float32, check_core_options, reset_mamba_decay
from lmlab.layers.registry import register_token_mixer
from lmlab.ops.gated_linear_attention import gated_linear_attention
from lmlab.ops.rope import apply_rope


@register_token_mixer("mamba3")
class Mamba3(TokenMixer):
    """Mamba-2 with a trapezoidal step, a rotating (complex) state and normalised B, C."""

    @dataclass
    class Options:
        d_state: int = 128
        """State size N (even: channels pair up for the rotation)."""
        expand: int = 2
        """d_inner = expand * d_model."""
        head_dim: int = 64
        """P, the value width of each head; heads = d_inner / head_dim."""
        ngroups: int = 1
        """Number of distinct B/C (and angle) maps, each shared by n_heads / ngroups heads."""
        chunk_size: int = 64
        mode: str = "chunk"
        """``chunk`` (training) or ``recurrent`` (the core's step-by-step oracle)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, options: Options) -> None:
        super().__init__()
        self.options = options
        self.d_inner = options.expand * cfg.d_model
        if options.head_dim <= 0 or self.d_inner % options.head_dim:
            raise LmlabError(
                f"mamba3: expand * d_model = {self.d_inner} is not a multiple of head_dim="
                f"{options.head_dim}; change model.mixer_options.mamba3.head_dim"
            )
        self.n_heads = self.d_inner // options.head_dim
        if options.ngroups <= 0 or self.n_heads % options.ngroups:
            raise LmlabError(
                f"mamba3: ngroups={options.ngroups} must divide the {self.n_heads} heads; "
                "change model.mixer_options.mamba3.ngroups"
            )
        if options.d_state < 2 or options.d_state % 2:
            raise LmlabError(
                f"mamba3: d_state={options.d_state} must be even and >= 2 (state channels "
                "rotate in pairs); change model.mixer_options.mamba3.d_state"
            )
        check_core_options("mamba3", options.mode, options.chunk_size)
        self.mode = options.mode
        self.head_dim, self.d_state, self.ngroups = (
            options.head_dim,
            options.d_state,
            options.ngroups,
        )
        bc = self.ngroups * self.d_state
        self.splits = [self.d_inner, self.d_inner, bc, bc, bc // 2, self.n_heads, self.n_heads]
        self.in_proj = nn.Linear(cfg.d_model, sum(self.splits), bias=False)
        self.b_norm = nn.RMSNorm(self.d_state, eps=cfg.norm_eps)
        self.c_norm = nn.RMSNorm(self.d_state, eps=cfg.norm_eps)
        self.b_bias = nn.Parameter(torch.empty(self.n_heads, self.d_state))
        self.c_bias = nn.Parameter(torch.empty(self.n_heads, self.d_state))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm = nn.RMSNorm(self.d_inner // self.ngroups, eps=cfg.norm_eps)
        self.out = nn.Linear(self.d_inner, cfg.d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Mamba-2's decay and step initialisation, ``D = 1``, B/C biases of ones (the paper)."""
        reset_mamba_decay(self.A_log, self.dt_bias, 1.0, 16.0)
        with torch.no_grad():
            self.D.fill_(1.0)
            self.b_bias.fill_(1.0)
            self.c_bias.fill_(1.0)

    def _per_head(self, t: torch.Tensor, width: int) -> torch.Tensor:
        """``[B, T, groups * width]`` -> ``[B, T, heads, width]`` (each group's heads share)."""
        batch, time = t.shape[:2]
        grouped = t.view(batch, time, self.ngroups, 1, width)
        return grouped.expand(-1, -1, -1, self.n_heads // self.ngroups, -1).reshape(
            batch, time, self.n_heads, width
        )

    def _normed(self, t: torch.Tensor, norm: nn.RMSNorm, bias: torch.Tensor) -> torch.Tensor:
        """The BC norm per group (in the weight's dtype: float32 under autocast), then the
        per-head bias: ``[B, T, groups * N]`` -> ``[B, T, heads, N]``."""
        batch, time, _ = t.shape
        normed = norm(t.view(batch, time, self.ngroups, -1).to(norm.weight.dtype))
        return self._per_head(normed.flatten(2), self.d_state) + bias

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        batch, time, _ = x.shape
        z, xs, b, c, theta, dt, lam = self.in_proj(x).split(self.splits, dim=-1)
        xs = xs.view(batch, time, self.n_heads, self.head_dim)
        b, c = (
            self._normed(t, norm, bias)
            for t, norm, bias in ((b, self.b_norm, self.b_bias), (c, self.c_norm, self.c_bias))
        )
        dt = F.softplus(at_least_float32(dt) + self.dt_bias)  # [B, T, H]
        log_alpha = -torch.exp(self.A_log.to(dt.dtype)) * dt
        lam = torch.sigmoid(at_least_float32(lam))
        gamma = lam * dt
        # The cumulative angle in float64: a long sum whose value matters modulo 2 pi.
        steps = dt.unsqueeze(-1).double() * self._per_head(theta, self.d_state // 2).double()
        angle0 = 0.0 if state is None else state["angle"][:, None]
        angle = angle0 + steps.cumsum(dim=1)  # [B, T, H, N/2]
        cos, sin = angle.cos().to(b.dtype), angle.sin().to(b.dtype)
        b, c = apply_rope(b, cos, sin), apply_rope(c, cos, sin)
        # The previous token's B, x and gamma, shifted in (zeros at the start of the stream).
        if state is None:
            prev = (
                b.new_zeros(batch, 1, *b.shape[2:]),
                xs.new_zeros(batch, 1, *xs.shape[2:]),
                gamma.new_zeros(batch, 1, self.n_heads),
            )
        else:
            prev = (
                state["b"][:, None].to(b.dtype),
                state["x"][:, None].to(xs.dtype),
                state["gamma"][:, None],
            )
        b_prev = torch.cat((prev[0], b[:, :-1]), dim=1)
        x_prev = torch.cat((prev[1], xs[:, :-1]), dim=1)
        gamma_prev = torch.cat((prev[2], gamma[:, :-1]), dim=1)
        weight = log_alpha.exp() * (gamma_prev + (1.0 - lam) * dt)  # alpha (gamma_{t-1} + ...)
        y, recurrent = gated_linear_attention(
            c,
            (b_prev * weight[..., None]).to(b.dtype),
            x_prev,
            log_alpha,
            scale=1.0,
            initial_state=None if state is None else state["recurrent"],
            output_final_state=True,
            mode=self.mode,
            chunk_size=self.options.chunk_size,
        )
        diagonal = gamma * (c * b).sum(-1)  # gamma_t (C_t . B_t)
        y = y + xs * (diagonal[..., None] + self.D[:, None]).to(xs.dtype)
        groups = (batch, time, self.ngroups, -1)
        y = self.norm((y.reshape(groups) * F.silu(z.reshape(groups))).to(self.norm.weight.dtype))
        new_state = {
            "recurrent": recurrent,
            "angle": angle[:, -1],
            "b": b[:, -1],
            "x": xs[:, -1],
            "gamma": gamma[:, -1],
        }
        return self.out(y.reshape(batch, time, self.d_inner)), new_state

    def extra_flops_per_token(self, context: int) -> float:
        """State update and readout (two ``N x P`` products per head and token, as Mamba-2) plus
        the diagonal term and the rotation of B and C."""
        return 4.0 * self.n_heads * self.d_state * self.head_dim + 8.0 * self.n_heads * self.d_state
