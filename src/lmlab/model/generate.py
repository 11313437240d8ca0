"""Sampling with the state cache: one prefill, then one token per step."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from lmlab.model.cache import ModelState
from lmlab.model.lm import LanguageModel

LogitsHook = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(hidden [B, d_model], logits [B, V]) -> logits [B, V]`` of the next token, applied before
sampling: how a retrieval memory (``lmlab.memory.knn.knn_hook``) mixes its distribution in."""


@dataclass
class SamplingSettings:
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    """0 < top_p <= 1: keep the smallest set of tokens whose probability reaches top_p."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely one."""

    def validate(self) -> None:
        from lmlab.errors import ParamError

        if not 0 <= self.temperature < math.inf:
            raise ParamError(
                f"<temperature>={self.temperature} must be finite and >= 0 (0 is greedy)",
                "temperature",
            )
        if self.top_k < 0:
            raise ParamError(f"<top_k>={self.top_k} must be >= 0 (0 disables it)", "top_k")
        if not 0 < self.top_p <= 1:
            raise ParamError(f"<top_p>={self.top_p} must be in (0, 1]", "top_p")
        if not 0 <= self.min_p < 1:
            raise ParamError(f"<min_p>={self.min_p} must be in [0, 1)", "min_p")


def filter_logits(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """Logits ``[B, V]`` with the tokens excluded by top-k, top-p and min-p set to -inf."""
    logits = logits / settings.temperature
    if settings.top_k:
        kth = torch.topk(logits, min(settings.top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.min_p:
        probs = logits.softmax(-1)
        floor = settings.min_p * probs.max(-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    if settings.top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= settings.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator
) -> torch.Tensor:
    """Next token ids ``[B, 1]`` from the last position's logits ``[B, V]``."""
    if settings.temperature == 0:
        return logits.argmax(-1, keepdim=True)
    probs = filter_logits(logits.float(), settings).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def stream_tokens(
    model: LanguageModel,
    prompt: torch.Tensor,
    max_new_tokens: int,
    settings: SamplingSettings,
    seed: int = 0,
    logits_hook: LogitsHook | None = None,
) -> Iterator[torch.Tensor]:
    """Yield ``[B, 1]`` new tokens one at a time after a single prefill of ``prompt [B, T]``;
    the head reads the last position only."""
    generator = torch.Generator(device=prompt.device).manual_seed(seed)
    hidden, state = model.features(prompt)
    for _ in range(max_new_tokens):
        last = hidden[:, -1]
        logits = model.head(last)
        if logits_hook is not None:
            logits = logits_hook(last, logits)
        token = sample_next(logits, settings, generator)
        yield token
        hidden, state = model.features(token, state)


def generate(
    model: LanguageModel,
    prompt: torch.Tensor,
    max_new_tokens: int,
    settings: SamplingSettings | None = None,
    seed: int = 0,
    logits_hook: LogitsHook | None = None,
) -> torch.Tensor:
    """The prompt followed by ``max_new_tokens`` sampled tokens, ``[B, T + new]``."""
    settings = settings or SamplingSettings()
    new = list(stream_tokens(model, prompt, max_new_tokens, settings, seed, logits_hook))
    return torch.cat([prompt, *new], dim=1)


__all__ = ["LogitsHook", "ModelState", "SamplingSettings", "generate", "stream_tokens"]
