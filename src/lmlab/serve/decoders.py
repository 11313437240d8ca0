"""The server's other :class:`~lmlab.serve.scheduler.Decoder` steps: speculative decoding
(``serve --draft``) and a kNN-LM retrieval memory mixed into every next-token distribution
(``serve --memory``). Each reuses the library's own code (``lmlab.model.speculative``'s rounds,
``lmlab.memory.knn``'s hook) so the server decodes what ``lmlab generate`` does."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lmlab.model.cache import ModelState
from lmlab.model.generate import LogitsHook
from lmlab.model.lm import LanguageModel
from lmlab.model.speculative import (
    Draft,
    SpeculativeCursor,
    SpeculativeStats,
    check_draft,
    speculative_round,
)
from lmlab.serve.scheduler import Decoder, Sampler


class HookDecoder(Decoder):
    """Plain decoding whose next-token logits pass through a ``logits_hook`` first, as in
    ``stream_tokens``: the hook sees the final hidden state and the head's logits of each
    row's last position. Rows still decode together."""

    def __init__(self, model: LanguageModel, hook: LogitsHook) -> None:
        super().__init__(model)
        self.hook = hook

    def _last_logits(
        self, ids: torch.Tensor, state: ModelState | None
    ) -> tuple[torch.Tensor, ModelState]:
        hidden, state = self.model.features(ids, state)
        last = hidden[:, -1]
        return self.hook(last, self.model.head(last)), state

    def prefill(
        self, ids: torch.Tensor, state: ModelState | None
    ) -> tuple[torch.Tensor, ModelState]:
        return self._last_logits(ids, state)

    def step(
        self, last: torch.Tensor, state: ModelState, samplers: list[Sampler]
    ) -> tuple[list[list[int]], ModelState]:
        rows, state = self._last_logits(last, state)
        return [[sampler.sample(rows[i])] for i, sampler in enumerate(samplers)], state


@dataclass
class SpeculativeState(ModelState):
    """The target's state (``layers``, ``position``: what the scheduler sees) plus the
    draft's: its state and the drafted token it has not consumed yet, if any."""

    draft: ModelState | None = None
    draft_behind: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    """The row's generator on the model's device (its sampler's own on the CPU)."""


class SpeculativeDecoder(Decoder):
    """Speculative decoding one row at a time (``batched`` is False: each row accepts a
    different number of tokens per round, so rows do not share forwards): each step is one
    round of :func:`lmlab.model.speculative.speculative_round` with the row's own sampling
    settings and generator, returning the accepted drafts and the target's next token."""

    batched = False

    def __init__(
        self,
        model: LanguageModel,
        draft: Draft,
        draft_tokens: int = 4,
        draft_confidence: float = 0.0,
    ) -> None:
        check_draft(model, draft, draft_tokens, draft_confidence)
        super().__init__(model)
        self.draft = draft
        self.draft_tokens = draft_tokens
        self.draft_confidence = draft_confidence
        self.stats = SpeculativeStats()

    def prefill(
        self, ids: torch.Tensor, state: ModelState | None
    ) -> tuple[torch.Tensor, ModelState]:
        logits, target = self.model(ids, state)
        _, draft = self.draft(ids, state.draft if isinstance(state, SpeculativeState) else None)
        return logits[:, -1], SpeculativeState(target.layers, target.position, draft)

    def step(
        self, last: torch.Tensor, state: ModelState, samplers: list[Sampler]
    ) -> tuple[list[list[int]], ModelState]:
        if not isinstance(state, SpeculativeState) or len(samplers) != 1:
            raise ValueError("speculative decoding takes one row prefilled by this decoder")
        sampler = samplers[0]
        generator = state.generator or device_generator(sampler, last.device)
        behind = last.new_tensor([state.draft_behind]).view(1, -1)
        target = ModelState(state.layers, state.position)
        cursor = SpeculativeCursor(target, state.draft, last, torch.cat([behind, last], 1))
        tokens, cursor = speculative_round(
            self.model,
            self.draft,
            cursor,
            self.draft_tokens,
            sampler.settings,
            generator,
            self.stats,
            self.draft_confidence,
        )
        self.stats.emitted += len(tokens)
        target = cursor.target_state or ModelState()  # never None: the round consumed a token
        behind_now = [int(token) for token in cursor.draft_pending[0, :-1]]
        return [tokens], SpeculativeState(
            target.layers, target.position, cursor.draft_state, behind_now, generator
        )


def device_generator(sampler: Sampler, device: torch.device) -> torch.Generator:
    """The sampler's generator where the model runs: its own on the CPU, else one on
    ``device`` seeded alike (the rounds draw on the device the probabilities live on)."""
    if device.type == "cpu":
        return sampler.generator
    return torch.Generator(device=device).manual_seed(sampler.generator.initial_seed())
