"""Mixture-of-head attention (MoH, Jin et al. 2024, SkyworkAI/MoH).

Heads are experts: ``n_shared`` heads are always on, and each token picks ``top_k`` of the
remaining routed heads. The output is a gated sum of head outputs instead of a plain sum:

    y_t = sum_i g_{t,i} H_{t,i} W_O^i
    g_shared = a_1 * n_shared * softmax(W_s x_t)                       (every shared head)
    g_routed = a_2 * n_routed * topk(softmax(W_r x_t))                  (zero off the top-k)
    [a_1, a_2] = softmax(W_h x_t)

(the head counts keep each gate near 1, as the official code does). Load balancing over the
routed heads: ``aux = balance_coef * n_routed * sum_i f_i P_i`` (``f_i`` the fraction of the
top-k slots given to head i, ``P_i`` its mean router probability), stored as ``aux_loss``.
Deviation: every head is computed and unselected ones are multiplied by zero (no kernel that
skips heads on CPU), so this measures MoH's quality, not its speed. Positions, sliding window
and the KV cache are the ``attention`` mixer's (this class extends it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmlab.config.schema import ModelConfig
from lmlab.errors import LmlabError
from lmlab.layers.attention import Attention, KVState
from lmlab.layers.base import LayerHooks
from lmlab.layers.features import FeatureCounter, recording
from lmlab.layers.registry import register_token_mixer


class HeadRouter(FeatureCounter, LayerHooks):
    """Per-token head gates ``[B, T, H]`` (shared heads first), with load statistics."""

    feature = "mixture_of_heads"
    optimizer_hint = "adamw"
    """Its rows are per-head logits: AdamW, not Muon (see ``lmlab.train.optim``)."""

    def __init__(self, d_model: int, n_heads: int, n_shared: int, top_k: int, coef: float) -> None:
        super().__init__()
        self.n_shared, self.n_routed, self.top_k, self.coef = (
            n_shared,
            n_heads - n_shared,
            top_k,
            coef,
        )
        self.shared = nn.Linear(d_model, n_shared, bias=False) if n_shared else None
        self.routed = nn.Linear(d_model, self.n_routed, bias=False)
        self.mix = nn.Linear(d_model, 2, bias=False) if n_shared else None
        self.load = torch.zeros(self.n_routed)
        self.tokens = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.routed(x).float().softmax(-1)
        top = probs.topk(self.top_k, dim=-1).indices
        chosen = torch.zeros_like(probs).scatter(-1, top, 1.0)
        gates = probs * chosen * self.n_routed
        if self.shared is not None:
            mix = self.mix(x).float().softmax(-1)
            shared = self.shared(x).float().softmax(-1) * self.n_shared
            gates = torch.cat([mix[..., :1] * shared, mix[..., 1:] * gates], -1)
        aux_loss = None
        if self.training:
            self.count_call()
            fraction = chosen.flatten(0, -2).mean(0) / self.top_k
            balance = self.n_routed * (fraction * probs.flatten(0, -2).mean(0)).sum()
            aux_loss = self.coef * balance
            if recording():
                self.load = self.load + chosen.detach().flatten(0, -2).sum(0).cpu()
                self.tokens += chosen.shape[:-1].numel()
        if recording():  # not in a recomputed forward (activation checkpointing)
            self.aux_loss = aux_loss
        return gates.to(x.dtype)

    def pop_statistics(self) -> dict:
        """Routed-head load since the last call: each head's share of the top-k slots (1/n_routed
        each when balanced) and its coefficient of variation."""
        share = self.load / max(self.tokens * self.top_k, 1)
        stats = {
            "head_load": share.tolist(),
            "load_cv": float(share.std(unbiased=False) / share.mean().clamp_min(1e-12)),
            "tokens": self.tokens,
        }
        self.load, self.tokens = torch.zeros(self.n_routed), 0
        return stats


@register_token_mixer("moh")
class MixtureOfHeadsAttention(Attention):
    """Attention whose heads are gated per token by a :class:`HeadRouter`."""

    @dataclass
    class Options(Attention.Options):
        n_shared: int = -1
        """Always-active heads; -1 means a quarter of the heads."""
        top_k: int = 0
        """Routed heads per token; 0 means half of the routed heads."""
        balance_coef: float = 0.01

    def __init__(self, cfg: ModelConfig, layer_idx: int, options: Options) -> None:
        super().__init__(cfg, layer_idx, options)
        n_shared = cfg.n_heads // 4 if options.n_shared < 0 else options.n_shared
        top_k = options.top_k or max((cfg.n_heads - n_shared) // 2, 1)
        if not 0 <= n_shared < cfg.n_heads or not 0 < top_k <= cfg.n_heads - n_shared:
            raise LmlabError(
                f"model.mixer_options.moh: need 0 <= n_shared < n_heads={cfg.n_heads} and "
                f"1 <= top_k <= n_heads - n_shared; got n_shared={n_shared}, top_k={top_k}"
            )
        self.router = HeadRouter(cfg.d_model, cfg.n_heads, n_shared, top_k, options.balance_coef)

    def forward(
        self, x: torch.Tensor, state: KVState | None = None
    ) -> tuple[torch.Tensor, KVState]:
        y, state = self.attend(x, state)
        y = y * self.router(x)[..., None]
        return self.out(y.flatten(2)), state
