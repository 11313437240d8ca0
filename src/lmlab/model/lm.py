"""The decoder-only language model: embedding, a stack of pre-norm blocks, norm, head.

Each block is ``x + token_mixer(norm(x))`` then ``x + channel_mixer(norm(x))``; which token mixer a
layer uses comes from the config's mixer or layer pattern through the registry, so adding a mixer
never touches this file.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmlab.config.schema import ModelConfig
from lmlab.layers.bitlinear import convert_to_bitlinear
from lmlab.layers.registry import build_channel_mixer, build_token_mixer
from lmlab.model.cache import ModelState


class Block(nn.Module):
    """One pre-norm residual block (RMSNorm)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, mixer: str) -> None:
        super().__init__()
        self.mixer_name = mixer
        self.mixer_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = build_token_mixer(mixer, cfg, layer_idx)
        self.channel_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.channel = build_channel_mixer(cfg.channel_mixer, cfg, layer_idx)
        if cfg.bitlinear:
            convert_to_bitlinear(self)

    def forward(self, x: torch.Tensor, state: object = None) -> tuple[torch.Tensor, object]:
        y, state = self.mixer(self.mixer_norm(x), state)
        x = x + y
        return x + self.channel(self.channel_norm(x)), state


class LanguageModel(nn.Module):
    """``forward(idx [B, T], state=None) -> (logits [B, T, V], state)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) first")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(
            Block(cfg, i, name) for i, name in enumerate(cfg.layer_mixers())
        )
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        # Modules that want the input token ids (e.g. MoE specialisation statistics) declare
        # ``wants_token_ids = True`` and get them through ``set_token_ids`` before each forward.
        self._token_id_consumers = [
            m for m in self.modules() if getattr(m, "wants_token_ids", False)
        ]

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual output projections (named ``out``) scaled by
        1/sqrt(2 * n_layers) so the residual stream's variance does not grow with depth (GPT-2).
        Mixers that need their own initialisation (decay rates, gates) do it in their
        ``reset_parameters``, called last."""
        std = self.cfg.init_std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(".out") else 1.0
                nn.init.normal_(module.weight, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
        for block in self.blocks:
            for module in (block.mixer, block.channel):
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()

    def forward(
        self, idx: torch.Tensor, state: ModelState | None = None
    ) -> tuple[torch.Tensor, ModelState]:
        for module in self._token_id_consumers:
            module.set_token_ids(idx)
        x = self.embed(idx)
        previous = state.layers if state is not None else [None] * len(self.blocks)
        layer_states = []
        for block, layer_state in zip(self.blocks, previous, strict=True):
            x, layer_state = block(x, layer_state)
            layer_states.append(layer_state)
        position = (state.position if state is not None else 0) + idx.shape[1]
        return self.head(self.norm(x)), ModelState(layer_states, position)

    def auxiliary_loss(self) -> torch.Tensor | None:
        """Sum of the auxiliary losses (e.g. MoE load balancing) that modules stored as
        ``aux_loss`` during the last forward; None when no module has one."""
        losses = [m.aux_loss for m in self.modules() if getattr(m, "aux_loss", None) is not None]
        return torch.stack([loss.float() for loss in losses]).sum() if losses else None

    def pop_statistics(self) -> dict[str, dict]:
        """Per-module statistics gathered since the last call (router loads, tokens dropped...),
        from every module with a ``pop_statistics()`` method, keyed by module path."""
        return {
            name: module.pop_statistics()
            for name, module in self.named_modules()
            if module is not self and hasattr(module, "pop_statistics")
        }

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Unique parameters (tied weights counted once); optionally without the embedding."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.embed.weight.numel()
        return total

    def flops_per_token(self, context: int) -> float:
        """Forward FLOPs per token: 2 per weight of every matmul (the head included, the
        embedding lookup not) plus each module's correction ``extra_flops_per_token(context)``
        (attention scores; a MoE's experts that do not run, which is negative)."""
        matmul = sum(2 * m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        extra = sum(
            m.extra_flops_per_token(context)
            for m in self.modules()
            if hasattr(m, "extra_flops_per_token")
        )
        return float(matmul + extra)
