"""Mamba-2 (Dao & Gu 2024, "Transformers are SSMs"): the SSD layer of state-spaces/mamba.

One input projection gives the gate z, the SSM input x, the input and output maps B and C
(``ngroups`` of them shared by the heads of a group) and one step size per head. x, B and C pass
through a causal depthwise convolution (width 4, silu). With ``dt = softplus(dt_raw + dt_bias)``
and a scalar ``A_h = -exp(A_log_h)`` per head, each head of width P runs

    h_t = exp(dt_t A_h) h_{t-1} + B_t (dt_t x_t)^T,    y_t = C_t^T h_t + D_h x_t

which is gated linear attention with ``q = C, k = B, v = dt * x``, a per-head log decay
``dt * A`` and scale 1 (no ``K^-1/2``). The output is ``out(rms_norm(y * silu(z)) * w)``, the norm
taken over each group's ``d_inner / ngroups`` channels (mamba_ssm's default
``norm_before_gate=False``; ``norm_before_gate=True`` gives ``rms_norm(y) * w * silu(z)``).

Initialisation as mamba_ssm: ``A`` uniform in [1, 16], ``dt`` log-uniform in [0.001, 0.1]
stored through the inverse softplus in ``dt_bias``, ``D = 1``, PyTorch's default uniform init of
the depthwise convolution. Deviation: the core's default chunk size is 64 (mamba_ssm: 256),
which suits CPU matmuls better. The decode state is the SSM matrix plus the convolution's tail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config.schema import ModelConfig
from lmlab.errors import LmlabError
from lmlab.layers.base import TokenMixer
from lmlab.layers.common import MambaHeadOptions, mamba_heads
from lmlab.layers.norm import GatedRMSNorm
from lmlab.layers.registry import register_token_mixer
from lmlab.ops.gated_linear_attention import gated_linear_attention
from lmlab.ops.short_conv import short_conv


@register_token_mixer("mamba2")
class Mamba2(TokenMixer):
    """Selective state-space layer with scalar per-head decay (SSD)."""

    @dataclass
    class Options(MambaHeadOptions):
        conv_width: int = 4
        a_init_min: float = 1.0
        a_init_max: float = 16.0
        dt_min: float = 0.001
        dt_max: float = 0.1
        dt_init_floor: float = 1e-4
        norm_before_gate: bool = False

    def __init__(self, cfg: ModelConfig, layer_idx: int, options: Options) -> None:
        super().__init__()
        self.options = options
        self.d_inner = options.expand * cfg.d_model
        self.n_heads = mamba_heads("mamba2", cfg.d_model, options)
        self.head_dim = options.head_dim
        if options.d_state < 1 or options.conv_width < 1:
            raise LmlabError("mamba2: d_state and conv_width must be at least 1")
        if not 0 < options.a_init_min <= options.a_init_max:
            raise LmlabError("mamba2: need 0 < a_init_min <= a_init_max")
        if not 0 < options.dt_min <= options.dt_max:
            raise LmlabError("mamba2: need 0 < dt_min <= dt_max")
        self.ngroups = options.ngroups
        self.d_state = options.d_state
        self.norm_before_gate = options.norm_before_gate
        self.chunk_size = options.chunk_size
        self.mode = options.mode
        bc_width = self.ngroups * self.d_state
        conv_dim = self.d_inner + 2 * bc_width
        self.splits = [self.d_inner, conv_dim, self.n_heads]
        self.in_proj = nn.Linear(cfg.d_model, sum(self.splits), bias=False)
        # [channels, 1, width] like nn.Conv1d: a filter, not a matrix for Muon.
        self.conv_weight = nn.Parameter(torch.empty(conv_dim, 1, options.conv_width))
        self.conv_bias = nn.Parameter(torch.empty(conv_dim))
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        group_width = self.d_inner // self.ngroups
        self.norm = (
            GatedRMSNorm(group_width, eps=cfg.norm_eps)
            if self.norm_before_gate
            else nn.RMSNorm(group_width, eps=cfg.norm_eps)
        )
        self.out = nn.Linear(self.d_inner, cfg.d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mamba_ssm's initialisation of the SSM parameters and the convolution."""
        o = self.options
        with torch.no_grad():
            bound = 1 / math.sqrt(o.conv_width)
            self.conv_weight.uniform_(-bound, bound)
            self.conv_bias.uniform_(-bound, bound)
            self.A_log.uniform_(o.a_init_min, o.a_init_max).log_()
            self.dt_bias.uniform_(math.log(o.dt_min), math.log(o.dt_max))
            dt = self.dt_bias.exp().clamp_min(o.dt_init_floor)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.D.fill_(1.0)

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        batch, time, _ = x.shape
        z, xbc, dt = self.in_proj(x).split(self.splits, dim=-1)
        xbc, conv = short_conv(
            xbc,
            self.conv_weight.squeeze(1),
            self.conv_bias,
            state=None if state is None else state["conv"],
            activation="silu",
        )
        bc_width = self.ngroups * self.d_state
        xs, b, c = xbc.split([self.d_inner, bc_width, bc_width], dim=-1)
        xs = xs.view(batch, time, self.n_heads, self.head_dim)
        per_group = (batch, time, self.ngroups, self.n_heads // self.ngroups, self.d_state)
        b, c = (
            t.view(batch, time, self.ngroups, 1, self.d_state)
            .expand(per_group)
            .reshape(batch, time, self.n_heads, self.d_state)
            for t in (b, c)
        )
        dt = dt.to(torch.promote_types(dt.dtype, torch.float32))
        dt = F.softplus(dt + self.dt_bias)
        log_decay = -torch.exp(self.A_log) * dt
        v = (xs * dt[..., None]).to(xs.dtype)
        y, recurrent = gated_linear_attention(
            c,
            b,
            v,
            log_decay,
            scale=1.0,
            initial_state=None if state is None else state["recurrent"],
            output_final_state=True,
            mode=self.mode,
            chunk_size=self.chunk_size,
        )
        y = y + xs * self.D[:, None].to(xs.dtype)
        groups = (batch, time, self.ngroups, -1)
        y, z = y.reshape(groups), z.reshape(groups)
        if self.norm_before_gate:
            y = self.norm(y, z)
        else:  # normalise in the weight's dtype: float32 under autocast
            y = self.norm((y * F.silu(z)).to(self.norm.weight.dtype))
        y = self.out(y.reshape(batch, time, self.d_inner))
        return y, {"recurrent": recurrent, "conv": conv}

    def extra_flops_per_token(self, context: int) -> float:
        """State update and readout: two ``N x P`` products per head and token."""
        return 4.0 * self.n_heads * self.d_state * self.head_dim
