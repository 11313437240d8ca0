"""One optimiser step, shared by the Trainer and the probe trainer so both train the same way:
the next-token loss plus the model's auxiliary losses (MoE load balancing, z-loss) through the
backward pass, gradient clipping, the optimiser step, and the integrity check that every
optional feature switched on really ran."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lmlab.distributed.parallel import full_value
from lmlab.errors import LmlabError
from lmlab.model.lm import LanguageModel
from lmlab.train.optim import OptimizerSet


@dataclass
class StepResult:
    """What one step measured (losses are means over its micro-batches)."""

    loss: float
    aux_loss: float
    grad_norm: float
    """Before clipping."""
    grad_norm_layers: list[float]
    feature_calls: dict[str, int]
    """Calls of each optional feature during this step."""
    data_s: float
    forward_backward_s: float
    optimizer_s: float


class FeatureCheck:
    """Counts each optional feature's calls per step and raises after the first step if one
    that is switched on never ran: a config that silently skips a feature (a pattern or a
    capacity that routes around every layer) would otherwise train something else."""

    def __init__(self, model: LanguageModel) -> None:
        self.model = model
        self.totals = model.feature_counters()
        self.checked = False

    def calls(self, step: int) -> dict[str, int]:
        totals = self.model.feature_counters()
        calls = {name: count - self.totals.get(name, 0) for name, count in totals.items()}
        self.totals = totals
        idle = sorted(name for name, count in calls.items() if count == 0)
        if idle and not self.checked:
            raise LmlabError(
                f"feature(s) {', '.join(idle)} switched on but never ran in step {step}; "
                "check the config (e.g. a pattern or capacity that skips every layer)"
            )
        self.checked = True
        return calls


def layer_grad_norms(model: LanguageModel) -> list[float]:
    """The gradient norm of each block (0.0 for a block without gradients); under FSDP the
    norm of the whole gradient, not of this rank's shard."""
    norms = []
    for block in model.blocks:
        grads = [p.grad for p in block.parameters() if p.grad is not None]
        norms.append(
            torch.linalg.vector_norm(
                torch.stack([full_value(torch.linalg.vector_norm(g)) for g in grads])
            ).item()
            if grads
            else 0.0
        )
    return norms


class TrainStep:
    """Runs optimiser steps of ``model``: ``grad_accum`` micro-batches per step, gradients
    clipped to ``grad_clip`` (0: not clipped). ``sync(last)`` is the context of each
    micro-batch's forward and backward: data parallelism averages gradients over processes
    only in the last one (``lmlab.distributed.parallel.gradient_sync``)."""

    def __init__(
        self,
        model: LanguageModel,
        optimizers: OptimizerSet,
        grad_accum: int = 1,
        grad_clip: float = 1.0,
        sync: Callable[[bool], contextlib.AbstractContextManager] | None = None,
    ) -> None:
        self.model = model
        self.optimizers = optimizers
        self.sync = sync or (lambda last: contextlib.nullcontext())
        self.grad_accum = grad_accum
        self.grad_clip = grad_clip if grad_clip > 0 else math.inf
        self.features = FeatureCheck(model)

    def __call__(
        self,
        step: int,
        lr_multiplier: float,
        batch: Callable[[int], Any],
        loss: Callable[[Any], torch.Tensor],
    ) -> StepResult:
        """Step number ``step`` (counted from 1) at ``lr_multiplier`` times the base rates;
        ``batch(micro)`` gives each micro-batch (any object: a task's batch source decides)
        and ``loss(batch)`` its main loss, to which the model's auxiliary loss from that
        forward pass is added."""
        self.optimizers.set_lr_multiplier(lr_multiplier)
        data_s = forward_backward_s = 0.0
        loss_sum = aux_sum = 0.0
        for micro in range(self.grad_accum):
            t0 = time.perf_counter()
            drawn = batch(micro)
            t1 = time.perf_counter()
            with self.sync(micro == self.grad_accum - 1):
                main = loss(drawn)
                aux = self.model.auxiliary_loss()
                total = main if aux is None else main + aux
                (total / self.grad_accum).backward()
            loss_sum += main.item()
            aux_sum += 0.0 if aux is None else aux.item()
            data_s += t1 - t0
            forward_backward_s += time.perf_counter() - t1
        feature_calls = self.features.calls(step)
        t2 = time.perf_counter()
        layer_norms = layer_grad_norms(self.model)
        trained = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = full_value(torch.nn.utils.clip_grad_norm_(trained, self.grad_clip)).item()
        self.optimizers.step()
        self.optimizers.zero_grad()
        return StepResult(
            loss=loss_sum / self.grad_accum,
            aux_loss=aux_sum / self.grad_accum,
            grad_norm=grad_norm,
            grad_norm_layers=layer_norms,
            feature_calls=feature_calls,
            data_s=data_s,
            forward_backward_s=forward_backward_s,
            optimizer_s=time.perf_counter() - t2,
        )
