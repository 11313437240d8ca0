"""Training a set of runs: the one home that ``compare``, ``scale`` and ``search`` share.

A run set is a list of run specifications (an arm's config at one seed index, in its own run
folder) under one output folder. Training it reuses finished runs, resumes unfinished ones from
their checkpoints and starts the missing ones, in this process or in several child processes;
a run that crashes is reported as failed and the others still run. Every run is recorded in the
run registry however it ends.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lmlab.config.load import build_config, dump_config
from lmlab.config.schema import Config, ModelConfig
from lmlab.data.dataset import prepare_data
from lmlab.errors import LmlabError, ParamError
from lmlab.files import atomic_write_json, atomic_write_text
from lmlab.model.lm import LanguageModel
from lmlab.posttrain.launch import start_run
from lmlab.train import registry
from lmlab.train.launch import resume_trainer
from lmlab.train.metrics import read_metrics
from lmlab.train.run import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE

PLAN_FILE = "plan.json"
PROBES_FILE = "probes.json"
MIN_EVALS = 8
"""Token and FLOP budgets lower ``train.eval_interval`` so each run evaluates at least this
often: the curves, their area and the time to target need points."""

_SCALES = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "B": 1e9, "T": 1e12, "P": 1e15}
_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class Budget:
    """What every arm gets: ``tokens``, ``flops`` (training FLOPs), ``time`` (seconds) or
    ``steps``."""

    kind: str
    amount: float
    text: str


BUDGET_KINDS = ("tokens", "flops", "time", "steps")
"""``steps`` gives every arm the same optimiser steps: equal tokens for arms of the same batch
and data (post-training arms, whose examples are not counted in fixed windows)."""


def parse_budget(text: str) -> Budget:
    """``tokens=2M``, ``flops=1e15``, ``time=10m`` or ``steps=500`` (suffixes k/M/G/T/P; s/m/h
    for time)."""
    kind, _, raw = text.partition("=")
    scales = _SECONDS if kind == "time" else _SCALES
    match = re.fullmatch(r"\s*([0-9.]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z]?)\s*", raw, re.IGNORECASE)
    if kind not in BUDGET_KINDS or not match or match.group(2) not in scales:
        raise ParamError(
            f"<budget> {text!r} is malformed; use tokens=N, flops=N, time=N or steps=N, "
            "e.g. tokens=2M, flops=1e15, time=10m, steps=500",
            "budget",
        )
    try:
        amount = float(match.group(1)) * scales[match.group(2)]
    except ValueError:
        raise ParamError(
            f"<budget> {text!r} has no valid number; e.g. tokens=2M", "budget"
        ) from None
    if not math.isfinite(amount) or amount <= 0:
        raise ParamError(f"<budget> {text!r} must be positive", "budget")
    if kind == "steps" and amount != int(amount):
        raise ParamError(f"<budget> {text!r} must be a whole number of steps", "budget")
    return Budget(kind, amount, text)


@dataclass
class Arm:
    """One configuration under comparison."""

    name: str
    source: str
    overrides: list[str]
    config: Config
    flops_per_token: float | None
    """Training FLOPs per token (3x the forward pass, as the trainer counts them) under a FLOP
    budget; None otherwise (it needs the tokenizer's vocabulary, costly to get for BPE)."""
    tokens: int | None
    """The token budget (None under a time budget)."""


@dataclass
class RunSpec:
    """One arm at one seed index: the config it trains and where."""

    arm: Arm
    seed: int
    config: Config

    @property
    def key(self) -> str:
        return f"{self.arm.name}/seed{self.seed}"

    @property
    def run_dir(self) -> Path:
        return Path(self.config.out_dir) / self.config.name


def _threads_per_process(parallel: int) -> int:
    """Torch threads for each of ``parallel`` processes, so together they fill the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // parallel)


def arm_name(text: str) -> str:
    """``text`` as a folder-safe arm name."""
    return re.sub(r"[^\w.+=-]", "_", text)


def variant_name(base: str, override: str) -> str:
    """The name of the arm ``base`` plus one ``key=value`` override: ``base+key=value``."""
    key, _, value = override.partition("=")
    return f"{base}+{key.split('.')[-1]}={value}"


def _vocab_size(config: Config, cache: dict[str, int]) -> int:
    """The model's vocabulary: set in the config, or the tokenizer's (trained once per data)."""
    if config.model.vocab_size:
        return config.model.vocab_size
    key = repr(config.data)
    if key not in cache:
        cache[key] = prepare_data(config.data)[1].vocab_size
    return cache[key]


def build_arm(
    name: str, source: str, overrides: list[str], budget: Budget, cache: dict[str, int]
) -> Arm:
    """Validate an arm's config, build its model (on the meta device: no memory, no time) and
    turn the budget into the arm's settings."""
    try:
        config = build_config(source, overrides)
        if config.data.path and not Path(config.data.path).exists():
            raise LmlabError(f"data.path {config.data.path} does not exist")
        sized = copy.deepcopy(config.model)
        sized.vocab_size = _vocab_size(config, cache) if budget.kind == "flops" else 256
        model = model_skeleton(sized)
    except LmlabError as exc:
        raise LmlabError(f"arm {name}: {exc}") from None
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise LmlabError(
            f"arm {name}: the model does not build ({type(exc).__name__}: {first}); "
            "check its model settings"
        ) from None
    flops = 3 * model.flops_per_token(config.data.seq_len) if budget.kind == "flops" else None
    train = config.train
    per_step = train.batch_size * train.grad_accum * config.data.seq_len
    tokens = None
    if budget.kind == "time":
        train.max_time, train.max_tokens = budget.amount, 0
    elif budget.kind == "steps":
        train.max_steps, train.max_time, train.max_tokens = int(budget.amount), 0.0, 0
        train.eval_interval = min(train.eval_interval, max(1, train.max_steps // MIN_EVALS))
    else:
        tokens = int(budget.amount if budget.kind == "tokens" else budget.amount / flops)
        if tokens < per_step:
            raise ParamError(
                f"<budget> {budget.text} gives arm {name} {tokens} tokens, less than one "
                f"training step ({per_step} = batch_size x grad_accum x seq_len); raise the budget",
                "budget",
            )
        train.max_time, train.max_tokens = 0.0, tokens
        steps = math.ceil(tokens / per_step)
        train.eval_interval = min(train.eval_interval, max(1, steps // MIN_EVALS))
    config.validate()
    return Arm(name, source, overrides, config, flops, tokens)


@dataclass
class RunSet:
    """Runs to train under one folder (logs and configs go to ``out/logs``, ``out/configs``),
    ``parallel`` child processes at once (0: one after another in this process)."""

    out: Path
    runs: list[RunSpec] = field(default_factory=list)
    parallel: int = 0
    nproc_per_run: int = 1
    """Processes of each run (``lmlab train --nproc``): data parallelism inside a run."""


def error_line(exc: BaseException) -> str:
    """One line for a failed run: an :class:`LmlabError`'s message as it is, anything else
    prefixed with its type (a bug's traceback goes to the run's log)."""
    text = str(exc).strip().splitlines()
    detail = text[0] if text else ""
    return detail if isinstance(exc, LmlabError) else f"{type(exc).__name__}: {detail}"


def model_skeleton(model: ModelConfig) -> LanguageModel:
    """The model of ``model`` built on the meta device (no memory, no time) to count its
    parameters and FLOPs; a layer that computes values while constructed is built for real."""
    try:
        with torch.device("meta"):
            return LanguageModel(model)
    except LmlabError:
        raise
    except Exception:
        return LanguageModel(model)


def check_nproc_per_run(nproc_per_run: int, parallel: int) -> None:
    """Several processes per run are started as child jobs, so they need ``parallel``."""
    if nproc_per_run < 1:
        raise ParamError(f"<nproc_per_run>={nproc_per_run} must be at least 1", "nproc_per_run")
    if nproc_per_run > 1 and not parallel:
        raise ParamError(
            f"<nproc_per_run>={nproc_per_run} starts each run as a torchrun job; give "
            "<parallel> >= 1 too (how many such jobs at once)",
            "nproc_per_run",
        )


def seed_runs(
    arm: Arm, seeds: int, folder: Path, parallel: int = 0, nproc_per_run: int = 1
) -> list[RunSpec]:
    """The runs of one arm: seed index i sets ``train.seed = i``, in ``folder/runs/<arm>/seed<i>``
    (with a share of the cores when ``parallel`` jobs of ``nproc_per_run`` processes train at
    once; a run of several processes uses DDP unless its config says FSDP)."""
    specs = []
    for seed in range(seeds):
        config = copy.deepcopy(arm.config)
        config.train.seed = seed
        config.out_dir = str(folder / "runs" / arm.name)
        config.name = f"seed{seed}"
        if nproc_per_run > 1 and config.train.parallel == "none":
            config.train.parallel = "ddp"
        if parallel:
            config.train.threads = _threads_per_process(parallel * nproc_per_run)
        specs.append(RunSpec(arm, seed, config))
    return specs


# ------------------------------------------------------------------------ running


@dataclass
class Outcome:
    """How one run ended in this invocation."""

    spec: RunSpec
    how: str
    """``reused`` (finished before), ``resumed`` or ``new``."""
    error: str | None = None
    wall_seconds: float = 0.0


def _check_plan_file(runset: RunSet) -> None:
    """Refuse to mix runs of different settings in one folder; remember this plan's."""
    path = runset.out / PLAN_FILE
    saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    hashes = {spec.key: registry.config_hash(spec.config) for spec in runset.runs}
    for spec in runset.runs:
        before = saved.get(spec.key)
        if before and before != hashes[spec.key] and (spec.run_dir / CONFIG_FILE).exists():
            raise ParamError(
                f"{runset.out} already holds {spec.key} trained with other settings (budget or "
                "config changed); use another <out> or delete that folder",
                "out",
            )
    atomic_write_json(path, {**saved, **hashes})


def _how(spec: RunSpec) -> str:
    if (spec.run_dir / SUMMARY_FILE).is_file():
        return "reused"
    return "resumed" if (spec.run_dir / CONFIG_FILE).is_file() else "new"


def _log_path(runset: RunSet, spec: RunSpec) -> Path:
    return runset.out / "logs" / f"{spec.arm.name}-seed{spec.seed}.log"


def _config_path(runset: RunSet, spec: RunSpec) -> Path:
    return runset.out / "configs" / f"{spec.arm.name}-seed{spec.seed}.yaml"


def _threads_override(spec: RunSpec) -> list[str]:
    return [f"train.threads={spec.config.train.threads}"]


def _train_in_process(
    runset: RunSet, spec: RunSpec, how: str, show_progress: bool, registry_file: Path
) -> None:
    """Train one run here, recording itself in ``registry_file``; a crash is written to its log
    and re-raised for the caller."""
    try:
        if how == "resumed":
            trainer = resume_trainer(str(spec.run_dir), _threads_override(spec), show_progress)
        else:
            trainer = start_run(copy.deepcopy(spec.config), spec.arm.name, show_progress)
        trainer.registry = registry_file
        trainer.train()
    except Exception:
        log = _log_path(runset, spec)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(traceback.format_exc(), encoding="utf-8")
        raise


def _subprocess_command(runset: RunSet, spec: RunSpec, how: str) -> list[str]:
    base = [sys.executable, "-m", "lmlab", "train", "--quiet"]
    if runset.nproc_per_run > 1:
        base += ["--nproc", str(runset.nproc_per_run)]
    if how == "resumed":
        return [*base, "--resume", str(spec.run_dir), *_threads_override(spec)]
    return [*base, "--config", str(_config_path(runset, spec))]


def _last_line(path: Path) -> str:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    return (errors or [line for line in lines if line.strip()] or ["no output"])[-1]


def _run_parallel(
    runset: RunSet,
    todo: list[tuple[RunSpec, str]],
    report: Callable[[Outcome], None],
    registry_file: Path,
) -> list[Outcome]:
    """Train in ``runset.parallel`` child processes at once (each ``lmlab train``, recording
    itself in ``registry_file``)."""
    env = {**os.environ, registry.REGISTRY_ENV: str(registry_file)}
    pending = list(todo)
    running: dict[subprocess.Popen, tuple[RunSpec, str, float]] = {}
    outcomes = []
    try:
        while pending or running:
            while pending and len(running) < runset.parallel:
                spec, how = pending.pop(0)
                log = _log_path(runset, spec)
                log.parent.mkdir(parents=True, exist_ok=True)
                with log.open("w", encoding="utf-8") as stream:
                    process = subprocess.Popen(
                        _subprocess_command(runset, spec, how),
                        stdout=stream,
                        stderr=subprocess.STDOUT,
                        env=env,
                        start_new_session=True,
                    )
                running[process] = (spec, how, time.perf_counter())
            time.sleep(0.05)
            for process in [p for p in running if p.poll() is not None]:
                spec, how, started = running.pop(process)
                error = None
                if process.returncode != 0:
                    error = f"exit code {process.returncode}: {_last_line(_log_path(runset, spec))}"
                outcome = Outcome(spec, how, error, time.perf_counter() - started)
                outcomes.append(outcome)
                report(outcome)
    except KeyboardInterrupt:
        for process in running:
            process.send_signal(signal.SIGINT)
        for process in running:
            process.wait()
        raise
    return outcomes


def _execute(
    runset: RunSet, show_progress: bool, registry_location: str | Path | None
) -> list[Outcome]:
    registry_file = registry.registry_path(registry_location).resolve()
    todo = [(spec, _how(spec)) for spec in runset.runs]
    total = len(todo)
    done = [Outcome(spec, how) for spec, how in todo if how == "reused"]
    todo = [(spec, how) for spec, how in todo if how != "reused"]
    for spec in runset.runs:
        _config_path(runset, spec).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(_config_path(runset, spec), dump_config(spec.config))
    if done:
        print(f"reusing {len(done)} finished run(s) of {total}", file=sys.stderr)
        _record_runs(runset, done, registry_location)

    def report(outcome: Outcome) -> None:
        state = f"failed: {outcome.error}" if outcome.error else "finished"
        print(f"{outcome.spec.key} {state} ({outcome.wall_seconds:.1f}s)", file=sys.stderr)
        _record_runs(runset, [outcome], registry_location)

    if runset.parallel:
        for spec, how in todo:
            print(f"{spec.key}: {how} run in {spec.run_dir}", file=sys.stderr)
        return done + _run_parallel(runset, todo, report, registry_file)
    for index, (spec, how) in enumerate(todo, start=len(done) + 1):
        print(f"[{index}/{total}] {spec.key}: {how} run in {spec.run_dir}", file=sys.stderr)
        started = time.perf_counter()
        error = None
        try:
            _train_in_process(runset, spec, how, show_progress, registry_file)
        except Exception as exc:
            error = error_line(exc)
        outcome = Outcome(spec, how, error, time.perf_counter() - started)
        done.append(outcome)
        report(outcome)
    return done


def _record_runs(runset: RunSet, outcomes: list[Outcome], location: str | Path | None) -> None:
    """Index runs in the registry (one transaction; a failure there is only a warning)."""
    rows = []
    for outcome in outcomes:
        spec = outcome.spec
        summary = None
        if outcome.error is None:
            with contextlib.suppress(OSError, ValueError):  # unreadable: the analysis says so
                summary = json.loads((spec.run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
        rows.append(
            registry.run_row(
                spec.run_dir,
                status="failed" if outcome.error else "finished",
                config=spec.config,
                summary=summary,
                arm=spec.arm.name,
                seed=spec.seed,
                preset=spec.arm.source,
                compare=str(runset.out.resolve()),
            )
        )
    registry.record_runs(rows, location)


def train_runs(
    runset: RunSet, show_progress: bool = True, registry_location: str | Path | None = None
) -> list[Outcome]:
    """Train (or reuse, or resume) every run of ``runset`` in its folder, recording each in the
    run registry."""
    runset.out.mkdir(parents=True, exist_ok=True)
    _check_plan_file(runset)
    return _execute(runset, show_progress, registry_location)


# ------------------------------------------------------------------------ reading results


def curve_area(xs: list[float], ys: list[float]) -> float | None:
    """Mean height of a curve: trapezoid area over ``xs`` divided by their span (the single
    value when there is one point), so curves of different spans compare."""
    if not xs:
        return None
    span = xs[-1] - xs[0]
    if len(xs) == 1 or span <= 0:
        return float(ys[-1])
    x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2 / span)


def read_probes(run_dir: Path) -> dict[str, float]:
    """Probe scores of a run (higher is better) from ``probes.json``: a mapping of probe name
    to a number or to an object with a ``score``; anything else there is ignored."""
    path = run_dir / PROBES_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        print(f"warning: {path} is not valid JSON; its probe scores are ignored", file=sys.stderr)
        return {}
    scores = {}
    for name, value in data.items() if isinstance(data, dict) else []:
        score = value.get("score") if isinstance(value, dict) else value
        if isinstance(score, int | float) and not isinstance(score, bool):
            scores[str(name)] = float(score)
    return scores


def outcome_record(outcome: Outcome, keys: tuple[str, ...] | None = None) -> dict:
    """One run's record for a study's results: how it ended, and ``keys`` (all by default) of
    what :func:`collect_run` reads from its folder; a folder that cannot be read makes it a
    failed run, not a crash of the study."""
    spec = outcome.spec
    record = {
        "arm": spec.arm.name,
        "seed": spec.seed,
        "path": str(spec.run_dir),
        "how": outcome.how,
        "wall_seconds": outcome.wall_seconds,
        "status": "failed" if outcome.error else "finished",
        "error": outcome.error,
    }
    if outcome.error is None:
        try:
            collected = collect_run(spec.run_dir)
        except (OSError, KeyError, ValueError) as exc:
            record.update(status="failed", error=f"unreadable results: {exc}")
        else:
            record.update({key: collected[key] for key in keys or collected})
    return record


def collect_run(run_dir: Path) -> dict:
    """The numbers a comparison needs from one finished run folder."""
    summary = json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))
    rows = read_metrics(run_dir / METRICS_FILE) if (run_dir / METRICS_FILE).is_file() else []
    evals = {row["tokens"]: row for row in rows if row.get("kind") == "eval"}
    curve = [
        {
            "tokens": row["tokens"],
            "seconds": row["elapsed_s"],
            "loss": row["loss"],
            "bits_per_byte": row["bits_per_byte"],
        }
        for _, row in sorted(evals.items())
    ]
    train_rows = [row for row in rows if row.get("kind") == "train"]
    features: dict[str, int] = {}
    for row in train_rows:
        for name, calls in row.get("feature_calls", {}).items():
            features[name] = features.get(name, 0) + calls
    tokens = [p["tokens"] for p in curve]
    return {
        "val_bits_per_byte": summary["val_bits_per_byte"],
        "best_val_bits_per_byte": min(
            [p["bits_per_byte"] for p in curve], default=summary["val_bits_per_byte"]
        ),
        "val_loss": summary["val_loss"],
        "best_val_loss": summary["best_val_loss"],
        "auc_bits_per_byte": curve_area(tokens, [p["bits_per_byte"] for p in curve]),
        "auc_loss": curve_area(tokens, [p["loss"] for p in curve]),
        "tokens": summary["tokens"],
        "steps": summary["steps"],
        "train_seconds": summary["train_seconds"],
        "eval_seconds": sum(row.get("eval_ms", 0.0) for row in evals.values()) / 1000,
        "tokens_per_s": summary["tokens_per_s"],
        "peak_memory_mb": max((row.get("peak_memory_mb", 0.0) for row in train_rows), default=0),
        "parameters": summary["parameters"],
        "training_flops_per_token": summary["training_flops_per_token"],
        "tokenizer": summary["tokenizer"],
        "feature_calls": features,
        "probes": read_probes(run_dir),
        "curve": curve,
    }
