"""Direct preference optimisation (Rafailov et al. 2023) against a frozen reference: the run
``train.init_from`` names, loaded a second time, kept out of the optimiser and the checkpoints.

For a pair with the policy's and the reference's sequence log-probs of the chosen and the
rejected completion (summed over completion tokens only; the prompt is context),
``h = (pi_c - ref_c) - (pi_r - ref_r)`` and the loss is ``-log sigmoid(beta * h)``
(``post.dpo_loss=sigmoid``) or IPO's ``(h - 1 / (2 beta))^2`` (``ipo``, Azar et al. 2023,
here on summed log-probs as in the sigmoid loss). Hand-written: the loss is three lines over
lmlab's own model, and TRL's trainer would replace lmlab's (run folders, resume, metrics).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmlab.data.examples import Example, Sequences, tokenize_examples
from lmlab.errors import LmlabError
from lmlab.model.lm import LanguageModel
from lmlab.posttrain.batches import PaddedBatch, pad_examples, step_indices, token_logprobs
from lmlab.posttrain.sft import completion_metrics, load_splits
from lmlab.train.run import load_parent_weights
from lmlab.train.task import Forward, Task, register_task
from lmlab.train.trainer import Trainer

DPO_LOSSES = ("sigmoid", "ipo")


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row, the sum of log p(label) over the positions with a label (not IGNORE)."""
    return token_logprobs(logits, labels).sum(-1)


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    kind: str = "sigmoid",
) -> torch.Tensor:
    """Per-pair DPO (``sigmoid``) or IPO (``ipo``) loss from sequence log-probs."""
    h = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    if kind == "sigmoid":
        return -F.logsigmoid(beta * h)
    if kind == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    raise LmlabError(f"post.dpo_loss={kind} is unknown; use {' or '.join(DPO_LOSSES)}")


@dataclass
class PairBatch:
    """Chosen rows then rejected rows of the same pairs, right-padded together."""

    rows: PaddedBatch

    def to(self, device: torch.device) -> PairBatch:
        return PairBatch(self.rows.to(device))


def completions(examples: list[Example], field: str) -> list[Example]:
    """Preference examples as instructions completing the prompt with ``field``."""
    return [
        Example(
            "instruction",
            {"prompt": e.fields["prompt"], "completion": e.fields[field]},
            e.where,
        )
        for e in examples
    ]


@dataclass
class Pairs:
    chosen: Sequences
    rejected: Sequences

    def __len__(self) -> int:
        return len(self.chosen.ids)

    def batch(self, indices: list[int]) -> PairBatch:
        ids = [self.chosen.ids[i] for i in indices] + [self.rejected.ids[i] for i in indices]
        trained = [self.chosen.trained[i] for i in indices] + [
            self.rejected.trained[i] for i in indices
        ]
        return PairBatch(pad_examples(ids, trained))


def tokenize_pairs(examples: list[Example], trainer: Trainer) -> Pairs:
    """Both sides of each pair tokenised under ``post.overlong`` (a prompt too long is cut on
    the left); a pair one of whose completions cannot fit at all is an error, as leaving out
    one side would break the pairs."""
    context, overlong = trainer.config.data.seq_len, trainer.config.post.overlong
    sides = [
        tokenize_examples(completions(examples, field), trainer.tokenizer, context, overlong)
        for field in ("chosen", "rejected")
    ]
    if any(side.dropped for side in sides):
        raise LmlabError(
            f"{sum(s.dropped for s in sides)} preference completions in "
            f"{examples[0].where.rsplit(':', 1)[0]} do not fit the context of {context + 1} "
            "tokens; raise data.seq_len or shorten them"
        )
    return Pairs(*sides)


class DpoTask(Task):
    """Preference pairs; DPO/IPO loss against the frozen reference; reward margins and
    preference accuracy in the metrics."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        config = trainer.config
        splits = load_splits(config, "preference", ("preference",))
        self.train = tokenize_pairs(splits.train, trainer)
        self.val = tokenize_pairs(splits.val, trainer) if splits.val else None
        self.reference = frozen_reference(trainer)
        self.gathered: list[dict[str, torch.Tensor]] = []

    def start_metrics(self) -> dict:
        row = {"train": self.train.chosen.stats()}
        if self.val is not None:
            row["val"] = self.val.chosen.stats()
        return row

    def batch(self, step: int, micro: int, seq_len: int) -> PairBatch:
        chosen = step_indices(len(self.train), self.trainer.config.train, step, micro)
        return self.train.batch(chosen).to(self.trainer.device)

    def pair_logprobs(
        self, forward: Forward, batch: PairBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Policy log-probs (with grad) and reference log-probs (without) of every row."""
        rows = batch.rows
        with self.trainer.autocast():
            logits, _ = forward(rows.inputs)
            with torch.no_grad():
                reference_logits, _ = self.reference(rows.inputs)
        return sequence_logprobs(logits, rows.labels), sequence_logprobs(
            reference_logits, rows.labels
        )

    def loss(self, forward: Forward, batch: PairBatch) -> torch.Tensor:
        policy, reference = self.pair_logprobs(forward, batch)
        beta = self.trainer.config.post.dpo_beta
        self.gathered.append(pair_statistics(policy.detach(), reference, beta))
        return self.pair_losses(policy, reference).mean()

    def pair_losses(self, policy: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """Per-pair losses from the log-probs of chosen rows then rejected rows."""
        post, pairs = self.trainer.config.post, len(policy) // 2
        return preference_loss(
            policy[:pairs],
            policy[pairs:],
            reference[:pairs],
            reference[pairs:],
            post.dpo_beta,
            post.dpo_loss,
        )

    def tokens(self, batch: PairBatch) -> int:
        return batch.rows.real_tokens

    def step_metrics(self) -> dict[str, float]:
        gathered, self.gathered = self.gathered, []
        if not gathered:
            return {}
        return {key: torch.cat([g[key] for g in gathered]).mean().item() for key in gathered[0]}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """On the held-out pairs: the DPO loss, reward accuracy and margins, the policy's own
        preference accuracy (log p(chosen) > log p(rejected)), and loss, perplexity and bits
        per byte of the chosen completions (as SFT's, to see the chosen text stay likely)."""
        if self.val is None:
            return {"loss": math.nan, "perplexity": math.nan, "bits_per_byte": math.nan}
        trainer = self.trainer
        model, size = trainer.model, trainer.config.train.batch_size
        post = trainer.config.post
        was_training = model.training
        model.eval()
        parts, losses = [], []
        for start in range(0, len(self.val), size):
            indices = list(range(start, min(start + size, len(self.val))))
            policy, reference = self.pair_logprobs(
                model, self.val.batch(indices).to(trainer.device)
            )
            losses.append(self.pair_losses(policy, reference))
            parts.append(pair_statistics(policy, reference, post.dpo_beta))
        model.train(was_training)
        result = {key: torch.cat([p[key] for p in parts]).mean().item() for key in parts[0]}
        chosen = completion_metrics(trainer, self.val.chosen)
        result.update(
            dpo_loss=torch.cat(losses).mean().item(),
            loss=chosen["loss"],
            perplexity=chosen["perplexity"],
            bits_per_byte=chosen["bits_per_byte"],
        )
        return result


def pair_statistics(
    policy: torch.Tensor, reference: torch.Tensor, beta: float
) -> dict[str, torch.Tensor]:
    """Per pair: the implicit rewards ``beta * (pi - ref)`` of the chosen and rejected
    completion, their margin, reward accuracy (margin > 0) and the policy's preference
    accuracy (log p(chosen) > log p(rejected), what a user of the model sees)."""
    pairs = len(policy) // 2
    rewards = beta * (policy - reference)
    chosen, rejected = rewards[:pairs], rewards[pairs:]
    return {
        "reward_chosen": chosen,
        "reward_rejected": rejected,
        "reward_margin": chosen - rejected,
        "reward_accuracy": (chosen > rejected).float(),
        "preference_accuracy": (policy[:pairs] > policy[pairs:]).float(),
    }


def frozen_reference(trainer: Trainer) -> LanguageModel:
    """The init run's model, frozen: evaluated under no_grad, not in the optimiser (built
    apart from the trainer's model), not in checkpoints (rebuilt from the parent on resume)."""
    reference = LanguageModel(trainer.config.model)
    load_parent_weights(reference, trainer.config.parent)
    reference.requires_grad_(False)
    return reference.to(trainer.device).eval()


@register_task("dpo")
def dpo_task(trainer: Trainer) -> DpoTask:
    return DpoTask(trainer)
