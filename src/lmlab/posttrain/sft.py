"""Supervised fine-tuning: next-token loss on the completion tokens only (the prompt is
context, not a target), on whole examples right-padded per batch."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmlab.config.schema import Config
from lmlab.data.chat import ChatTemplate
from lmlab.data.examples import Example, Sequences, read_examples, tokenize_examples
from lmlab.posttrain.accuracy import Question, accuracy
from lmlab.posttrain.batches import IGNORE, PaddedBatch, pad_examples, step_indices
from lmlab.posttrain.datasets import resolve_data
from lmlab.posttrain.distill import distillation_kl, load_teacher
from lmlab.train.run import TOKENIZER_DIR
from lmlab.train.task import Forward, Task, register_task
from lmlab.train.trainer import Trainer

SFT_FORMATS = ("instruction", "chat")


@dataclass
class ExampleSplits:
    """A method's train and held-out examples."""

    train: list[Example]
    val: list[Example]


def load_splits(config: Config, fmt: str, formats: tuple[str, ...]) -> ExampleSplits:
    """``post.data``'s examples, and the held-out ones: ``post.val_data``, else a shipped set's
    test split, else the last ``post.val_fraction`` of ``post.data`` in a fixed shuffled order
    (``data.seed``)."""
    post = config.post
    train = read_examples(resolve_data(post.data, fmt), formats)
    if post.val_data:
        return ExampleSplits(train, read_examples(resolve_data(post.val_data, fmt), formats))
    if resolve_data(post.data, fmt) != Path(post.data):  # a shipped set
        return ExampleSplits(train, read_examples(resolve_data(post.data, fmt, "test"), formats))
    order = np.random.default_rng(config.data.seed).permutation(len(train))
    held = int(len(train) * post.val_fraction)
    if held == 0 or held == len(train):
        return ExampleSplits(train, [])
    return ExampleSplits(
        [train[i] for i in sorted(order[held:])], [train[i] for i in sorted(order[:held])]
    )


def needs_template(examples: list[Example]) -> bool:
    return any(example.format == "chat" for example in examples)


def questions_of(examples: list[Example], template: ChatTemplate | None) -> list[Question]:
    """Held-out examples as questions: an instruction's completion (or a chat's last assistant
    message) is the answer, checked by the example's ``verifier`` field or exact match."""
    out = []
    for example in examples:
        fields = example.fields
        verifier = fields.get("verifier", "exact_match")
        if example.format == "chat":
            assert template is not None
            prompt = template.prompt(fields["messages"][:-1])
            out.append(Question(prompt, fields["messages"][-1]["content"], verifier))
        elif example.format == "verifiable":
            out.append(Question(fields["prompt"], fields["answer"], verifier))
        else:
            out.append(Question(fields["prompt"], fields["completion"], verifier))
    return out


class SftTask(Task):
    """Batches of whole instruction/chat examples; loss on their trained tokens only."""

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        config = trainer.config
        self.teacher = (  # first: a wrong teacher fails before the examples are read
            load_teacher(config.post.teacher, trainer.tokenizer, trainer.device)
            if config.post.teacher
            else None
        )
        self.template = ChatTemplate.load(trainer.run_dir / TOKENIZER_DIR)
        splits = load_splits(config, "sft", SFT_FORMATS)
        context, overlong = config.data.seq_len, config.post.overlong
        tokenizer = trainer.tokenizer
        self.train = tokenize_examples(splits.train, tokenizer, context, overlong, self.template)
        self.val: Sequences | None = (
            tokenize_examples(splits.val, tokenizer, context, overlong, self.template)
            if splits.val
            else None
        )
        self.questions = questions_of(splits.val[: config.post.eval_examples], self.template)
        self.gathered: list[tuple[float, float]] = []
        """(cross-entropy, distillation KL) of each micro-batch of the step, with a teacher."""

    def start_metrics(self) -> dict:
        row = {"train": self.train.stats()}
        if self.val is not None:
            row["val"] = self.val.stats()
        return row

    def batch(self, step: int, micro: int, seq_len: int) -> PaddedBatch:
        chosen = step_indices(len(self.train.ids), self.trainer.config.train, step, micro)
        batch = pad_examples(
            [self.train.ids[i] for i in chosen], [self.train.trained[i] for i in chosen]
        )
        return batch.to(self.trainer.device)

    def loss(self, forward: Forward, batch: PaddedBatch) -> torch.Tensor:
        if self.teacher is None:
            return completion_loss(forward, batch, self.trainer.autocast())
        with self.trainer.autocast():
            logits, _ = forward(batch.inputs)
            with torch.no_grad():
                teacher_logits, _ = self.teacher(batch.inputs)
        hard = completion_cross_entropy(logits, batch.labels)
        post = self.trainer.config.post
        soft = distillation_kl(logits, teacher_logits, batch.labels, post.distill_temperature)
        self.gathered.append((hard.item(), soft.item()))
        return (1 - post.distill_alpha) * hard + post.distill_alpha * soft

    def step_metrics(self) -> dict[str, float]:
        gathered, self.gathered = self.gathered, []
        if not gathered:
            return {}
        hard, soft = zip(*gathered, strict=True)
        return {"cross_entropy": sum(hard) / len(hard), "distill_kl": sum(soft) / len(soft)}

    def tokens(self, batch: PaddedBatch) -> int:
        return batch.real_tokens

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        trainer = self.trainer
        result: dict[str, float] = {}
        if self.val is not None:
            result.update(completion_metrics(trainer, self.val))
        else:
            result.update(loss=math.nan, perplexity=math.nan, bits_per_byte=math.nan)
        if self.questions:
            stop = self.template.end_of_turn if self.template else "\n"
            result["accuracy"] = accuracy(
                trainer.model,
                trainer.tokenizer,
                self.questions,
                trainer.config.post.max_new_tokens,
                trainer.device,
                stop,
            )
        return result


def completion_loss(forward: Forward, batch: PaddedBatch, autocast) -> torch.Tensor:
    """Mean cross-entropy over the batch's trained tokens (IGNORE labels get none)."""
    with autocast:
        logits, _ = forward(batch.inputs)
    return completion_cross_entropy(logits, batch.labels)


def completion_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)


def completion_metrics(trainer: Trainer, sequences: Sequences) -> dict[str, float]:
    """Loss per trained token of held-out examples, its perplexity, and bits per byte of the
    trained text (comparable across tokenizers, as in pretraining)."""
    model, size = trainer.model, trainer.config.train.batch_size
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(sequences.ids), size):
        batch = pad_examples(
            sequences.ids[start : start + size], sequences.trained[start : start + size]
        ).to(trainer.device)
        with trainer.autocast():
            logits, _ = model(batch.inputs)
        total += F.cross_entropy(
            logits.float().flatten(0, 1),
            batch.labels.flatten(),
            ignore_index=IGNORE,
            reduction="sum",
        ).item()
        count += int((batch.labels != IGNORE).sum())
    model.train(was_training)
    mean = total / max(count, 1)
    return {
        "loss": mean,
        "perplexity": math.exp(min(mean, 700.0)),
        "bits_per_byte": total / math.log(2) / max(sum(sequences.text_bytes), 1),
        "tokens": count,
    }


@register_task("sft")
def sft_task(trainer: Trainer) -> SftTask:
    return SftTask(trainer)
