"""Differential attention (DIFF Transformer, Ye et al. 2024).

Each head splits its query and key into two halves of width ``d = head_dim / 2`` and subtracts
two softmax maps, cancelling attention noise common to both:

    A_j = softmax(Q_j K_j^T / sqrt(d)),  j = 1, 2  (causal)
    o_h = RMSNorm((A_1 - lambda A_2) V) * (1 - lambda_init)      V of width head_dim

with the learned, depth-initialised lambda of :mod:`lmlab.layers.differential` (vectors of
width ``d``). Since ``(A_1 - lambda A_2) V = A_1 V -
lambda A_2 V``, each map runs through the fused causal kernel and the KV cache is the usual one
(both key halves stacked). Deviation: with GQA each query half uses the matching key half of
its group's key/value head (the official code maps both halves of some heads to one key head).
Positions: RoPE (on both halves) or none.
"""

from __future__ import annotations

import torch
from torch import nn

from lmlab.config.schema import ModelConfig
from lmlab.errors import LmlabError
from lmlab.layers.attention import KVState, append_kv, causal_attention, truncate_kv
from lmlab.layers.base import TokenMixer
from lmlab.layers.differential import DifferentialReadout
from lmlab.layers.position import Rotary
from lmlab.layers.registry import register_token_mixer


@register_token_mixer("diff_attention")
class DiffAttention(TokenMixer):
    """Differential attention with ``n_heads`` heads of value width ``head_dim``."""

    cache_grows_with_context = True
    """Its decode cache keeps every past token (see the trainer's truncated-BPTT check)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, options: object) -> None:
        super().__init__()
        if cfg.position not in ("rope", "none"):
            raise LmlabError(
                f"diff_attention supports model.position rope or none, not {cfg.position!r}"
            )
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.resolved_kv_heads
        self.head_dim = cfg.resolved_head_dim
        if self.head_dim % 4:
            raise LmlabError(
                f"diff_attention needs head_dim divisible by 4 (two rotary halves), got "
                f"{self.head_dim}; change model.d_model, model.n_heads or model.head_dim"
            )
        self.half = self.head_dim // 2
        q_width = self.n_heads * self.head_dim
        kv_width = self.n_kv_heads * self.head_dim
        self.qkv = nn.Linear(cfg.d_model, q_width + 2 * kv_width, bias=False)
        self.out = nn.Linear(q_width, cfg.d_model, bias=False)
        self.differential = DifferentialReadout(self.head_dim, self.half, layer_idx, cfg.norm_eps)
        self.rotary = Rotary(self.half, cfg.rope_theta) if cfg.position == "rope" else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.differential.reset_parameters()

    def forward(
        self, x: torch.Tensor, state: KVState | None = None
    ) -> tuple[torch.Tensor, KVState]:
        batch, time, _ = x.shape
        q_width = self.n_heads * self.head_dim
        kv_width = self.n_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([q_width, kv_width, kv_width], dim=-1)
        q = q.view(batch, time, 2 * self.n_heads, self.half)
        k = k.view(batch, time, 2 * self.n_kv_heads, self.half)
        offset = 0 if state is None else state["length"]
        if self.rotary is not None:
            q, k = self.rotary(q, offset), self.rotary(k, offset)
        k = k.view(batch, time, self.n_kv_heads, self.head_dim)
        v = v.view(batch, time, self.n_kv_heads, self.head_dim)
        state = append_kv(state, k, v)
        keys, values = state["k"][:, : state["length"]], state["v"][:, : state["length"]]
        q = q.view(batch, time, self.n_heads, self.head_dim)
        maps = [
            causal_attention(q[..., part], keys[..., part], values, offset)
            for part in (slice(0, self.half), slice(self.half, None))
        ]
        y = self.differential(*maps)
        return self.out(y.reshape(batch, time, q_width)), state

    def truncate_state(self, state: KVState, drop: int) -> KVState:
        """A KV cache: cut it (see ``TokenMixer.truncate_state``)."""
        return truncate_kv(state, drop)

    def extra_flops_per_token(self, context: int) -> float:
        """Two score maps of width ``head_dim / 2`` and two value sums of width ``head_dim``."""
        return 2.0 * self.n_heads * (self.head_dim + 2 * self.head_dim) * context
