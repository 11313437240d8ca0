"""Modern Hopfield retrieval as a token mixer (Ramsauer et al. 2021, the ``Hopfield`` layer).

Each head stores patterns and retrieves from them with the update of ``ops.hopfield``:
``steps`` updates ``xi <- K^T softmax(beta K xi)`` of the token's state pattern ``xi = W_q x``
against the stored keys ``K``, the last one reading out the stored values ``V`` instead.
The store holds

- ``slots`` learned patterns (key and value per slot and head): a persistent associative
  memory, the same for every position (the paper's ``HopfieldLayer`` with a learned lookup);
- with ``context``, the patterns ``W_k x_j, W_v x_j`` of the sequence's tokens ``j <= i`` (the
  paper's ``Hopfield`` over the sequence), causal by a mask; ``window > 0`` keeps only the
  last ``window`` tokens.

The decode state is the past tokens' keys and values (the last ``window - 1`` with a window)
and the absolute position, so prefill + decode equals the full forward. With ``steps = 1``,
no slots and ``beta = 1/sqrt(head size)`` this is causal softmax attention without positions
(the paper's observation); ``steps > 1`` iterates the retrieval in key space first, and
``beta`` sets how sharply one stored pattern is picked. No rotary positions: the causal mask
alone tells order, as in NoPE transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lmlab.config.schema import ModelConfig
from lmlab.errors import LmlabError
from lmlab.layers.base import TokenMixer
from lmlab.layers.registry import register_token_mixer
from lmlab.ops.hopfield import hopfield_retrieve


@register_token_mixer("hopfield")
class HopfieldMixer(TokenMixer):
    """Modern Hopfield retrieval from learned slots and the past tokens (causal, cached)."""

    @dataclass
    class Options:
        slots: int = 32
        """Learned stored patterns per head (0: none)."""
        context: bool = True
        """Also store every past token's pattern (causal); false: the learned slots only."""
        window: int = 0
        """With ``context``: store only the last ``window`` tokens (0: all), bounding the state."""
        beta: float = 0.0
        """Inverse temperature; 0 takes 1/sqrt(head size), the paper's choice."""
        steps: int = 1
        """Hopfield updates per token; the last one reads out the values."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, options: Options) -> None:
        super().__init__()
        where = "model.mixer_options.hopfield"
        if min(options.slots, options.window) < 0 or options.steps < 1 or options.beta < 0:
            raise LmlabError(f"{where}: slots, window and beta must be >= 0 and steps >= 1")
        if options.slots == 0 and not options.context:
            raise LmlabError(
                f"{where}: slots=0 with context=false leaves nothing to retrieve; set slots > 0 "
                "or context=true"
            )
        if options.window and not options.context:
            raise LmlabError(f"{where}: window needs context=true (it limits the stored tokens)")
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.resolved_head_dim
        self.slots, self.context, self.window = options.slots, options.context, options.window
        self.steps = options.steps
        self.beta = options.beta or 1 / math.sqrt(self.head_dim)
        self.cache_grows_with_context = options.context and not options.window
        width = self.n_heads * self.head_dim
        self.proj = nn.Linear(cfg.d_model, 3 * width if options.context else width, bias=False)
        self.slot_keys = nn.Parameter(torch.empty(self.n_heads, options.slots, self.head_dim))
        self.slot_values = nn.Parameter(torch.empty(self.n_heads, options.slots, self.head_dim))
        self.out = nn.Linear(width, cfg.d_model, bias=False)
        self.init_std = cfg.init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Slot keys at unit scale per component, so that ``beta q.k`` starts in the softmax's
        useful range like the projected keys; slot values at the model's init scale."""
        nn.init.normal_(self.slot_keys, std=1.0)
        nn.init.normal_(self.slot_values, std=self.init_std)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        batch, time, _ = t.shape
        return t.view(batch, time, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        batch, time, _ = x.shape
        position = 0 if state is None else state["position"]
        parts = [self._heads(p) for p in self.proj(x).chunk(3 if self.context else 1, dim=-1)]
        query = parts[0]
        keys = [self.slot_keys.to(x.dtype).expand(batch, -1, -1, -1)]
        values = [self.slot_values.to(x.dtype).expand(batch, -1, -1, -1)]
        masks = [torch.ones(time, self.slots, dtype=torch.bool, device=x.device)]
        new_state: dict = {"position": position + time}
        if self.context:
            past_keys, past_values = (
                (state["keys"], state["values"]) if state is not None else (parts[1][:, :, :0],) * 2
            )
            token_keys = torch.cat([past_keys, parts[1]], dim=2)
            token_values = torch.cat([past_values, parts[2]], dim=2)
            keys.append(token_keys)
            values.append(token_values)
            masks.append(self._causal_mask(time, token_keys.shape[2], position, x.device))
            stored = token_keys.shape[2]
            keep = stored - min(self.window - 1, stored) if self.window else 0
            new_state |= {"keys": token_keys[:, :, keep:], "values": token_values[:, :, keep:]}
        y = hopfield_retrieve(
            query,
            torch.cat(keys, dim=2),
            self.beta,
            steps=self.steps,
            values=torch.cat(values, dim=2),
            mask=torch.cat(masks, dim=1),
        )
        y = y.transpose(1, 2).reshape(batch, time, self.n_heads * self.head_dim)
        return self.out(y), new_state

    def _causal_mask(
        self, time: int, stored: int, position: int, device: torch.device
    ) -> torch.Tensor:
        """``[time, stored]``: query ``position + i`` sees stored token positions up to its own
        (the last ``window`` of them with a window)."""
        query_pos = position + torch.arange(time, device=device)[:, None]
        key_pos = position + time - stored + torch.arange(stored, device=device)[None, :]
        visible = key_pos <= query_pos
        if self.window:
            visible &= query_pos - key_pos < self.window
        return visible

    def extra_flops_per_token(self, context: int) -> float:
        """Scores and readout against every stored pattern, per update step."""
        stored = self.slots + (min(context, self.window or context) if self.context else 0)
        return 4.0 * self.steps * self.n_heads * self.head_dim * stored
