"""The training loop: budget, schedule, mixed precision, evaluation, checkpoints and metrics.

Exact resume rests on one rule: everything a step consumes is a function of the step number
(the batch is drawn from a generator seeded by ``(seed, step)``, the learning rate from the
schedule at that step), and everything a step changes (weights, optimiser moments, RNG, the
carried recurrent state) is in the checkpoint, which is only written between steps (Ctrl-C
included). A resumed run therefore replays the same steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config.schema import Config, TrainConfig
from lmlab.data.dataset import random_batch, sequential_batch, stream_length
from lmlab.data.tokenizers import Tokenizer
from lmlab.data.tokens import TokenData
from lmlab.distributed.group import Ranks, current_ranks, gather_numbers, rank_device
from lmlab.distributed.parallel import CommClock, gradient_sync, make_parallel
from lmlab.distributed.sharded import load_model_and_optimizers
from lmlab.errors import LmlabError
from lmlab.eval.evaluate import evaluate
from lmlab.files import atomic_write_json
from lmlab.layers.base import TokenMixer
from lmlab.model.cache import ModelState
from lmlab.model.lm import LanguageModel
from lmlab.train import registry
from lmlab.train.adapters import add_lora, save_adapter, trainable_parameters
from lmlab.train.checkpoint import (
    Checkpoint,
    capture_rng_state,
    restore_rng_state,
    save_checkpoint,
    save_sharded_checkpoint,
)
from lmlab.train.device import autocast, peak_memory_bytes, pick_device, resolve_precision
from lmlab.train.metrics import MetricsLog, Progress
from lmlab.train.optim import build_optimizers
from lmlab.train.run import (
    METRICS_FILE,
    SUMMARY_FILE,
    RunHold,
    load_parent_weights,
    load_weights,
    run_origin,
)
from lmlab.train.schedule import lr_multiplier
from lmlab.train.step import StepResult, TrainStep
from lmlab.train.task import Forward, Task, task_factory


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


@contextlib.contextmanager
def torch_settings(train: TrainConfig, device: torch.device) -> Iterator[None]:
    """Apply a run's process-wide torch settings (threads, deterministic algorithms, TF32
    matmuls on CUDA) while it trains and restore the caller's afterwards, so one run never slows
    down or alters the next one (or the caller's own work) in this process.

    On CUDA, float32 matmuls run in TF32 (``torch.set_float32_matmul_precision("high")``), as
    nanoGPT and torchtitan train: about 8x the float32 throughput on Ampere and later, with a
    10-bit mantissa in the products (accumulation stays float32); deterministic mode keeps full
    float32."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    matmul_precision = torch.get_float32_matmul_precision()
    try:
        if train.threads:
            torch.set_num_threads(train.threads)
        if train.deterministic:
            torch.use_deterministic_algorithms(True)
        elif device.type == "cuda":
            torch.set_float32_matmul_precision("high")
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        torch.set_float32_matmul_precision(matmul_precision)


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM while training only set :attr:`requested`; the loop reads it
    between steps, saves and raises KeyboardInterrupt. Interrupting inside a step could save an
    optimiser state from the middle of ``optimizer.step()`` (Muon's momentum updated for some
    parameters only), and the resumed run would then differ. A second signal raises at once,
    without saving, for a user who cannot wait for the step to end.

    In a job of several processes a rank receives each signal twice (Ctrl-C reaches every
    process of the terminal, and torchrun passes it on to its workers), and a rank leaving in
    the middle of a collective would stall the others; there ``second_signal_raises=False``
    keeps every rank on its way to the common save (torchrun kills ranks that outlast its
    grace period)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, second_signal_raises: bool = True) -> None:
        self.requested = False
        self.second_signal_raises = second_signal_raises

    def _handle(self, signum: int, frame: object) -> None:
        if self.requested and self.second_signal_raises:
            raise KeyboardInterrupt
        self.requested = True

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The handlers while training, the previous ones afterwards (only the main thread may
        install handlers, and only it receives signals)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)


@dataclass
class CarriedState:
    """Truncated BPTT's memory across steps, in one place: the offset every batch row has
    reached in its stream and the recurrent state carried from the previous segment."""

    position: int = 0
    state: ModelState | None = None

    def segment(
        self, tokens: np.ndarray, batch_size: int, seq_len: int, shard: tuple[int, int] = (0, 1)
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``seq_len`` tokens of every row (of this rank's rows); at the end of the
        streams every row wraps to its start and the state, which belongs to the old text, is
        forgotten."""
        if self.position + seq_len + 1 > stream_length(len(tokens), batch_size, seq_len):
            self.position, self.state = 0, None
        x, y = sequential_batch(tokens, self.position, batch_size, seq_len, shard)
        self.position += seq_len
        return x, y

    def forward(self, forward: Callable, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``x`` continuing the carried state, whose graph is then cut."""
        logits, state = forward(x, self.state)
        self.state = state.detach()
        return logits

    def checkpoint(self) -> dict:
        saved: dict = {"stream_position": self.position}
        if self.state is not None:
            saved["carried_state"] = vars(self.state)
        return saved

    @classmethod
    def restored(cls, saved: dict) -> CarriedState:
        state = saved.get("carried_state")
        return cls(
            saved.get("stream_position", 0),
            None if state is None else ModelState(state["layers"], state["position"]),
        )


class LanguageModelingTask(Task):
    """Pretraining: next-token cross-entropy on windows of the token stream (random windows,
    each a function of the seed and step; or, with ``train.tbptt``, contiguous segments with
    the recurrent state carried between them), evaluated on the validation split."""

    def __init__(self, trainer: Trainer, data: TokenData) -> None:
        self.trainer = trainer
        self.data = data
        self.carried = CarriedState() if trainer.config.train.tbptt else None

    def batch(self, step: int, micro: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        train, device, shard = self.trainer.config.train, self.trainer.device, self.trainer.shard()
        if self.carried is not None:
            x, y = self.carried.segment(self.data.train, train.batch_size, seq_len, shard)
        else:
            index = step * train.grad_accum + micro
            x, y = random_batch(
                self.data.train, index, train.batch_size, seq_len, train.seed, shard
            )
        if device.type == "cuda":  # page-locked, so the copies below run asynchronously
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def loss(self, forward: Forward, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        with self.trainer.autocast():
            if self.carried is not None:
                logits = self.carried.forward(forward, x)
            else:
                logits, _ = forward(x)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    def tokens(self, batch: tuple[torch.Tensor, torch.Tensor]) -> int:
        return batch[0].numel()

    def evaluate(self) -> dict[str, float]:
        trainer = self.trainer
        train = trainer.config.train
        return evaluate(
            trainer.model,
            self.data,
            batch_size=train.batch_size,
            seq_len=trainer.config.data.seq_len,
            max_batches=train.eval_batches,
            device=trainer.device,
            autocast=trainer.autocast(),
        )

    def state_dict(self) -> dict:
        return {} if self.carried is None else self.carried.checkpoint()

    def load_state_dict(self, state: dict) -> None:
        if self.carried is not None:
            self.carried = CarriedState.restored(state)


@dataclass
class TrainerState:
    """What the loop needs besides weights, optimiser state and the carried state to continue
    exactly."""

    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    best_val_loss: float = math.inf
    last_eval: dict = field(default_factory=dict)


def check_batch_split(train: TrainConfig, ranks: Ranks, config_method: str = "none") -> None:
    """Every rank reads an equal share of each micro-batch, so averaging the ranks' gradients
    gives the whole batch's gradient."""
    if train.batch_size % ranks.world_size:
        raise LmlabError(
            f"train.batch_size={train.batch_size} (the rows of one micro-batch of the whole job) "
            f"does not split evenly over {ranks.world_size} processes; make it a multiple of "
            f"{ranks.world_size}"
        )
    if ranks.several and config_method != "none":
        raise LmlabError(
            f"post.method={config_method} reads its own examples, which several processes do "
            "not split yet; fine-tune in one process"
        )
    if train.tbptt and ranks.several:
        raise LmlabError(
            "train.tbptt carries each row's state across steps, which several processes do not "
            "support yet; train it in one process or set train.tbptt=false"
        )


SUMMARY_EVAL_SKIP = ("loss", "perplexity", "bits_per_byte", "step", "tokens", "eval_ms")
"""Evaluation values the summary names itself or that describe the evaluation, not a result."""


class Trainer:
    """Trains ``config`` in ``run_dir``; ``resume_from`` continues a checkpoint exactly. The
    task (batches, loss, evaluation) is pretraining on ``data`` for ``post.method=none``, else
    the one registered for ``post.method`` (see :mod:`lmlab.train.task`).

    In a job of several processes (``torchrun``; the process group joined by
    :func:`lmlab.distributed.group.join`) every rank runs this same loop on its share of each
    batch, through DDP or FSDP2 (``train.parallel``); the ranks agree on the loss, the time and
    a stop request once per step, and only rank 0 writes the run folder."""

    def __init__(
        self,
        config: Config,
        run_dir: Path,
        data: TokenData | None,
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
        self.ranks = current_ranks()
        check_batch_split(train, self.ranks, config.post.method)
        self.device = rank_device(pick_device(train.device), self.ranks)
        self.precision = resolve_precision(train.precision, self.device)
        torch.manual_seed(train.seed)
        self.model = LanguageModel(config.model).to(self.device)
        self.model.set_activation_checkpointing(train.activation_checkpointing)
        if train.tbptt:
            refuse_growing_caches(self.model)
        if resume_from is None and config.parent.run:
            load_parent_weights(self.model, config.parent)
        self.adapter = add_lora(self.model, config.post) if config.post.lora else None
        """A LoRA run's PEFT config; its adapters train with AdamW (Muon's orthogonalised
        update is for full-rank hidden matrices, not low-rank factors)."""
        if resume_from is not None and resume_from.sharded is None:
            load_weights(self.model, resume_from.model, self.run_dir)
        self.comm: CommClock | None = None
        """The communication clock of a job of several processes."""
        module: nn.Module = self.model
        if self.ranks.several:
            module, self.comm = make_parallel(self.model, train.parallel, self.device)
        settings = dataclasses.replace(train, optimizer="adamw") if self.adapter else train
        self.optimizers = build_optimizers(self.model, settings, self.device)
        self.state = TrainerState()
        self.task: Task = (
            LanguageModelingTask(self, data)
            if config.post.method == "none"
            else task_factory(config.post.method)(self)
        )
        if resume_from is not None:
            self._restore(resume_from)
        self.forward = torch.compile(module) if train.compile else module
        self.train_step = TrainStep(
            self.model,
            self.optimizers,
            train.grad_accum,
            train.grad_clip,
            sync=lambda last: gradient_sync(module, last),
        )
        self.budget = budget_for(config)
        self.metrics = (
            MetricsLog(
                run_dir / METRICS_FILE,
                keep_through_step=self.state.step,
                tensorboard_dir=run_dir / "tensorboard" if train.tensorboard else None,
            )
            if self.ranks.main
            else None
        )
        self.data_stats = self.task.start_metrics()
        if self.data_stats is not None and self.metrics is not None:
            fresh_log = (run_dir / METRICS_FILE).stat().st_size == 0  # not a resume before step 1
            if fresh_log:
                self.metrics.write({"kind": "data", "step": 0, **self.data_stats})
        self.progress = Progress(enabled=show_progress and self.ranks.main)
        self.flops_per_token = 3 * self.model.flops_per_token(config.data.seq_len)
        self.stop = StopRequest(second_signal_raises=not self.ranks.several)
        self.stop_agreed = False
        """A stop request seen by any rank, as all ranks learnt it at the end of a step."""
        self.registry = registry.run_registry(run_dir.parent)
        """The run registry this run records itself in (compare, scale and search point it at
        theirs)."""
        self.eval_listeners: list[Callable[[dict], None]] = []
        """Called with each evaluation's result (step, tokens, loss, bits_per_byte, ...) after
        it is logged; an exception raised there stops training (e.g. a search pruning a trial)."""

    def _restore(self, checkpoint: Checkpoint) -> None:
        """Everything but the weights of an unsharded checkpoint, which are loaded before the
        model is made parallel; a sharded one loads into the model as it is sharded now."""
        try:
            if checkpoint.sharded is not None:
                load_model_and_optimizers(
                    self.model, self.optimizers.optimizers, checkpoint.sharded, checkpoint.optimizer
                )
            else:
                self.optimizers.load_state_dict(checkpoint.optimizer, self.model)
        except (ValueError, KeyError) as exc:
            raise LmlabError(
                f"the optimiser state in {checkpoint.path} does not fit train.optimizer="
                f"{self.config.train.optimizer} ({exc}); resume with the original optimizer"
            ) from None
        saved = dict(checkpoint.trainer)
        saved.pop("origin", None)
        own = {key: saved.pop(key) for key in vars(TrainerState()) if key in saved}
        self.state = TrainerState(**own)
        self.task.load_state_dict(saved)  # the rest is the task's (stream position, ...)
        restore_rng_state(checkpoint.rng_of(self.ranks.rank))

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision as the run is configured, for a task's forward passes."""
        return autocast(self.device, self.precision)

    def shard(self) -> tuple[int, int]:
        """This rank's part of every batch: (rank, world size)."""
        return self.ranks.rank, self.ranks.world_size

    def evaluate(self) -> dict[str, float]:
        return self.task.evaluate()

    def save(self) -> Path:
        """A checkpoint of everything a resume needs (and, for a LoRA run, the adapter apart
        in ``adapter/``); in a job of several processes a sharded one, which every rank writes
        together (``torch.distributed.checkpoint``)."""
        trainer_state = dict(vars(self.state), origin=run_origin(self.config, self.tokenizer))
        trainer_state.update(self.task.state_dict())
        if self.adapter is not None:
            save_adapter(self.model, self.adapter, self.config, self.run_dir)
        keep = self.config.train.keep_checkpoints
        if self.ranks.several:
            return save_sharded_checkpoint(
                self.run_dir,
                self.state.step,
                self.model,
                self.optimizers.optimizers,
                trainer_state,
                self.ranks,
                keep_last=keep,
            )
        return save_checkpoint(
            self.run_dir,
            self.state.step,
            self.model.state_dict(),
            self.optimizers.state_dict(self.model),
            trainer_state,
            rng=capture_rng_state(),
            keep_last=keep,
        )

    def train(self) -> dict:
        """Run until the budget is spent; returns the summary (also written to summary.json).

        Torch's process-wide settings apply only meanwhile. SIGINT or SIGTERM stops training
        after the current step: that step is saved, then KeyboardInterrupt is raised, and
        ``lmlab train --resume`` continues exactly. The run is recorded in the run registry
        when it starts and however it ends."""
        recording = (
            registry.recording(self.run_dir, self.registry, self.config)
            if self.ranks.main
            else contextlib.nullcontext({})
        )
        with recording as record:
            try:
                with torch_settings(self.config.train, self.device), self.stop.installed():
                    self._loop()
                record["summary"] = self._write_summary()  # while the run folder is held
            finally:
                self.progress.close()
                if self.metrics is not None:
                    self.metrics.close()
                if self.hold is not None:
                    self.hold.release()
        return record["summary"]

    def _loop(self) -> None:
        train, budget, state = self.config.train, self.budget, self.state
        self.model.train()
        while not budget.done(state.step, state.elapsed):
            if self.stop_agreed if self.ranks.several else self.stop.requested:
                self.save()
                raise KeyboardInterrupt
            self._step()
            last = budget.done(state.step, state.elapsed)
            if state.step % train.eval_interval == 0 or last:
                self._evaluate_now()
            if state.step % train.checkpoint_interval == 0 or last:
                self.save()
        if not state.last_eval or state.last_eval.get("step") != state.step:
            self._evaluate_now()  # a resumed run whose budget was already spent
            self.save()

    def _step(self) -> None:
        """One optimiser step at the schedule's rate, then its metrics row."""
        state = self.state
        seq_len = seq_len_at(self.config, state.step)
        started = time.perf_counter()
        tokens = 0

        def batch(micro: int) -> Any:
            nonlocal tokens
            drawn = self.task.batch(state.step, micro, seq_len)
            tokens += self.task.tokens(drawn)
            return drawn

        result = self.train_step(
            state.step + 1,
            self._lr_multiplier(),
            batch,
            lambda drawn: self.task.loss(self.forward, drawn),
        )
        per_rank = self._agree(result, time.perf_counter() - started)
        if not math.isfinite(result.loss):
            raise LmlabError(
                f"loss became {result.loss} at step {state.step}; lower train.lr or raise "
                "train.warmup_steps, then resume from the last checkpoint"
            )
        step_time = max(per_rank["step_ms"]) / 1000
        tokens *= self.ranks.world_size  # every rank read its equal share
        state.step += 1
        state.tokens += tokens
        state.elapsed += step_time
        if self.metrics is None:
            return
        row = self._metrics_row(result, seq_len, tokens, step_time)
        if self.ranks.several:
            row["ranks"] = per_rank
        self.metrics.write(row)
        self.progress.update(
            state.step,
            self.budget,
            state.elapsed,
            result.loss,
            row["tokens_per_s"],
            state.last_eval.get("loss"),
        )

    def _agree(self, result: StepResult, step_time: float) -> dict[str, list[float]]:
        """Share this step's numbers between the ranks (one all-gather): the mean loss over
        ranks replaces this rank's in ``result``, a stop request on any rank stops all of them,
        and every rank's time, tokens/s and communication time is returned, by rank (each rank
        takes the slowest rank's time, so their clocks and time budgets agree)."""
        comm_ms = self.comm.pop_ms() if self.comm is not None else 0.0
        table = gather_numbers(
            [result.loss, result.aux_loss, 1000 * step_time, comm_ms, float(self.stop.requested)]
        )
        result.loss, result.aux_loss = table[:, 0].mean().item(), table[:, 1].mean().item()
        self.stop_agreed = bool(table[:, 4].any())
        rank_tokens = self.config.train.batch_size // self.ranks.world_size
        rank_tokens *= self.config.train.grad_accum * seq_len_at(self.config, self.state.step)
        return {
            "step_ms": table[:, 2].tolist(),
            "tokens_per_s": (1000 * rank_tokens / table[:, 2]).tolist(),
            "comm_ms": table[:, 3].tolist(),
        }

    def _lr_multiplier(self) -> float:
        train, state = self.config.train, self.state
        return lr_multiplier(
            train.schedule,
            state.step,
            self.budget.progress(state.step, state.elapsed),
            train.warmup_steps,
            train.min_lr_ratio,
            train.decay_fraction,
        )

    def _metrics_row(self, result: StepResult, seq_len: int, tokens: int, step_time: float) -> dict:
        """The ``train`` row of the step just taken (the model's statistics since the last
        row included)."""
        row = {
            "kind": "train",
            "step": self.state.step,
            "tokens": self.state.tokens,
            "loss": result.loss,
            "aux_loss": result.aux_loss,
            "lr": self.optimizers.learning_rates(),
            "grad_norm": result.grad_norm,
            "grad_norm_layers": result.grad_norm_layers,
            "seq_len": seq_len,
            "tokens_per_s": tokens / step_time,
            "step_ms": 1000 * step_time,
            "time_ms": {
                "data": 1000 * result.data_s,
                "forward_backward": 1000 * result.forward_backward_s,
                "optimizer": 1000 * result.optimizer_s,
            },
            "peak_memory_mb": peak_memory_bytes(self.device) / 2**20,
        }
        statistics = self.model.pop_statistics()
        if statistics:
            row["statistics"] = statistics
        row["feature_calls"] = result.feature_calls
        task_metrics = self.task.step_metrics()
        if task_metrics:
            row["task"] = task_metrics
        return row

    def _evaluate_now(self) -> None:
        started = time.perf_counter()
        result = self.evaluate()
        eval_ms = 1000 * (time.perf_counter() - started)
        result.update(step=self.state.step, tokens=self.state.tokens, eval_ms=eval_ms)
        self.state.last_eval = result
        self.state.best_val_loss = min(self.state.best_val_loss, result["loss"])
        if self.metrics is not None:
            self.metrics.write({"kind": "eval", **result, "elapsed_s": self.state.elapsed})
        self.progress.note(
            f"step {self.state.step}: val loss {result['loss']:.4f}, "
            f"{result['bits_per_byte']:.4f} bits/byte"
        )
        for listener in self.eval_listeners:
            listener(result)

    def _write_summary(self) -> dict:
        """The run's summary (rank 0 writes it, with the model's end-of-training files)."""
        state = self.state
        if not self.ranks.main:
            return {"run": str(self.run_dir), "steps": state.step, "tokens": state.tokens}
        self.model.on_training_end(self.run_dir, self.tokenizer.decode)
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
            "trainable_parameters": trainable_parameters(self.model)[0],
            "training_flops_per_token": self.flops_per_token,
            "device": str(self.device),
            "processes": self.ranks.world_size,
            "parallel": self.config.train.parallel if self.ranks.several else "none",
            "precision": self.precision,
            "tokenizer": self.tokenizer.kind,
            "vocab_size": self.tokenizer.vocab_size,
        }
        if self.config.parent.run:
            summary["parent"] = vars(self.config.parent)
        if self.data_stats is not None:
            summary["data"] = self.data_stats
        for key, value in state.last_eval.items():  # a task's own results (accuracy, ...)
            if key not in SUMMARY_EVAL_SKIP:
                summary[f"val_{key}"] = value
        atomic_write_json(self.run_dir / SUMMARY_FILE, summary)
        return summary
