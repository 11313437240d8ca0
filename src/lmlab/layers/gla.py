"""Gated Linear Attention (Yang et al. 2023, "Gated Linear Attention Transformers with
Hardware-Efficient Training"), in the form of fla's ``GatedLinearAttention`` layer.

Every key channel of every head forgets at its own data-dependent rate:

    S_t = diag(alpha_t) S_{t-1} + k_t v_t^T,    o_t = (K^-1/2) q_t^T S_t,
    log alpha_t = logsigmoid(W_up W_down x_t + b) / 16

The low-rank (rank 16) gate projection keeps the decay cheap; dividing the log-sigmoid by the
normaliser 16 starts every channel with a slow decay (alpha ~ 0.96) so that information survives
long enough to learn from. Keys are half as wide as values by default (``expand_k = 0.5``), which
halves the state. The output of every head is RMS-normalised and gated by ``swish(g)`` before the
output projection: ``out(rms_norm_h(o) * w * swish(g))``.

The q, k, v, g and low-rank-gate projections share one matmul (same weights as fla's separate
projections, only faster).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config.schema import ModelConfig
from lmlab.errors import LmlabError
from lmlab.layers.base import TokenMixer
from lmlab.layers.common import check_core_options, head_dims
from lmlab.layers.norm import GatedRMSNorm
from lmlab.layers.registry import register_token_mixer
from lmlab.ops.gated_linear_attention import gated_linear_attention


@register_token_mixer("gla")
class GatedLinearAttention(TokenMixer):
    """Linear attention with a per-key-channel, data-dependent forget gate."""

    @dataclass
    class Options:
        expand_k: float = 0.5
        """Key width as a multiple of d_model (fla: 0.5)."""
        expand_v: float = 1.0
        """Value width as a multiple of d_model (fla: 1)."""
        gate_low_rank_dim: int = 16
        gate_normalizer: float = 16.0
        """``log_decay = logsigmoid(gate) / gate_normalizer``."""
        chunk_size: int = 64
        mode: str = "chunk"
        """``chunk`` (training) or ``recurrent`` (the core's step-by-step oracle)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, options: Options) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.key_dim = head_dims("gla", cfg.d_model, options.expand_k, cfg.n_heads, "expand_k")
        self.value_dim = head_dims("gla", cfg.d_model, options.expand_v, cfg.n_heads, "expand_v")
        if options.gate_low_rank_dim < 1 or options.gate_normalizer <= 0:
            raise LmlabError("gla: gate_low_rank_dim must be >= 1 and gate_normalizer > 0")
        self.gate_normalizer = options.gate_normalizer
        check_core_options("gla", options.mode, options.chunk_size)
        self.chunk_size = options.chunk_size
        self.mode = options.mode
        key_width, value_width = self.n_heads * self.key_dim, self.n_heads * self.value_dim
        self.splits = [key_width, key_width, value_width, value_width, options.gate_low_rank_dim]
        self.proj = nn.Linear(cfg.d_model, sum(self.splits), bias=False)
        self.gate_up = nn.Linear(options.gate_low_rank_dim, key_width, bias=True)
        self.norm = GatedRMSNorm(self.value_dim, eps=cfg.norm_eps)
        self.out = nn.Linear(value_width, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        batch, time, _ = x.shape
        q, k, v, g, gate = self.proj(x).split(self.splits, dim=-1)
        heads = (batch, time, self.n_heads, -1)
        gate = self.gate_up(gate)
        # The decay is accumulated over many steps: keep it in at least float32 under autocast.
        gate = gate.to(torch.promote_types(gate.dtype, torch.float32))
        log_decay = F.logsigmoid(gate) / self.gate_normalizer
        o, recurrent = gated_linear_attention(
            q.view(heads),
            k.view(heads),
            v.view(heads),
            log_decay.view(heads),
            initial_state=None if state is None else state["recurrent"],
            output_final_state=True,
            mode=self.mode,
            chunk_size=self.chunk_size,
        )
        o = self.norm(o, g.view(heads))
        return self.out(o.reshape(batch, time, -1)), {"recurrent": recurrent}

    def extra_flops_per_token(self, context: int) -> float:
        """State update and readout: two ``K x V`` products per head and token."""
        return 4.0 * self.n_heads * self.key_dim * self.value_dim
