"""The training loop: budget, schedule, mixed precision, evaluation, checkpoints and metrics.

Exact resume rests on one rule: everything a step consumes is a function of the step number
(the batch is drawn from a generator seeded by ``(seed, step)``, the learning rate from the
schedule at that step), and everything a step changes (weights, optimiser moments, RNG, the
carried recurrent state) is in the checkpoint. A resumed run therefore replays the same steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config.schema import Config
from lmlab.data.dataset import random_batch, sequential_batch, stream_length
from lmlab.data.tokenizers import Tokenizer
from lmlab.data.tokens import TokenData
from lmlab.errors import LmlabError
from lmlab.eval.evaluate import evaluate
from lmlab.layers.base import TokenMixer
from lmlab.model.cache import ModelState
from lmlab.model.lm import LanguageModel
from lmlab.train.checkpoint import (
    Checkpoint,
    atomic_write_json,
    capture_rng_state,
    restore_rng_state,
    save_checkpoint,
)
from lmlab.train.device import autocast, peak_memory_bytes, pick_device, resolve_precision
from lmlab.train.metrics import MetricsLog, Progress
from lmlab.train.optim import build_optimizers
from lmlab.train.run import METRICS_FILE, SUMMARY_FILE, RunHold, load_weights, run_origin
from lmlab.train.schedule import lr_multiplier


@dataclass
class Budget:
    """How long to train: a fixed number of steps, or wall-clock seconds."""

    steps: int
    seconds: float = 0.0

    def progress(self, step: int, elapsed: float) -> float:
        if self.seconds:
            return elapsed / self.seconds
        return step / max(self.steps, 1)

    def done(self, step: int, elapsed: float) -> bool:
        return elapsed >= self.seconds if self.seconds else step >= self.steps


def budget_for(config: Config) -> Budget:
    train = config.train
    tokens_per_step = train.batch_size * train.grad_accum * config.data.seq_len
    if train.max_time:
        return Budget(steps=0, seconds=train.max_time)
    if train.max_tokens:
        return Budget(steps=math.ceil(train.max_tokens / tokens_per_step))
    return Budget(steps=train.max_steps)


def seq_len_at(config: Config, step: int) -> int:
    """The sequence length at ``step`` under the curriculum (multiples of 8 where possible)."""
    train, final = config.train, config.data.seq_len
    if not train.seq_len_start or step >= train.curriculum_steps:
        return final
    length = train.seq_len_start + (final - train.seq_len_start) * step / train.curriculum_steps
    return max(1, min(final, int(length) // 8 * 8 or int(length)))


def refuse_growing_caches(model: nn.Module) -> None:
    """Truncated BPTT carries every layer's state across the whole stream; a state that keeps
    every past token (an attention cache without a window, Hyena's past inputs) would then hold
    every token seen since the stream started, so its memory and time per step would grow
    without bound."""
    growing = [
        f"{name} ({m.name})"
        for name, m in model.named_modules()
        if isinstance(m, TokenMixer) and m.cache_grows_with_context
    ]
    if growing:
        raise LmlabError(
            f"train.tbptt carries the state of {', '.join(growing)} across every segment, and "
            "that state keeps every past token, so it would grow with the whole stream; give "
            "attention a window (e.g. model.mixer_options.attention.window=256), use a mixer "
            "with a fixed-size state, or set train.tbptt=false"
        )


@dataclass
class TrainerState:
    """What the loop needs besides weights and optimiser state to continue exactly."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    stream_position: int = 0
    best_val_loss: float = math.inf
    last_eval: dict = field(default_factory=dict)


class Trainer:
    """Trains ``config`` in ``run_dir``; ``resume_from`` continues a checkpoint exactly."""

    def __init__(
        self,
        config: Config,
        run_dir: Path,
        data: TokenData,
        tokenizer: Tokenizer,
        resume_from: Checkpoint | None = None,
        show_progress: bool = True,
        hold: RunHold | None = None,
    ) -> None:
        self.config = config
        self.hold = hold
        """The lock on ``run_dir``, released when :meth:`train` ends."""
        self.run_dir = run_dir
        self.data = data
        self.tokenizer = tokenizer
        train = config.train
        if train.threads:
            torch.set_num_threads(train.threads)
        if train.deterministic:
            torch.use_deterministic_algorithms(True)
        self.device = pick_device(train.device)
        self.precision = resolve_precision(train.precision, self.device)
        torch.manual_seed(train.seed)
        self.model = LanguageModel(config.model).to(self.device)
        self.model.set_activation_checkpointing(train.activation_checkpointing)
        if train.tbptt:
            refuse_growing_caches(self.model)
        self.optimizers = build_optimizers(self.model, train, self.device)
        self.state = TrainerState()
        self.carried: ModelState | None = None
        if resume_from is not None:
            self._restore(resume_from)
        self.forward = torch.compile(self.model) if train.compile else self.model
        self.budget = budget_for(config)
        self.metrics = MetricsLog(
            run_dir / METRICS_FILE,
            keep_through_step=self.state.step,
            tensorboard_dir=run_dir / "tensorboard" if train.tensorboard else None,
        )
        self.progress = Progress(enabled=show_progress)
        self.flops_per_token = 3 * self.model.flops_per_token(config.data.seq_len)
        self.feature_totals = self.model.feature_counters()
        self.features_checked = False
        self.eval_listeners: list[Callable[[dict], None]] = []
        """Called with each evaluation's result (step, tokens, loss, bits_per_byte, ...) after
        it is logged; an exception raised there stops training (e.g. a search pruning a trial)."""

    def _restore(self, checkpoint: Checkpoint) -> None:
        load_weights(self.model, checkpoint.model, self.run_dir)
        try:
            self.optimizers.load_state_dict(checkpoint.optimizer)
        except (ValueError, KeyError) as exc:
            raise LmlabError(
                f"the optimiser state in {checkpoint.path} does not fit train.optimizer="
                f"{self.config.train.optimizer} ({exc}); resume with the original optimizer"
            ) from None
        saved = dict(checkpoint.trainer)
        carried = saved.pop("carried_state", None)
        saved.pop("origin", None)
        self.state = TrainerState(**saved)
        if carried is not None:
            self.carried = ModelState(carried["layers"], carried["position"])
        restore_rng_state(checkpoint.rng)

    def _batch(self, step: int, micro: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        train = self.config.train
        if train.tbptt:
            stream = stream_length(len(self.data.train), train.batch_size, seq_len)
            if self.state.stream_position + seq_len + 1 > stream:
                self.state.stream_position = 0  # every row wraps to its start: forget the state
                self.carried = None
            x, y = sequential_batch(
                self.data.train, self.state.stream_position, train.batch_size, seq_len
            )
            self.state.stream_position += seq_len
        else:
            index = step * train.grad_accum + micro
            x, y = random_batch(self.data.train, index, train.batch_size, seq_len, train.seed)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Next-token cross-entropy and the model's auxiliary loss (None if it has none)."""
        state = self.carried if self.config.train.tbptt else None
        with autocast(self.device, self.precision):
            logits, new_state = self.forward(x, state)
        if self.config.train.tbptt:
            self.carried = new_state.detach()
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        return loss, self.model.auxiliary_loss()

    def _layer_grad_norms(self) -> list[float]:
        norms = []
        for block in self.model.blocks:
            grads = [p.grad for p in block.parameters() if p.grad is not None]
            norms.append(
                torch.linalg.vector_norm(
                    torch.stack([torch.linalg.vector_norm(g) for g in grads])
                ).item()
                if grads
                else 0.0
            )
        return norms

    def evaluate(self) -> dict[str, float]:
        train = self.config.train
        return evaluate(
            self.model,
            self.data,
            batch_size=train.batch_size,
            seq_len=self.config.data.seq_len,
            max_batches=train.eval_batches,
            device=self.device,
            autocast=autocast(self.device, self.precision),
        )

    def save(self) -> Path:
        trainer_state = dict(vars(self.state), origin=run_origin(self.config, self.tokenizer))
        if self.carried is not None:
            trainer_state["carried_state"] = vars(self.carried)
        return save_checkpoint(
            self.run_dir,
            self.state.step,
            self.model.state_dict(),
            self.optimizers.state_dict(),
            trainer_state,
            rng=capture_rng_state(),
            keep_last=self.config.train.keep_checkpoints,
        )

    def train(self) -> dict:
        """Run until the budget is spent; returns the summary (also written to summary.json)."""
        train, budget, state = self.config.train, self.budget, self.state
        self.model.train()
        try:
            while not budget.done(state.step, state.elapsed):
                self._step()
                last = budget.done(state.step, state.elapsed)
                if state.step % train.eval_interval == 0 or last:
                    self._evaluate_now()
                if state.step % train.checkpoint_interval == 0 or last:
                    self.save()
            if not state.last_eval or state.last_eval.get("step") != state.step:
                self._evaluate_now()  # a resumed run whose budget was already spent
                self.save()
            return self._write_summary()
        except KeyboardInterrupt:
            self.save()
            raise
        finally:
            self.progress.close()
            self.metrics.close()
            if self.hold is not None:
                self.hold.release()

    def _step(self) -> None:
        train, state = self.config.train, self.state
        seq_len = seq_len_at(self.config, state.step)
        multiplier = lr_multiplier(
            train.schedule,
            state.step,
            self.budget.progress(state.step, state.elapsed),
            train.warmup_steps,
            train.min_lr_ratio,
            train.decay_fraction,
        )
        self.optimizers.set_lr_multiplier(multiplier)
        started = time.perf_counter()
        data_time = compute_time = 0.0
        loss_sum = aux_sum = 0.0
        for micro in range(train.grad_accum):
            t0 = time.perf_counter()
            x, y = self._batch(state.step, micro, seq_len)
            t1 = time.perf_counter()
            loss, aux = self._loss(x, y)
            total = loss if aux is None else loss + aux
            (total / train.grad_accum).backward()
            loss_sum += loss.item()
            aux_sum += 0.0 if aux is None else aux.item()
            data_time += t1 - t0
            compute_time += time.perf_counter() - t1
        loss_value = loss_sum / train.grad_accum
        if not math.isfinite(loss_value):
            raise LmlabError(
                f"loss became {loss_value} at step {state.step}; lower train.lr or raise "
                "train.warmup_steps, then resume from the last checkpoint"
            )
        t2 = time.perf_counter()
        layer_norms = self._layer_grad_norms()
        clip = train.grad_clip if train.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip).item()
        self.optimizers.step()
        self.optimizers.zero_grad()
        optim_time = time.perf_counter() - t2
        step_time = time.perf_counter() - started
        tokens = train.batch_size * train.grad_accum * seq_len
        state.step += 1
        state.tokens += tokens
        state.elapsed += step_time
        row = {
            "kind": "train",
            "step": state.step,
            "tokens": state.tokens,
            "loss": loss_value,
            "aux_loss": aux_sum / train.grad_accum,
            "lr": self.optimizers.learning_rates(),
            "grad_norm": grad_norm,
            "grad_norm_layers": layer_norms,
            "seq_len": seq_len,
            "tokens_per_s": tokens / step_time,
            "step_ms": 1000 * step_time,
            "time_ms": {
                "data": 1000 * data_time,
                "forward_backward": 1000 * compute_time,
                "optimizer": 1000 * optim_time,
            },
            "peak_memory_mb": peak_memory_bytes(self.device) / 2**20,
        }
        statistics = self.model.pop_statistics()
        if statistics:
            row["statistics"] = statistics
        totals = self.model.feature_counters()
        row["feature_calls"] = {k: v - self.feature_totals.get(k, 0) for k, v in totals.items()}
        self.feature_totals = totals
        idle = sorted(name for name, calls in row["feature_calls"].items() if calls == 0)
        if idle and not self.features_checked:
            raise LmlabError(
                f"feature(s) {', '.join(idle)} switched on but never ran in step {state.step}; "
                "check the config (e.g. a pattern or capacity that skips every layer)"
            )
        self.features_checked = True
        self.metrics.write(row)
        self.progress.update(
            state.step,
            self.budget,
            state.elapsed,
            loss_value,
            row["tokens_per_s"],
            self.state.last_eval.get("loss"),
        )

    def _evaluate_now(self) -> None:
        started = time.perf_counter()
        result = self.evaluate()
        eval_ms = 1000 * (time.perf_counter() - started)
        result.update(step=self.state.step, tokens=self.state.tokens, eval_ms=eval_ms)
        self.state.last_eval = result
        self.state.best_val_loss = min(self.state.best_val_loss, result["loss"])
        self.metrics.write({"kind": "eval", **result, "elapsed_s": self.state.elapsed})
        self.progress.note(
            f"step {self.state.step}: val loss {result['loss']:.4f}, "
            f"{result['bits_per_byte']:.4f} bits/byte"
        )
        for listener in self.eval_listeners:
            listener(result)

    def _write_summary(self) -> dict:
        self.model.on_training_end(self.run_dir, self.tokenizer.decode)
        state = self.state
        summary = {
            "run": str(self.run_dir),
            "steps": state.step,
            "tokens": state.tokens,
            "train_seconds": state.elapsed,
            "tokens_per_s": state.tokens / max(state.elapsed, 1e-9),
            "val_loss": state.last_eval["loss"],
            "val_perplexity": state.last_eval["perplexity"],
            "val_bits_per_byte": state.last_eval["bits_per_byte"],
            "best_val_loss": state.best_val_loss,
            "parameters": self.model.num_parameters(),
            "training_flops_per_token": self.flops_per_token,
            "device": str(self.device),
            "precision": self.precision,
            "tokenizer": self.tokenizer.kind,
            "vocab_size": self.tokenizer.vocab_size,
        }
        atomic_write_json(self.run_dir / SUMMARY_FILE, summary)
        return summary
