"""GRPO with verifiable rewards (Shao et al. 2024, DeepSeekMath): for each prompt, sample a
group of ``post.grpo_group`` completions with lmlab's cached decode path, score each with the
prompt's registered verifier, and push the policy towards completions that beat their group.

- Advantage of completion ``i`` in its group: ``A_i = (r_i - mean(r)) / (std(r) + eps)``
  (sample standard deviation, as TRL), the same for every token of the completion.
- Objective per token: ``min(rho A, clip(rho, 1 - c, 1 + c) A) - kl * k3`` with ``rho =
  pi / pi_old`` and ``k3 = exp(ref - pi) - (ref - pi) - 1`` (the unbiased, positive KL
  estimator of the paper) against the frozen init run when ``post.grpo_kl > 0``; averaged over
  each completion's tokens, then over completions; the loss is its negative.

One policy update per batch of rollouts (the paper's setting): ``pi_old`` is the policy that
sampled them, i.e. the same weights detached, so ``rho`` is 1 in value and the clip does not
bind; the gradient is the advantage-weighted policy gradient. Hand-written: TRL's GRPOTrainer
drives Hugging Face models and its own loop; this is the objective over lmlab's model and
Trainer (run folders, exact resume, metrics).

The rollouts of step ``s``, micro-batch ``m`` are sampled with the seed ``(train.seed, s, m)``
from the policy's weights at that step: both are in (or derived from) every checkpoint, so a
resumed run samples the same rollouts.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from lmlab.data.examples import Example, tokenize_examples
from lmlab.errors import LmlabError
from lmlab.model.generate import SamplingSettings, generate
from lmlab.posttrain.accuracy import accuracy
from lmlab.posttrain.batches import (
    IGNORE,
    PaddedBatch,
    pad_examples,
    step_indices,
    token_logprobs,
)
from lmlab.posttrain.dpo import frozen_reference
from lmlab.posttrain.sft import completion_metrics, load_splits, questions_of
from lmlab.posttrain.verifiers import get_verifier
from lmlab.train.task import Forward, Task, register_task
from lmlab.train.trainer import Trainer

ADVANTAGE_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """``(r - group mean) / (group std + eps)`` for rewards laid out group after group."""
    grouped = rewards.view(-1, group)
    mean = grouped.mean(1, keepdim=True)
    std = grouped.std(1, keepdim=True)
    return ((grouped - mean) / (std + ADVANTAGE_EPS)).flatten()


def clipped_objective(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    reference_logprobs: torch.Tensor | None = None,
    kl: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's loss (the negative objective, see the module docstring) for token log-probs
    ``[N, T]`` of N completions, their per-completion ``advantages [N]`` and ``mask [N, T]`` of
    completion tokens; returns it and the mean k3 KL per token (0 without a reference)."""
    ratio = torch.exp(logprobs - old_logprobs)
    advantage = advantages.unsqueeze(1)
    surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - clip, 1 + clip) * advantage)
    estimate = torch.zeros_like(logprobs)
    if reference_logprobs is not None:
        delta = reference_logprobs - logprobs
        estimate = torch.exp(delta) - delta - 1
    per_token = (surrogate - kl * estimate) * mask
    lengths = mask.sum(1).clamp(min=1)
    loss = -(per_token.sum(1) / lengths).mean()
    return loss, ((estimate * mask).sum(1) / lengths).mean()


@dataclass
class Rollouts:
    """Sampled completions (prompt and completion right-padded, labels on completion tokens up
    to the first stop token), their rewards and advantages."""

    rows: PaddedBatch
    rewards: torch.Tensor
    advantages: torch.Tensor
    generated_tokens: int
    generate_seconds: float


class GrpoTask(Task):
    """Prompts with verifiers; group rollouts; the clipped, group-relative objective."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        config = trainer.config
        splits = load_splits(config, "rl", ("verifiable",))
        refuse_long_prompts(splits.train + splits.val, trainer)
        self.prompts = questions_of(splits.train, None)
        self.questions = questions_of(splits.val[: config.post.eval_examples], None)
        answers = [
            Example("instruction", {"prompt": q.prompt, "completion": q.answer + "\n"}, e.where)
            for q, e in zip(questions_of(splits.val, None), splits.val, strict=True)
        ]
        context, overlong = config.data.seq_len, config.post.overlong
        self.val = (
            tokenize_examples(answers, trainer.tokenizer, context, overlong) if answers else None
        )
        self.reference = frozen_reference(trainer) if config.post.grpo_kl > 0 else None
        stop = trainer.tokenizer.encode("\n")
        self.stop_id = stop[0] if len(stop) == 1 else None
        self.gathered: list[dict[str, float]] = []

    def batch(self, step: int, micro: int, seq_len: int) -> Rollouts:
        train = self.trainer.config.train
        chosen = step_indices(len(self.prompts), train, step, micro)
        seed = int(np.random.default_rng([train.seed, step, micro]).integers(2**62))
        return self.rollouts([self.prompts[i] for i in chosen], seed)

    @torch.no_grad()
    def rollouts(self, questions: list, seed: int) -> Rollouts:
        """``post.grpo_group`` samples per question (questions of one token length decoded
        together: a batch needs one prompt length, and left padding would feed pads into
        recurrent states), scored by each question's verifier."""
        trainer, post = self.trainer, self.trainer.config.post
        group, tokenizer = post.grpo_group, trainer.tokenizer
        model = trainer.model
        started = time.perf_counter()
        encoded = [tokenizer.encode(q.prompt) for q in questions]
        by_length: dict[int, list[int]] = defaultdict(list)
        for index, ids in enumerate(encoded):
            by_length[len(ids)].append(index)
        completions: list[list[int]] = [[] for _ in range(len(questions) * group)]
        was_training = model.training
        model.eval()
        settings = SamplingSettings(temperature=post.rollout_temperature)
        for offset, indices in enumerate(by_length.values()):
            prompt = torch.tensor(
                [encoded[i] for i in indices for _ in range(group)], device=trainer.device
            )
            new = generate(model, prompt, post.max_new_tokens, settings, seed + offset)
            for row, tokens in enumerate(new[:, prompt.shape[1] :].tolist()):
                question, sample = divmod(row, group)
                completions[indices[question] * group + sample] = self.cut(tokens)
        model.train(was_training)
        seconds = time.perf_counter() - started
        rewards = torch.tensor(
            [
                get_verifier(q.verifier)(tokenizer.decode(completions[i * group + s]), q.answer)
                for i, q in enumerate(questions)
                for s in range(group)
            ]
        )
        ids, trained = [], []
        for index, completion in enumerate(completions):
            prompt_ids = encoded[index // group]
            ids.append(np.array(prompt_ids + completion, dtype=np.int64))
            trained.append(np.arange(len(ids[-1])) >= len(prompt_ids))
        rows = pad_examples(ids, trained).to(trainer.device)
        generated = sum(len(c) for c in completions)
        return Rollouts(rows, rewards, group_advantages(rewards, group), generated, seconds)

    def cut(self, tokens: list[int]) -> list[int]:
        """A completion up to and including its first newline (the answer's end)."""
        if self.stop_id is not None and self.stop_id in tokens:
            return tokens[: tokens.index(self.stop_id) + 1]
        return tokens

    def loss(self, forward: Forward, batch: Rollouts) -> torch.Tensor:
        rows, post = batch.rows, self.trainer.config.post
        with self.trainer.autocast():
            logits, _ = forward(rows.inputs)
            reference = None
            if self.reference is not None:
                with torch.no_grad():
                    reference_logits, _ = self.reference(rows.inputs)
                reference = token_logprobs(reference_logits, rows.labels)
        logprobs = token_logprobs(logits, rows.labels)
        mask = (rows.labels != IGNORE).float()
        advantages = batch.advantages.to(logprobs.device)
        loss, kl = clipped_objective(
            logprobs, logprobs.detach(), advantages, mask, post.grpo_clip, reference, post.grpo_kl
        )
        self.gathered.append(
            {
                "reward": batch.rewards.mean().item(),
                "accuracy": (batch.rewards == 1).float().mean().item(),
                "kl": kl.item(),
                "generate_s": batch.generate_seconds,
                "rollout_tokens": batch.generated_tokens,
            }
        )
        return loss

    def tokens(self, batch: Rollouts) -> int:
        return batch.rows.real_tokens

    def step_metrics(self) -> dict[str, float]:
        """Mean reward and accuracy of the step's rollouts, the k3 KL, and generation time and
        tokens (``rollout_tokens_per_s``: generated tokens over generation seconds)."""
        gathered, self.gathered = self.gathered, []
        if not gathered:
            return {}
        out = {key: sum(g[key] for g in gathered) / len(gathered) for key in gathered[0]}
        out["generate_s"] = sum(g["generate_s"] for g in gathered)
        out["rollout_tokens"] = sum(g["rollout_tokens"] for g in gathered)
        out["rollout_tokens_per_s"] = out["rollout_tokens"] / max(out["generate_s"], 1e-9)
        return out

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy exact-match accuracy on held-out prompts, and loss, perplexity and bits per
        byte of their reference answers (as SFT's)."""
        trainer = self.trainer
        result = {"loss": math.nan, "perplexity": math.nan, "bits_per_byte": math.nan}
        if self.val is not None:
            result.update(completion_metrics(trainer, self.val))
        if self.questions:
            result["accuracy"] = accuracy(
                trainer.model,
                trainer.tokenizer,
                self.questions,
                trainer.config.post.max_new_tokens,
                trainer.device,
            )
        return result


def refuse_long_prompts(examples: list[Example], trainer: Trainer) -> None:
    """A rollout is a prompt and up to ``post.max_new_tokens`` sampled tokens, trained on as one
    sequence: it must fit ``data.seq_len + 1`` tokens, so a longer prompt is refused (cutting
    a problem statement would change the problem its verifier checks)."""
    room = trainer.config.data.seq_len + 1 - trainer.config.post.max_new_tokens
    for example in examples:
        length = len(trainer.tokenizer.encode(example.fields["prompt"]))
        if length > room:
            raise LmlabError(
                f"{example.where}: a prompt of {length} tokens leaves no room for "
                f"post.max_new_tokens={trainer.config.post.max_new_tokens} in data.seq_len + 1 = "
                f"{trainer.config.data.seq_len + 1}; raise data.seq_len or lower "
                "post.max_new_tokens"
            )


@register_task("grpo")
def grpo_task(trainer: Trainer) -> GrpoTask:
    return GrpoTask(trainer)
