"""RetNet multi-scale retention (Sun et al. 2023, "Retentive Network").

Each head h keeps a matrix state with a fixed, data-independent decay
``gamma_h = 1 - 2^(-5 - h)`` (the paper's multi-scale choice: head 0 forgets within ~32 tokens,
later heads ever more slowly):

    S_t = gamma_h * S_{t-1} + k_t v_t^T,    o_t = (K^-1/2) q_t^T S_t

with q and k rotated by their absolute position (the xPos rotation without its scaling, as in
the official torchscale code, which the decay already provides). The output of every head is
normalised on its own and gated: ``out(rms_norm_h(o) * w * swish(g))``.

Deviations, all as in fla's ``MultiScaleRetention``: the per-head GroupNorm is an RMSNorm with a
learned weight; the rotation is lmlab's RoPE (rotate-halves, ``theta`` from the config) rather
than torchscale's interleaved pairs; torchscale's per-row rescaling of the retention scores
(sum of the decay mask, clamp of |qk|) is left out, since the per-head norm divides any per-row
scale away. The decode state carries the position so the rotation continues where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmlab.config.schema import ModelConfig
from lmlab.errors import LmlabError
from lmlab.layers.base import TokenMixer
from lmlab.layers.common import check_core_options, head_dims
from lmlab.layers.norm import GatedRMSNorm
from lmlab.layers.position import Rotary
from lmlab.layers.registry import register_token_mixer
from lmlab.ops.gated_linear_attention import gated_linear_attention


@register_token_mixer("retnet")
class MultiScaleRetention(TokenMixer):
    """Retention with fixed per-head decays, rotary q/k and a swish-gated per-head norm."""

    @dataclass
    class Options:
        expand_k: float = 1.0
        """Key width as a multiple of d_model (paper and fla: 1)."""
        expand_v: float = 2.0
        """Value width as a multiple of d_model (paper and fla: 2)."""
        chunk_size: int = 64
        mode: str = "chunk"
        """``chunk`` (training) or ``recurrent`` (the core's step-by-step oracle)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, options: Options) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.key_dim = head_dims("retnet", cfg.d_model, options.expand_k, cfg.n_heads, "expand_k")
        self.value_dim = head_dims("retnet", cfg.d_model, options.expand_v, cfg.n_heads, "expand_v")
        if self.key_dim % 2:
            raise LmlabError(
                f"retnet: the per-head key size {self.key_dim} must be even for the rotation; "
                "change model.mixer_options.retnet.expand_k or model.n_heads"
            )
        check_core_options("retnet", options.mode, options.chunk_size)
        self.chunk_size = options.chunk_size
        self.mode = options.mode
        key_width, value_width = self.n_heads * self.key_dim, self.n_heads * self.value_dim
        self.splits = [key_width, key_width, value_width, value_width]
        self.proj = nn.Linear(cfg.d_model, sum(self.splits), bias=False)
        self.rotary = Rotary(self.key_dim, cfg.rope_theta)
        self.norm = GatedRMSNorm(self.value_dim, eps=cfg.norm_eps)
        self.out = nn.Linear(value_width, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        batch, time, _ = x.shape
        q, k, v, g = self.proj(x).split(self.splits, dim=-1)
        q = q.view(batch, time, self.n_heads, self.key_dim)
        k = k.view(batch, time, self.n_heads, self.key_dim)
        v = v.view(batch, time, self.n_heads, self.value_dim)
        position = 0 if state is None else state["position"]
        q, k = self.rotary(q, position), self.rotary(k, position)
        log_decay = self.log_gamma(x).expand(batch, time, self.n_heads)
        o, recurrent = gated_linear_attention(
            q,
            k,
            v,
            log_decay,
            initial_state=None if state is None else state["recurrent"],
            output_final_state=True,
            mode=self.mode,
            chunk_size=self.chunk_size,
        )
        o = self.norm(o, g.view(batch, time, self.n_heads, self.value_dim))
        y = self.out(o.reshape(batch, time, self.n_heads * self.value_dim))
        return y, {"recurrent": recurrent, "position": position + time}

    def log_gamma(self, x: torch.Tensor) -> torch.Tensor:
        """``log(1 - 2^(-5 - h))`` per head, in at least float32 (exact for float64 inputs)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        heads = torch.arange(self.n_heads, dtype=dtype, device=x.device)
        return torch.log1p(-torch.exp2(-5.0 - heads))

    def extra_flops_per_token(self, context: int) -> float:
        """State update and readout: two ``K x V`` products per head and token."""
        return 4.0 * self.n_heads * self.key_dim * self.value_dim
