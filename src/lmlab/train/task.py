"""What a run optimises, as a pluggable part of the one training loop.

The :class:`~lmlab.train.trainer.Trainer` owns everything every run shares: the model, the
optimisers and their schedule, the shared optimiser step, budget, checkpoints, exact resume,
metrics, the run lock and the registry. A :class:`Task` supplies the rest: the batch of each
micro-step (the batch source), the loss of a batch (the objective) and the evaluation.
Pretraining is :class:`~lmlab.train.trainer.LanguageModelingTask`; post-training methods
(:mod:`lmlab.posttrain`) register theirs by ``post.method`` with :func:`register_task`, so
``lmlab train --resume`` rebuilds any run's task from its config.

Exact resume asks one thing of a task: a batch must be a function of the step, the
micro-batch and the seed (draw with a generator seeded from them), or of state the task returns
from :meth:`Task.state_dict` (saved in each checkpoint, restored before the first step).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch

from lmlab.catalog import Catalog

Forward = Callable[..., tuple[torch.Tensor, Any]]
"""The model's forward (possibly compiled): ``forward(ids, state=None) -> (logits, state)``."""


class Task(ABC):
    """The batch source, objective and evaluation of a run (see the module docstring)."""

    @abstractmethod
    def batch(self, step: int, micro: int, seq_len: int) -> Any:
        """Micro-batch ``micro`` of step ``step`` (counted from 0), on the trainer's device."""

    @abstractmethod
    def loss(self, forward: Forward, batch: Any) -> torch.Tensor:
        """The scalar loss of ``batch`` to minimise (the model's auxiliary losses are added by
        the shared step)."""

    @abstractmethod
    def tokens(self, batch: Any) -> int:
        """Tokens ``batch`` trains on (for the budget's bookkeeping and tokens/s)."""

    @abstractmethod
    def evaluate(self) -> dict[str, float]:
        """Held-out results; at least ``loss``, ``perplexity`` and ``bits_per_byte``, which
        the summary, the registry and ``lmlab compare`` read."""

    def step_metrics(self) -> dict[str, float]:
        """Task-specific values of the step just taken (e.g. reward margins), written in its
        metrics row under ``task``; the task resets what it gathers here."""
        return {}

    def start_metrics(self) -> dict | None:
        """A ``data`` row written once when the run starts (e.g. examples dropped)."""
        return None

    def state_dict(self) -> dict:
        """What the task must carry across a resume (JSON values and tensors)."""
        return {}

    def load_state_dict(self, state: dict) -> None:  # noqa: B027  (stateless tasks keep it)
        """Restore :meth:`state_dict`'s output."""


TaskFactory = Callable[[Any], Task]
"""Called with the :class:`~lmlab.train.trainer.Trainer` once its model is built (weights
loaded, adapters in place) and before a checkpoint is restored."""
TASKS: Catalog[TaskFactory] = Catalog(
    "post.method",
    "import lmlab.posttrain (the lmlab command does) or register a task with "
    "lmlab.train.task.register_task",
)
"""Task factories by ``post.method``."""


def register_task(method: str) -> Callable[[TaskFactory], TaskFactory]:
    """Register the task factory of ``post.method=<method>``."""
    return TASKS.register(method)


def task_factory(method: str) -> TaskFactory:
    return TASKS.lookup(method)
