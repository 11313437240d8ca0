"""Speculative decoding: a cheap draft proposes tokens, the target checks them in one forward.

Leviathan et al. 2023 ("Fast Inference from Transformers via Speculative Decoding") and Chen et
al. 2023: each round the draft samples ``k`` tokens one at a time from its distribution ``q``;
the target runs once over the last accepted token and the ``k`` drafts, which gives its
distribution ``p`` at each of the ``k + 1`` positions. Draft token ``x_i`` is accepted with
probability ``min(1, p_i(x_i) / q_i(x_i))``; at the first rejection the token is resampled from
``max(0, p_i - q_i)`` (normalised) and the round ends; when all ``k`` are accepted a bonus token
comes from ``p_{k+1}``. Every emitted token then follows the target's distribution exactly.
Greedy decoding (temperature 0) uses the same rule with one-hot distributions, which reduces
to "accept while the draft's token is the target's argmax, then take the target's argmax", so
the output is plain greedy decoding's. Top-k, top-p and min-p filter both distributions alike.

The target forgets rejected tokens with ``LanguageModel.rewind`` (attention caches are cut,
recurrent states recomputed from the state before the verification). The draft keeps the state
after each of its one-token steps, so it just takes the one after the last accepted token.

Self-speculative decoding (:class:`EarlyExit`) drafts with the target's own first ``N`` layers
and its final norm and shared head, as LayerSkip does (Elhoushi et al. 2024); unlike LayerSkip
the draft keeps its own cache rather than sharing the first layers' cache with the verification,
and lmlab does not train with LayerSkip's early-exit loss, so the acceptance rate is whatever a
normally trained model's lower layers give (measured in docs/serving.md).

Written here rather than taken from a library: ``transformers``' assisted generation works on
its own model classes and caches, not on lmlab's per-mixer states and rewind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lmlab.errors import ParamError
from lmlab.model.cache import ModelState
from lmlab.model.generate import SamplingSettings, filter_logits
from lmlab.model.lm import LanguageModel

Draft = Callable[[torch.Tensor, ModelState | None], tuple[torch.Tensor, ModelState]]
"""``(idx [1, T], state) -> (logits [1, T, V], state)``: a ``LanguageModel`` or an
:class:`EarlyExit`."""


class EarlyExit(nn.Module):
    """A LayerSkip-style self-speculative draft: the model's first ``n_layers`` blocks, then
    its final norm and (shared) head; no weights of its own."""

    def __init__(self, model: LanguageModel, n_layers: int) -> None:
        super().__init__()
        if not 1 <= n_layers < len(model.blocks):
            raise ParamError(
                f"<n_layers>={n_layers} must be in [1, {len(model.blocks) - 1}] for a model of "
                f"{len(model.blocks)} layers (the draft exits below the last layer)",
                "n_layers",
            )
        self.model = model
        self.n_layers = n_layers

    @property
    def cfg(self):
        return self.model.cfg

    def forward(
        self, idx: torch.Tensor, state: ModelState | None = None
    ) -> tuple[torch.Tensor, ModelState]:
        return self.model(idx, state, n_layers=self.n_layers)


@dataclass
class SpeculativeStats:
    """What a speculative generation did, for benchmarks and the CLI's summary."""

    rounds: int = 0
    """Target verification forwards (one per round)."""
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafted tokens over drafted tokens."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.emitted / self.rounds if self.rounds else 0.0


def token_probabilities(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """The distribution ``[..., V]`` that plain sampling draws from at a temperature above 0:
    filtered and tempered (greedy rounds compare argmaxes instead, see :func:`verify_drafts`)."""
    return filter_logits(logits.float(), settings).softmax(-1)


def accept_or_resample(
    p: torch.Tensor, q: torch.Tensor, token: int, generator: torch.Generator
) -> int | None:
    """Leviathan et al.'s rule for one drafted ``token`` drawn from ``q [V]``: None when it is
    accepted (probability ``min(1, p[token] / q[token])``), else a token from the residual
    ``max(0, p - q)`` normalised, which makes the emitted token follow ``p`` exactly."""
    if torch.rand((), generator=generator) * q[token] < p[token]:
        return None
    residual = (p - q).clamp_min(0)
    if residual.sum() <= 0:  # p == q up to rounding: rejection had probability ~0
        residual = p
    return int(torch.multinomial(residual, 1, generator=generator))


def draw_draft_token(
    logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator
) -> tuple[int, torch.Tensor | None]:
    """The draft's token from its logits ``[V]`` and the distribution ``q`` it was drawn from;
    greedy: the argmax and no ``q`` (the one-hot rule needs none, see :func:`verify_drafts`)."""
    if settings.temperature == 0:
        return int(logits.argmax()), None
    q = token_probabilities(logits, settings)
    return int(torch.multinomial(q, 1, generator=generator)), q


def verify_drafts(
    logits: torch.Tensor,
    drafted: list[int],
    draft_probs: list[torch.Tensor | None],
    settings: SamplingSettings,
    generator: torch.Generator,
) -> tuple[int, int]:
    """How many of ``drafted`` the target keeps, given its logits ``[k + 1, V]`` at the
    verified positions, and the token it emits after them (a resampled or a bonus token).

    Greedy, Leviathan et al.'s rule with one-hot p and q reduces to "keep drafts while they
    equal the target's argmax, then emit that argmax"; it is computed so, without the sampling
    calls (the argmax is ``sample_next``'s, so the text is plain greedy decoding's)."""
    if settings.temperature == 0:
        best = logits.argmax(-1).tolist()
        accepted = next((i for i, t in enumerate(drafted) if t != best[i]), len(drafted))
        return accepted, best[accepted]
    p = token_probabilities(logits, settings)
    for i, token in enumerate(drafted):
        new_token = accept_or_resample(p[i], draft_probs[i], token, generator)
        if new_token is not None:
            return i, new_token
    return len(drafted), int(torch.multinomial(p[len(drafted)], 1, generator=generator))


def check_draft(
    model: LanguageModel, draft: Draft, draft_tokens: int, draft_confidence: float = 0.0
) -> None:
    """A ParamError unless ``draft`` can draft ``draft_tokens`` tokens per round for ``model``,
    stopping below ``draft_confidence``."""
    if draft_tokens < 1:
        raise ParamError(f"<draft_tokens>={draft_tokens} must be at least 1", "draft_tokens")
    if not 0 <= draft_confidence < 1:
        raise ParamError(
            f"<draft_confidence>={draft_confidence} must be in [0, 1) (0 always drafts "
            "draft_tokens)",
            "draft_confidence",
        )
    if draft.cfg.vocab_size != model.cfg.vocab_size:
        raise ParamError(
            f"<draft> has a vocabulary of {draft.cfg.vocab_size}, the model {model.cfg.vocab_size}"
            "; the draft must use the target's tokenizer",
            "draft",
        )


def stream_speculative(
    model: LanguageModel,
    draft: Draft,
    prompt: torch.Tensor,
    max_new_tokens: int,
    settings: SamplingSettings,
    draft_tokens: int = 4,
    seed: int = 0,
    stats: SpeculativeStats | None = None,
    draft_confidence: float = 0.0,
) -> Iterator[torch.Tensor]:
    """Yield ``[1, 1]`` new tokens one at a time, as ``stream_tokens`` does, drafting up to
    ``draft_tokens`` per round with ``draft`` (fewer when its confidence falls below
    ``draft_confidence``, see :func:`speculative_round`) and verifying them with ``model``;
    ``stats`` (if given) counts rounds and accepted tokens. Batch 1: each row would accept a
    different number of tokens."""
    if prompt.shape[0] != 1 or prompt.shape[1] < 1:
        raise ParamError(f"<prompt> must be [1, T>=1], got {list(prompt.shape)}", "prompt")
    check_draft(model, draft, draft_tokens, draft_confidence)
    stats = stats if stats is not None else SpeculativeStats()
    return _speculate(
        model, draft, prompt, max_new_tokens, settings, draft_tokens, seed, stats, draft_confidence
    )


@dataclass
class SpeculativeCursor:
    """Where a speculative generation stands between rounds: both models have consumed every
    token but their pending ones (the target: the last emitted token; the draft: that token,
    after the last drafted one when every drafted token was accepted)."""

    target_state: ModelState | None
    draft_state: ModelState | None
    pending: torch.Tensor
    """``[1, 1]``: the last emitted token, which the target has not consumed."""
    draft_pending: torch.Tensor
    """``[1, P]``: the tokens the draft has not consumed (ending with ``pending``)."""


@torch.inference_mode()
def start_cursor(model: LanguageModel, draft: Draft, prompt: torch.Tensor) -> SpeculativeCursor:
    """Both models past all of ``prompt [1, T]`` but its last token."""
    context, pending = prompt[:, :-1], prompt[:, -1:]
    target_state = model(context)[1] if context.shape[1] else None
    draft_state = draft(context, None)[1] if context.shape[1] else None
    return SpeculativeCursor(target_state, draft_state, pending, pending)


@torch.inference_mode()
def speculative_round(
    model: LanguageModel,
    draft: Draft,
    cursor: SpeculativeCursor,
    k: int,
    settings: SamplingSettings,
    generator: torch.Generator,
    stats: SpeculativeStats,
    draft_confidence: float = 0.0,
) -> tuple[list[int], SpeculativeCursor]:
    """One round: up to ``k`` drafted tokens (0: plain decoding), one verification, the tokens
    it emits (the accepted drafts and one more) and where the generation then stands. Batch 1;
    ``stats`` counts the round but not the emitted tokens (the caller may discard some).

    ``draft_confidence`` > 0 ends the drafting early, after a token to which the draft's own
    softmax (temperature 1, no filters) gives less than that probability: a token the draft
    is unsure of is likely rejected, and drafting past it wastes draft forwards (as
    ``assistant_confidence_threshold`` in transformers' assisted generation). The output's
    distribution is unchanged: whether to draft one more token depends only on the tokens
    drafted so far, and each is verified by the same rule.

    Under ``inference_mode`` rather than ``no_grad``: a one-token forward of a small model is
    mostly per-op dispatch, which inference tensors make about a tenth cheaper; the states it
    returns are inference tensors, read only by later rounds."""
    template = cursor.pending
    drafted: list[int] = []
    draft_probs, draft_states = [], []
    draft_state, step_input = cursor.draft_state, cursor.draft_pending
    for _ in range(k):
        logits, draft_state = draft(step_input, draft_state)
        draft_states.append(draft_state)
        token, q = draw_draft_token(logits[0, -1], settings, generator)
        drafted.append(token)
        draft_probs.append(q)
        step_input = template.new_tensor([[token]])
        if draft_confidence and logits[0, -1].softmax(-1)[token] < draft_confidence:
            break
    k = len(drafted)
    verify = torch.cat([cursor.pending, template.new_tensor([drafted])], 1) if k else cursor.pending
    logits, verified_state = model(verify, cursor.target_state)
    accepted, new_token = verify_drafts(logits[0], drafted, draft_probs, settings, generator)
    target_state = model.rewind(cursor.target_state, verified_state, verify, accepted + 1)
    new = template.new_tensor([[new_token]])
    if k == 0:
        draft_state, draft_pending = cursor.draft_state, torch.cat([cursor.draft_pending, new], 1)
    elif accepted == k:  # the draft has not consumed its last token yet
        draft_state = draft_states[-1]
        draft_pending = template.new_tensor([[drafted[-1], new_token]])
    else:
        draft_state, draft_pending = draft_states[accepted], new
    stats.rounds += 1
    stats.drafted += k
    stats.accepted += accepted
    tokens = [*drafted[:accepted], new_token]
    return tokens, SpeculativeCursor(target_state, draft_state, new, draft_pending)


def _speculate(
    model: LanguageModel,
    draft: Draft,
    prompt: torch.Tensor,
    max_new_tokens: int,
    settings: SamplingSettings,
    draft_tokens: int,
    seed: int,
    stats: SpeculativeStats,
    draft_confidence: float,
) -> Iterator[torch.Tensor]:
    """The rounds of :func:`stream_speculative`, whose arguments are checked (at the call, not
    at the first token)."""
    generator = torch.Generator(device=prompt.device).manual_seed(seed)
    cursor = start_cursor(model, draft, prompt)
    emitted = 0
    while emitted < max_new_tokens:
        k = min(draft_tokens, max_new_tokens - emitted - 1)
        tokens, cursor = speculative_round(
            model, draft, cursor, k, settings, generator, stats, draft_confidence
        )
        for token in tokens:
            stats.emitted += 1
            emitted += 1
            yield prompt.new_tensor([[token]])
