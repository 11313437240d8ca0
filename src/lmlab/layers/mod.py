"""Mixture-of-Depths routing (Raposo et al. 2024): a block processes only some tokens.

A router gives every token a scalar logit ``r``. The tokens the block processes go through it
as one shorter sequence, in their original order; every other token skips the block through
the residual. A processed token's block output (its residual update) is multiplied by
``sigmoid(r)``, which is how the router gets a gradient from the language-model loss.

Training and inference route differently, because choosing by top-k looks at the future:

- training: each sequence's ``k = ceil(capacity * T)`` highest logits (expert-choice over the
  sequence, the paper's method). Every row routes the same ``k`` tokens, so the block runs
  batched, and a carried state (truncated BPTT) holds exactly those tokens.
- eval mode (evaluation, generation, one-token decode): a token is routed when ``r > 0``, a
  causal decision. The auxiliary loss ``aux_loss_coef * BCE(r, in the top-k)`` (the paper's
  "auxiliary loss" method) teaches the router to predict its own top-k choice at that threshold;
  ``pop_statistics`` reports how often it agrees. Rows then route different numbers of tokens,
  so each row runs the block on its own and keeps its own state (``{"rows": [...]}``): a prefill
  and then one token at a time therefore equals the full forward, for every mixer.

Deviation: the gate is ``sigmoid(r)`` rather than the paper's raw ``r`` (a raw logit near zero at
initialisation would switch the routed blocks off). Recurrent mixers inside a routed block see
the routed tokens as their sequence, and their state carries over the routed tokens only.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.layers.base import LayerHooks
from lmlab.layers.features import FeatureCounter, recording

Take = Callable[[torch.Tensor], torch.Tensor]
"""Gathers the routed positions out of any ``[B, T, ...]`` tensor (e.g. the token ids)."""
Inner = Callable[[torch.Tensor, object, Take], tuple[torch.Tensor, object]]
"""The block's residual update of the routed tokens: ``(h, state, take) -> (update, state)``."""


class DepthRouter(FeatureCounter, LayerHooks):
    """Routes ``capacity`` of each sequence's tokens through ``inner``; the others skip it."""

    feature = "mixture_of_depths"
    optimizer_hint = "adamw"
    """One logit per token, like a classifier's row: AdamW, not Muon."""

    def __init__(self, d_model: int, capacity: float, aux_loss_coef: float) -> None:
        super().__init__()
        self.capacity = capacity
        self.aux_loss_coef = aux_loss_coef
        self.score = nn.Linear(d_model, 1, bias=False)
        self._reset_statistics()

    def routed_count(self, time: int) -> int:
        """Tokens per sequence routed in training: ``ceil(capacity * time)``, at least one."""
        return min(time, max(1, math.ceil(self.capacity * time)))

    def forward(
        self, x: torch.Tensor, inner: Inner, state: dict | None = None
    ) -> tuple[torch.Tensor, dict]:
        # A discrete choice: keep the logits in float32 under autocast.
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.score.weight.float()).squeeze(-1)
        if self.training:
            return self._route_top_k(x, logits, inner, state)
        return self._route_threshold(x, logits, inner, state)

    def _route_top_k(
        self, x: torch.Tensor, logits: torch.Tensor, inner: Inner, state: dict | None
    ) -> tuple[torch.Tensor, dict]:
        if state is not None and "mixer" not in state:
            raise ValueError("a Mixture-of-Depths state from eval mode cannot continue in training")
        chosen = logits.topk(self.routed_count(x.shape[1]), dim=1).indices.sort(dim=1).values

        def take(t: torch.Tensor) -> torch.Tensor:
            index = chosen.view(*chosen.shape, *[1] * (t.dim() - 2))
            return t.gather(1, index.expand(-1, -1, *t.shape[2:]))

        update, mixer_state = inner(take(x), None if state is None else state["mixer"], take)
        gate = torch.sigmoid(logits.gather(1, chosen))[..., None]
        index = chosen[..., None].expand(-1, -1, x.shape[-1])
        y = x.scatter_add(1, index, (update * gate.to(update.dtype)).to(x.dtype))
        targets = torch.zeros_like(logits).scatter(1, chosen, 1.0)
        loss = F.binary_cross_entropy_with_logits(logits, targets)
        if recording():  # once per forward, also under activation checkpointing
            self.aux_loss = self.aux_loss_coef * loss if self.aux_loss_coef > 0 else None
            with torch.no_grad():
                predicted = logits > 0
                self._tokens += logits.numel()
                self._routed += chosen.numel()
                self._agree = self._agree + (predicted == targets.bool()).sum()
                self._predicted = self._predicted + predicted.sum()
                self._gate = self._gate + gate.sum()
                self._loss = self._loss + loss.detach()
                self._forwards += 1
        self.count_call(chosen.numel())
        return y, {"mixer": mixer_state}

    def _route_threshold(
        self, x: torch.Tensor, logits: torch.Tensor, inner: Inner, state: dict | None
    ) -> tuple[torch.Tensor, dict]:
        if state is not None and "rows" not in state:
            raise ValueError("a Mixture-of-Depths training state cannot continue in eval mode")
        if recording():
            self.aux_loss = None
        rows = state["rows"] if state is not None else [None] * x.shape[0]
        outputs, states = [], []
        for row, (row_logits, row_state) in enumerate(zip(logits, rows, strict=True)):
            index = (row_logits > 0).nonzero().squeeze(-1)
            if not index.numel():
                outputs.append(x[row])
                states.append(row_state)
                continue

            def take(t: torch.Tensor, row: int = row, index: torch.Tensor = index) -> torch.Tensor:
                return t[row : row + 1, index]

            update, row_state = inner(take(x), row_state, take)
            gate = torch.sigmoid(row_logits[index])[:, None]
            outputs.append(x[row].index_add(0, index, (update[0] * gate).to(x.dtype)))
            states.append(row_state)
        return torch.stack(outputs), {"rows": states}

    def _reset_statistics(self) -> None:
        self._agree: torch.Tensor | int = 0
        self._predicted: torch.Tensor | int = 0
        self._gate: torch.Tensor | float = 0.0
        self._loss: torch.Tensor | float = 0.0
        self._tokens = self._routed = self._forwards = 0

    def pop_statistics(self) -> dict:
        """Training forwards since the last call, then reset: the fraction routed (top-k), the
        fraction the eval-mode threshold would route, how often the threshold agrees with the
        top-k (predictor accuracy), the mean gate of routed tokens and the raw BCE."""
        if not self._forwards:
            return {}
        stats = {
            "tokens": self._tokens,
            "routed_fraction": self._routed / self._tokens,
            "threshold_fraction": float(self._predicted) / self._tokens,
            "predictor_accuracy": float(self._agree) / self._tokens,
            "mean_gate": float(self._gate) / self._routed,
            "router_bce": float(self._loss) / self._forwards,
        }
        self._reset_statistics()
        return stats
