"""Held-out accuracy: answer prompts greedily with the cached decode path and score each answer
with its verifier (shared by every post-training method)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmlab.data.tokenizers import Tokenizer
from lmlab.model.generate import SamplingSettings, generate
from lmlab.posttrain.verifiers import get_verifier


@dataclass
class Question:
    """A prompt with its expected answer and the verifier that compares them."""

    prompt: str
    answer: str
    verifier: str = "exact_match"


@torch.no_grad()
def answers(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    device: torch.device,
    stop: str = "\n",
) -> list[str]:
    """Greedy completions of ``prompts``, each cut after its first ``stop``. Prompts of one
    token length are decoded together (a batch needs one length, and left padding would feed
    pad tokens into recurrent states)."""
    was_training = model.training
    model.eval()
    encoded = [tokenizer.encode(prompt) for prompt in prompts]
    groups: dict[int, list[int]] = defaultdict(list)
    for index, ids in enumerate(encoded):
        groups[len(ids)].append(index)
    out = [""] * len(prompts)
    settings = SamplingSettings(temperature=0.0)
    for indices in groups.values():
        batch = torch.tensor([encoded[i] for i in indices], device=device)
        new = generate(model, batch, max_new_tokens, settings)[:, batch.shape[1] :]
        for i, row in zip(indices, new.tolist(), strict=True):
            text = tokenizer.decode(row)
            cut = text.find(stop) if stop else -1
            out[i] = text if cut < 0 else text[: cut + len(stop)]
    model.train(was_training)
    return out


def accuracy(
    model: torch.nn.Module,
    tokenizer: Tokenizer,
    questions: Sequence[Question],
    max_new_tokens: int,
    device: torch.device,
    stop: str = "\n",
) -> float:
    """Mean verifier score of the model's greedy answers to ``questions``."""
    replies = answers(model, tokenizer, [q.prompt for q in questions], max_new_tokens, device, stop)
    scores = [
        get_verifier(q.verifier)(reply, q.answer)
        for q, reply in zip(questions, replies, strict=True)
    ]
    return sum(scores) / max(len(scores), 1)
