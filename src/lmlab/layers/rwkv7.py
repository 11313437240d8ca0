"""RWKV-7 "Goose" time mixing (Peng et al. 2025, "RWKV-7 Goose with Expressive Dynamic State
Evolution"), after BlinkDL/RWKV-LM ``RWKV-v7/train_temp`` and fla's ``layers/rwkv7.py``.

Each head keeps a matrix state ``S [K, V]`` that evolves by a diagonal-plus-rank-one transition,
a delta rule with a per-channel learning rate and a per-channel, data-dependent decay:

    S_t = (diag(w_t) - kappa_t (a_t * kappa_t)^T) S_{t-1} + k_t v_t^T,    o_t = S_t^T r_t

with ``kappa = l2norm(k * k_k)`` per head (the removal key), ``a`` the in-context learning rate
(sigmoid of a LoRA), the decay ``w = exp(-exp(-0.5) * sigmoid(w_0 + LoRA(x)))`` in (0.545, 1)
(the official ``exp(-exp(-softplus(-z) - 0.5))`` rewritten), and the written key
``k = k * (1 + (a - 1) * k_a)``. In ``dplr_delta_rule``'s (and fla's) argument convention,
``S_t = diag(w_t) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T``, the reading vector is
``-kappa`` and the writing vector ``kappa * a``; the readout has no ``1/sqrt(K)`` scale.

Every projection sees its own lerp between the token and the previous one (token shift), so the
previous token is part of the decode state. The output is a per-head GroupNorm, plus the "bonus"
``(sum_k r * k * r_k) v`` for the current token, gated by a LoRA ``g``:
``out((group_norm(o) + bonus) * g)``.

Deviations: the value residual (later layers lerp their ``v`` towards layer 0's ``v`` through a
fourth LoRA) is left out, because lmlab's blocks pass nothing between layers: every layer is
an official layer 0. The output projection keeps lmlab's scaled normal initialisation instead of
RWKV's zeros, so every mixer starts from the same residual scale; the other official
initialisations (lerp ramps, decay and learning-rate biases, zero LoRA inputs, orthogonal
projections, per-layer GroupNorm gain) are in ``reset_parameters``.
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
from lmlab.layers.registry import register_token_mixer
from lmlab.ops.dplr_delta_rule import dplr_delta_rule

MIX_NAMES = ("r", "w", "k", "v", "a", "g")
"""The six token-shift lerps, in the order of ``RWKV7.mix``."""
MIX_POWERS = (0.2, 0.9, 0.7, 0.7, 0.9, 0.2)
"""Official exponents of the lerp ramps ``1 - (i / C) ** (power * (1 - layer / n_layers))``."""
LOG_DECAY_FLOOR = -math.exp(-0.5)
"""Strongest per-step log decay: ``log w`` lies in (-exp(-0.5), 0)."""


def lora_rank(d_model: int, factor: float) -> int:
    """The official LoRA width suggestion ``max(32, round(factor * sqrt(C) / 32) * 32)``."""
    return max(32, int(round(factor * math.sqrt(d_model) / 32) * 32))


class LoRA(nn.Module):
    """``up(activation(down(x)))``: a low-rank data-dependent offset; ``up``'s bias is the
    data-independent part (RWKV's ``w0``, ``a0``)."""

    def __init__(self, width: int, rank: int, out: int, activation: str, bias: bool) -> None:
        super().__init__()
        self.down = nn.Linear(width, rank, bias=False)
        self.up = nn.Linear(rank, out, bias=bias)
        self.activation = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "none": None}[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(x)
        return self.up(h if self.activation is None else self.activation(h))

    @torch.no_grad()
    def reset_parameters(self, bias: torch.Tensor | None = None) -> None:
        """Official: zero input matrix (the offset starts data-independent), orthogonal output
        matrix at gain 0.1."""
        nn.init.zeros_(self.down.weight)
        nn.init.orthogonal_(self.up.weight, gain=0.1)
        if bias is not None:
            self.up.bias.copy_(bias)


@register_token_mixer("rwkv7")
class RWKV7(TokenMixer):
    """RWKV-7 time mixing on the ``dplr_delta_rule`` core; state: matrix + previous token."""

    @dataclass
    class Options:
        decay_rank: int = 0
        """LoRA width of the decay; 0 takes the official ``max(32, 2.5 sqrt(d) rounded to 32)``."""
        a_rank: int = 0
        """LoRA width of the in-context learning rate; 0: as ``decay_rank``."""
        gate_rank: int = 0
        """LoRA width of the output gate; 0 takes the official ``max(32, 5 sqrt(d) ...)``."""
        chunk_size: int = 32
        mode: str = "chunk"
        """``chunk`` (training) or ``recurrent`` (the core's step-by-step oracle)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, options: Options) -> None:
        super().__init__()
        width = cfg.d_model
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.resolved_head_dim
        inner = self.n_heads * self.head_dim
        ranks = {
            "decay_rank": options.decay_rank or lora_rank(width, 2.5),
            "a_rank": options.a_rank or lora_rank(width, 2.5),
            "gate_rank": options.gate_rank or lora_rank(width, 5.0),
        }
        for name, rank in ranks.items():
            if rank < 1:
                raise LmlabError(
                    f"rwkv7: {name}={rank} must be positive (0 takes the official width); "
                    f"change model.mixer_options.rwkv7.{name}"
                )
        self.layer_idx = layer_idx
        self.n_layers = cfg.n_layers
        self.chunk_size = options.chunk_size
        self.mode = options.mode
        # 1-D parameters, so optimisers treat them as gains (no weight decay, no Muon).
        self.mix = nn.Parameter(torch.zeros(len(MIX_NAMES) * width))
        self.k_k = nn.Parameter(torch.zeros(inner))
        self.k_a = nn.Parameter(torch.zeros(inner))
        self.r_k = nn.Parameter(torch.zeros(inner))
        self.receptance = nn.Linear(width, inner, bias=False)
        self.key = nn.Linear(width, inner, bias=False)
        self.value = nn.Linear(width, inner, bias=False)
        self.decay = LoRA(width, ranks["decay_rank"], inner, "tanh", bias=True)
        self.learning_rate = LoRA(width, ranks["a_rank"], inner, "none", bias=True)
        self.gate = LoRA(width, ranks["gate_rank"], inner, "sigmoid", bias=False)
        self.norm = nn.GroupNorm(self.n_heads, inner, eps=self.head_dim * cfg.norm_eps)
        self.out = nn.Linear(inner, width, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official RWKV-7 initialisation (see the module docstring for ``out``)."""
        width, inner = self.receptance.in_features, self.receptance.out_features
        depth = self.layer_idx / self.n_layers  # 0 .. almost 1
        depth_closed = self.layer_idx / max(self.n_layers - 1, 1)  # 0 .. 1
        ramp = torch.arange(width, dtype=torch.float64) / width
        self.mix.copy_(torch.cat([1 - ramp ** (p * (1 - depth)) for p in MIX_POWERS]))
        n = torch.arange(inner, dtype=torch.float64)
        linear = n / max(inner - 1, 1) - 0.5
        half = max((self.head_dim - 1) / 2, 0.5)
        zigzag = ((n % self.head_dim) - (self.head_dim - 1) / 2) / half
        zigzag = zigzag * zigzag.abs()
        decay_speed = -6 + 6 * (n / max(inner - 1, 1)) ** (1 + depth_closed**0.3)
        self.decay.reset_parameters(decay_speed + 0.5 + 2.5 * zigzag)
        self.learning_rate.reset_parameters(-0.19 + 0.3 * zigzag + 0.4 * linear)
        self.gate.reset_parameters()
        self.k_k.copy_(0.71 - 0.1 * linear)
        self.k_a.fill_(1.02)
        self.r_k.fill_(-0.04)
        nn.init.orthogonal_(self.receptance.weight)
        nn.init.orthogonal_(self.key.weight, gain=0.1)
        nn.init.orthogonal_(self.value.weight)
        self.norm.weight.fill_(((self.layer_idx + 1) / self.n_layers) ** 0.7)
        self.norm.bias.zero_()

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        batch, time, width = x.shape
        heads, dim = self.n_heads, self.head_dim
        previous = x.new_zeros(batch, 1, width) if state is None else state["shift"]
        delta = torch.cat([previous, x[:, :-1]], dim=1) - x
        lerped = x.unsqueeze(2) + delta.unsqueeze(2) * self.mix.view(len(MIX_NAMES), width)
        xr, xw, xk, xv, xa, xg = lerped.unbind(2)

        r = self.receptance(xr)
        k = self.key(xk)
        v = self.value(xv)
        wide = torch.promote_types(x.dtype, torch.float32)  # decays and norms: >= float32
        log_decay = LOG_DECAY_FLOOR * torch.sigmoid(self.decay(xw).to(wide))
        rate = torch.sigmoid(self.learning_rate(xa))
        gate = self.gate(xg)
        removal = F.normalize((k * self.k_k).view(batch, time, heads, dim), dim=-1)
        k = k * (1 + (rate - 1) * self.k_a)

        r, k, v, rate = (t.view(batch, time, heads, dim) for t in (r, k, v, rate))
        o, matrix = dplr_delta_rule(
            r,
            k,
            v,
            -removal,
            removal * rate,
            log_decay.view(batch, time, heads, dim),
            scale=1.0,
            initial_state=None if state is None else state["matrix"],
            output_final_state=True,
            mode=self.mode,
            chunk_size=self.chunk_size,
        )
        normed = F.group_norm(
            o.reshape(batch * time, heads * dim).to(wide),
            heads,
            self.norm.weight.to(wide),
            self.norm.bias.to(wide),
            self.norm.eps,
        ).to(o.dtype)
        bonus = (r * k * self.r_k.view(heads, dim)).sum(-1, keepdim=True) * v
        y = normed.view(batch, time, heads, dim) + bonus
        y = self.out(y.reshape(batch, time, heads * dim) * gate)
        # A copy of the last token, so the state does not keep the whole input alive.
        return y, {"shift": x[:, -1:].clone(), "matrix": matrix}

    def extra_flops_per_token(self, context: int) -> float:
        """The core per head and token: decay, rank-one read and write-back, key-value write
        and readout of the ``K x V`` state, about four ``K x V`` multiply-adds (2 FLOPs each)."""
        return 8.0 * self.n_heads * self.head_dim * self.head_dim
