"""Channel mixers: the SwiGLU MLP (Shazeer 2020), and ``none`` for layers that carry their own
MLP inside the token mixer (BDH's encoder/decoder pair)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config.schema import ModelConfig
from lmlab.layers.base import ChannelMixer
from lmlab.layers.registry import register_channel_mixer


@register_channel_mixer("swiglu")
class SwiGLU(ChannelMixer):
    """``down(silu(gate(x)) * up(x))``; gate and up share one matmul."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, options: object) -> None:
        super().__init__()
        hidden = cfg.resolved_mlp_hidden
        self.gate_up = nn.Linear(cfg.d_model, 2 * hidden, bias=False)
        self.out = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.out(F.silu(gate) * up)

    def extra_flops_per_token(self, context: int) -> float:
        """Nothing beyond its two matmuls (the activation and product are O(hidden))."""
        return 0.0


@register_channel_mixer("none")
class NoChannelMixer(ChannelMixer):
    """Adds nothing: the block reduces to ``x + token_mixer(norm(x))`` and skips this module and
    the channel norm altogether (``Block``); called directly, it returns zeros."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, options: object) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

    def extra_flops_per_token(self, context: int) -> float:
        """No computation at all."""
        return 0.0
