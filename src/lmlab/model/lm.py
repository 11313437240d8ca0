"""The decoder-only language model: embedding, a stack of pre-norm blocks, norm, head.

Each block is ``x + token_mixer(norm(x))`` then ``x + channel_mixer(norm(x))``; which token mixer a
layer uses comes from the config's mixer, layer pattern or layer overrides through the registry,
so adding a mixer never touches this file. A block with a Mixture-of-Depths capacity applies
that update to the tokens its router picks only (``layers/mod.py``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmlab.config.schema import ModelConfig
from lmlab.layers.base import Decode, LayerHooks, Mixer
from lmlab.layers.bitlinear import convert_to_bitlinear
from lmlab.layers.features import feature_counters, feature_modules, replaying
from lmlab.layers.mlp import NoChannelMixer
from lmlab.layers.mod import DepthRouter, Take
from lmlab.layers.registry import build_channel_mixer, build_token_mixer
from lmlab.model.cache import ModelState


def token_id_consumers(module: nn.Module) -> list[nn.Module]:
    """The outermost submodules declaring ``wants_token_ids`` (a routed block claims those
    inside it, to hand them the routed tokens' ids)."""
    found = []
    for child in module.children():
        if isinstance(child, LayerHooks) and child.wants_token_ids:
            found.append(child)
        else:
            found.extend(token_id_consumers(child))
    return found


def module_flops(module: nn.Module, context: int) -> float:
    """Forward FLOPs per token of ``module``: 2 per weight of each ``nn.Linear`` in it plus each
    mixer's correction ``extra_flops_per_token(context)`` (attention scores; a MoE's experts
    that do not run, which is negative), which every mixer must declare."""
    matmul = sum(2 * m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))
    extra = sum(m.extra_flops_per_token(context) for m in module.modules() if isinstance(m, Mixer))
    return float(matmul + extra)


class Block(LayerHooks):
    """One pre-norm residual block (RMSNorm), optionally routed (Mixture-of-Depths) and
    optionally recomputed in backward (activation checkpointing)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.mixer_name = cfg.mixer
        self.mixer_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = build_token_mixer(cfg.mixer, cfg, layer_idx)
        self.channel = build_channel_mixer(cfg.channel_mixer, cfg, layer_idx)
        # Without a channel mixer (``none``) the block is the token mixer's update alone: no
        # idle norm to compute (and train) for an output that is discarded.
        adds_nothing = isinstance(self.channel, NoChannelMixer)
        self.channel_norm = None if adds_nothing else nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        if cfg.bitlinear:
            convert_to_bitlinear(self)
        self.router = (
            DepthRouter(cfg.d_model, cfg.mod_capacity, cfg.mod_aux_loss_coef)
            if cfg.mod_capacity > 0
            else None
        )
        self.checkpointing = False
        self._inner_consumers = token_id_consumers(self) if self.router is not None else []
        self.wants_token_ids = bool(self._inner_consumers)
        self._token_ids: torch.Tensor | None = None

    def set_token_ids(self, idx: torch.Tensor) -> None:
        """Token ids of the next forward; the routed ones go to the consumers inside."""
        self._token_ids = idx

    def forward(self, x: torch.Tensor, state: object = None) -> tuple[torch.Tensor, object]:
        if not (self.checkpointing and self.training and torch.is_grad_enabled()):
            return self._forward(x, state)
        calls = 0

        def run(x: torch.Tensor, state: object) -> tuple[torch.Tensor, object]:
            nonlocal calls
            calls += 1
            if calls == 1:
                return self._forward(x, state)
            with replaying():  # the backward's recomputation: record statistics only once
                return self._forward(x, state)

        return checkpoint(run, x, state, use_reentrant=False)

    def _forward(self, x: torch.Tensor, state: object) -> tuple[torch.Tensor, object]:
        if self.router is not None:
            return self.router(x, self._update, state)
        update, state = self._update(x, state)
        return x + update, state

    def _update(
        self, h: torch.Tensor, state: object, take: Take | None = None
    ) -> tuple[torch.Tensor, object]:
        """The block's residual update ``mixer + channel`` of the tokens ``h``."""
        if take is not None and self._token_ids is not None:
            ids = take(self._token_ids)
            for module in self._inner_consumers:
                module.set_token_ids(ids)
        y, state = self.mixer(self.mixer_norm(h), state)
        if self.channel_norm is None:
            return y, state
        return y + self.channel(self.channel_norm(h + y)), state

    def flops_per_token(self, context: int) -> float:
        """Forward FLOPs per token (see :func:`module_flops`); a routed block runs its mixers on
        ``capacity`` of the tokens, over a context shrunk by the same fraction."""
        if self.router is None:
            return module_flops(self, context)
        capacity = self.router.capacity
        router = module_flops(self.router, context)
        routed_context = max(1, math.ceil(capacity * context))
        return router + capacity * (module_flops(self, routed_context) - router)


class LanguageModel(nn.Module):
    """``forward(idx [B, T], state=None) -> (logits [B, T, V], state)``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (from the tokenizer) first")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(layer, i) for i, layer in enumerate(cfg.layer_configs()))
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        # The modules behind the hooks of ``lmlab.layers.base.LayerHooks``, found once.
        self._token_id_consumers = token_id_consumers(self)
        self._hooked = [(n, m) for n, m in self.named_modules() if isinstance(m, LayerHooks)]
        self._feature_modules = feature_modules(self)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in backward instead of keeping them (training
        only): less memory for about one more forward of compute."""
        for block in self.blocks:
            block.checkpointing = enabled

    def reset_parameters(self) -> None:
        """Normal(0, init_std) weights; residual output projections (named ``out``) scaled by
        1/sqrt(2 * n_layers) so the residual stream's variance does not grow with depth (GPT-2).
        Then each mixer's own ``reset_parameters`` (decay rates, gates; a no-op by default)."""
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
            block.mixer.reset_parameters()
            block.channel.reset_parameters()

    def forward(
        self, idx: torch.Tensor, state: ModelState | None = None, n_layers: int | None = None
    ) -> tuple[torch.Tensor, ModelState]:
        hidden, state = self.features(idx, state, n_layers)
        return self.head(hidden), state

    def features(
        self, idx: torch.Tensor, state: ModelState | None = None, n_layers: int | None = None
    ) -> tuple[torch.Tensor, ModelState]:
        """The final normalised hidden states ``[B, T, d_model]`` that ``head`` turns into
        logits: a caller scored at a few positions (the probes) applies ``head`` to those only,
        which saves most of the head's matmul and softmax when the vocabulary is large.

        ``n_layers``: run only the first blocks, then the final norm (an early exit, which
        self-speculative decoding drafts with); the state then holds those blocks' entries."""
        for module in self._token_id_consumers:
            module.set_token_ids(idx)
        x = self.embed(idx)
        blocks = self.blocks if n_layers is None else self.blocks[:n_layers]
        previous = state.layers if state is not None else [None] * len(blocks)
        layer_states = []
        for block, layer_state in zip(blocks, previous, strict=True):
            x, layer_state = block(x, layer_state)
            layer_states.append(layer_state)
        position = (state.position if state is not None else 0) + idx.shape[1]
        return self.norm(x), ModelState(layer_states, position)

    def rewind(
        self, before: ModelState | None, after: ModelState, tokens: torch.Tensor, keep: int
    ) -> ModelState:
        """The state after only the first ``keep`` of ``tokens [B, T]``, given the states
        before and after the forward over all of them (speculative decoding: forget the
        rejected drafted tokens).

        Exact for every mixer, cheap where it can be: when every layer's mixer can cut its
        state (``TokenMixer.truncate_state``: attention caches) and no block is routed
        (Mixture-of-Depths states hold the routed tokens only), the caches are cut at no cost;
        otherwise (recurrent and convolution states, which fold tokens in) the kept tokens run
        again from ``before``, one forward of ``keep`` tokens. That relies on the contract that
        a forward never changes the state it was given (attention appends past its ``length``
        only), so ``before`` is still valid after the verification."""
        drop = tokens.shape[1] - keep
        if not 0 <= drop <= tokens.shape[1]:
            raise ValueError(f"keep={keep} must be in [0, {tokens.shape[1]}]")
        if drop == 0:
            return after
        if all(block.router is None for block in self.blocks):
            cut = [
                block.mixer.truncate_state(layer_state, drop)
                for block, layer_state in zip(self.blocks, after.layers, strict=True)
            ]
            if all(layer_state is not None for layer_state in cut):
                return ModelState(cut, after.position - drop)
        if keep == 0 and before is None:
            return ModelState([None] * len(self.blocks), 0)
        if keep == 0:
            return before
        return self(tokens[:, :keep], before)[1]

    def auxiliary_loss(self) -> torch.Tensor | None:
        """Sum of the auxiliary losses (e.g. MoE load balancing) that modules stored as
        ``aux_loss`` during the last forward; None when no module has one."""
        losses = [m.aux_loss for _, m in self._hooked if m.aux_loss is not None]
        return torch.stack([loss.float() for loss in losses]).sum() if losses else None

    def pop_statistics(self) -> dict[str, dict]:
        """Per-module statistics gathered since the last call (router loads, tokens dropped...),
        keyed by module path; modules with nothing to report are left out."""
        popped = ((name, module.pop_statistics()) for name, module in self._hooked)
        return {name: stats for name, stats in popped if stats}

    def on_training_end(self, run_dir: Path, decode: Decode | None = None) -> None:
        """Let every module write what it gathered over the training into ``run_dir`` (e.g. the
        MoE specialisation table); the trainer calls it once, when the budget is spent."""
        for name, module in self._hooked:
            module.on_training_end(run_dir, name, decode)

    def feature_counters(self) -> dict[str, int]:
        """Integrity counters: calls per optional feature so far (``layers/features.py``)."""
        return feature_counters(self._feature_modules)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Unique parameters (tied weights counted once); optionally without the embedding."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.embed.weight.numel()
        return total

    def flops_per_token(self, context: int) -> float:
        """Forward FLOPs per token: 2 per weight of every matmul (the head included, the
        embedding lookup not) plus each module's correction ``extra_flops_per_token(context)``
        (attention scores; a MoE's experts that do not run, which is negative); routed blocks
        count their share of the tokens (:meth:`Block.flops_per_token`)."""
        blocks = sum(block.flops_per_token(context) for block in self.blocks)
        return blocks + module_flops(self.head, context)
