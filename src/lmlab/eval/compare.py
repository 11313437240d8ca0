"""``lmlab compare``: is B better than A at the same budget?

Every arm trains under the same budget (tokens, FLOPs or wall time) with the same seeds; seed
index *i* sets ``train.seed = i``, which fixes both the initial weights and the batch order, so
run *i* of every arm sees the same batches and the arms can be compared seed by seed
(:mod:`lmlab.eval.stats`). The compare folder holds one run folder per arm and seed
(``runs/<arm>/seed<i>/``); rerunning the same command reuses finished runs, resumes unfinished
ones from their checkpoints and starts the missing ones. A run that crashes is reported as
failed; the others still run.
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
from lmlab.config.schema import Config
from lmlab.errors import LmlabError
from lmlab.eval import registry
from lmlab.eval.stats import METRICS, Rule, decide, describe, load_rule
from lmlab.train.checkpoint import atomic_write_json, atomic_write_text
from lmlab.train.metrics import read_metrics
from lmlab.train.run import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE

PLAN_FILE = "plan.json"
RESULTS_FILE = "results.json"
PROBES_FILE = "probes.json"
MIN_EVALS = 8
"""Token and FLOP budgets lower ``train.eval_interval`` so each run evaluates at least this
often: the curves, their area and the time to target need points."""

_SCALES = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "B": 1e9, "T": 1e12, "P": 1e15}
_SECONDS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True)
class CompareBudget:
    """What every arm gets: ``tokens``, ``flops`` (training FLOPs) or ``time`` (seconds)."""

    kind: str
    amount: float
    text: str


def parse_budget(text: str) -> CompareBudget:
    """``tokens=2M``, ``flops=1e15`` or ``time=10m`` (suffixes k/M/G/T/P; s/m/h for time)."""
    kind, _, raw = text.partition("=")
    scales = _SECONDS if kind == "time" else _SCALES
    match = re.fullmatch(r"\s*([0-9.]+(?:e[+-]?[0-9]+)?)\s*([a-zA-Z]?)\s*", raw, re.IGNORECASE)
    if kind not in ("tokens", "flops", "time") or not match or match.group(2) not in scales:
        raise LmlabError(
            f"--budget {text!r} is malformed; use tokens=N, flops=N or time=N, "
            "e.g. tokens=2M, flops=1e15, time=10m"
        )
    try:
        amount = float(match.group(1)) * scales[match.group(2)]
    except ValueError:
        raise LmlabError(f"--budget {text!r} has no valid number; e.g. tokens=2M") from None
    if not math.isfinite(amount) or amount <= 0:
        raise LmlabError(f"--budget {text!r} must be positive")
    return CompareBudget(kind, amount, text)


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


@dataclass
class ComparePlan:
    """Everything decided before any training: arms, budget, seeds, rule, folders."""

    out: Path
    arms: list[Arm]
    baseline: str
    seeds: int
    budget: CompareBudget
    rule: Rule
    target: float | None
    parallel: int
    runs: list[RunSpec] = field(default_factory=list)


def _threads_per_process(parallel: int) -> int:
    """Torch threads for each of ``parallel`` processes, so together they fill the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // parallel)


def _arm_name(text: str) -> str:
    return re.sub(r"[^\w.+=-]", "_", text)


def _variant_name(base: str, override: str) -> str:
    key, _, value = override.partition("=")
    return f"{base}+{key.split('.')[-1]}={value}"


def _vocab_size(config: Config, cache: dict[str, int]) -> int:
    """The model's vocabulary: set in the config, or the tokenizer's (trained once per data)."""
    if config.model.vocab_size:
        return config.model.vocab_size
    from lmlab.data.dataset import prepare_data

    key = repr(config.data)
    if key not in cache:
        cache[key] = prepare_data(config.data)[1].vocab_size
    return cache[key]


def build_arm(
    name: str, source: str, overrides: list[str], budget: CompareBudget, cache: dict[str, int]
) -> Arm:
    """Validate an arm's config, build its model (on the meta device: no memory, no time) and
    turn the budget into the arm's settings."""
    from lmlab.model.lm import LanguageModel

    try:
        config = build_config(source, overrides)
        if config.data.path and not Path(config.data.path).exists():
            raise LmlabError(f"data.path {config.data.path} does not exist")
        sized = copy.deepcopy(config.model)
        sized.vocab_size = _vocab_size(config, cache) if budget.kind == "flops" else 256
        try:
            with torch.device("meta"):
                model = LanguageModel(sized)
        except LmlabError:
            raise
        except Exception:  # a layer computing values while constructed cannot use meta tensors
            model = LanguageModel(sized)
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
    else:
        tokens = int(budget.amount if budget.kind == "tokens" else budget.amount / flops)
        if tokens < per_step:
            raise LmlabError(
                f"--budget {budget.text} gives arm {name} {tokens} tokens, less than one "
                f"training step ({per_step} = batch_size x grad_accum x seq_len); raise the budget"
            )
        train.max_time, train.max_tokens = 0.0, tokens
        steps = math.ceil(tokens / per_step)
        train.eval_interval = min(train.eval_interval, max(1, steps // MIN_EVALS))
    config.validate()
    return Arm(name, source, overrides, config, flops, tokens)


def _check_tokenizers(arms: list[Arm], rule: Rule) -> None:
    """Nats per token mean different things under different tokenizers: refuse them."""
    kinds = {
        arm.name: arm.config.data.tokenizer
        + (f"-{arm.config.data.vocab_size}" if arm.config.data.tokenizer == "bpe" else "")
        for arm in arms
    }
    if METRICS[rule.metric].per_token and len(set(kinds.values())) > 1:
        listed = ", ".join(f"{name}: {kind}" for name, kind in kinds.items())
        raise LmlabError(
            f"arms use different tokenizers ({listed}), so {rule.metric} in nats/token is not "
            "comparable; set the rule's metric to val_bits_per_byte (bits per byte)"
        )


def plan_compare(
    sources: list[str],
    *,
    budget: str,
    variants: list[str] | tuple[str, ...] = (),
    overrides: list[str] | tuple[str, ...] = (),
    seeds: int = 3,
    baseline: str | None = None,
    rule: str | Path | None = None,
    out: str | Path | None = None,
    target: float | None = None,
    parallel: int = 0,
) -> ComparePlan:
    """Check every input and decide every run; raises :class:`LmlabError` on bad input before
    anything trains. ``variants`` add arms: the first source plus one ``key=value`` each;
    ``overrides`` apply to every arm."""
    if not sources:
        raise LmlabError("give at least one config (a preset or YAML file) to compare")
    if len(sources) + len(variants) < 2:
        raise LmlabError(
            "compare needs two arms: give two configs, or one config and --variant key=value"
        )
    if seeds < 1:
        raise LmlabError(f"--seeds {seeds} must be at least 1 (3 or more for a verdict)")
    if parallel < 0:
        raise LmlabError(f"--parallel {parallel} must be 0 (in this process) or a process count")
    for variant in variants:
        if "=" not in variant:
            raise LmlabError(f"--variant {variant!r} must look like section.key=value")
    parsed_budget = parse_budget(budget)
    parsed_rule = load_rule(rule)
    wanted = [(Path(s).stem if s.endswith((".yaml", ".yml")) else s, s, []) for s in sources]
    wanted += [(_variant_name(wanted[0][0], v), sources[0], [v]) for v in variants]
    arms: list[Arm] = []
    cache: dict[str, int] = {}
    for label, source, extra in wanted:
        name = _arm_name(label)
        taken = {arm.name for arm in arms}
        suffix = 2
        unique = name
        while unique in taken:
            unique, suffix = f"{name}-{suffix}", suffix + 1
        arms.append(build_arm(unique, source, [*overrides, *extra], parsed_budget, cache))
    _check_tokenizers(arms, parsed_rule)
    names = [arm.name for arm in arms]
    chosen = baseline or names[0]
    if chosen not in names:
        raise LmlabError(f"--baseline {chosen!r} is not an arm; arms: {', '.join(names)}")
    folder = (
        Path(out) if out else Path(arms[0].config.out_dir) / ("compare-" + "-vs-".join(names))[:120]
    )
    plan = ComparePlan(folder, arms, chosen, seeds, parsed_budget, parsed_rule, target, parallel)
    plan.runs = [spec for arm in arms for spec in seed_runs(arm, seeds, folder, parallel)]
    return plan


def seed_runs(arm: Arm, seeds: int, folder: Path, parallel: int = 0) -> list[RunSpec]:
    """The runs of one arm: seed index i sets ``train.seed = i``, in ``folder/runs/<arm>/seed<i>``
    (with a share of the cores when ``parallel`` processes train at once)."""
    specs = []
    for seed in range(seeds):
        config = copy.deepcopy(arm.config)
        config.train.seed = seed
        config.out_dir = str(folder / "runs" / arm.name)
        config.name = f"seed{seed}"
        if parallel:
            config.train.threads = _threads_per_process(parallel)
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


def _check_plan_file(plan: ComparePlan) -> None:
    """Refuse to mix runs of different settings in one folder; remember this plan's."""
    path = plan.out / PLAN_FILE
    saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    hashes = {spec.key: registry.config_hash(spec.config) for spec in plan.runs}
    for spec in plan.runs:
        before = saved.get(spec.key)
        if before and before != hashes[spec.key] and (spec.run_dir / CONFIG_FILE).exists():
            raise LmlabError(
                f"{plan.out} already holds {spec.key} trained with other settings (budget or "
                "config changed); use another --out or delete that folder"
            )
    atomic_write_json(path, {**saved, **hashes})


def _how(spec: RunSpec) -> str:
    if (spec.run_dir / SUMMARY_FILE).is_file():
        return "reused"
    return "resumed" if (spec.run_dir / CONFIG_FILE).is_file() else "new"


def _log_path(plan: ComparePlan, spec: RunSpec) -> Path:
    return plan.out / "logs" / f"{spec.arm.name}-seed{spec.seed}.log"


def _config_path(plan: ComparePlan, spec: RunSpec) -> Path:
    return plan.out / "configs" / f"{spec.arm.name}-seed{spec.seed}.yaml"


def _threads_override(spec: RunSpec) -> list[str]:
    return [f"train.threads={spec.config.train.threads}"]


def _train_in_process(plan: ComparePlan, spec: RunSpec, how: str, show_progress: bool) -> None:
    """Train one run here; a crash is written to its log and re-raised for the caller.

    Torch's process-wide settings that a run may change (threads, deterministic algorithms)
    are restored afterwards, so one arm's settings never slow down or alter the next arm."""
    from lmlab.train.launch import new_trainer, resume_trainer

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    try:
        if how == "resumed":
            trainer = resume_trainer(str(spec.run_dir), _threads_override(spec), show_progress)
        else:
            trainer = new_trainer(copy.deepcopy(spec.config), spec.arm.name, show_progress)
        trainer.train()
    except Exception:
        log = _log_path(plan, spec)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(traceback.format_exc(), encoding="utf-8")
        raise
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    detail = text[0] if text else ""
    return detail if isinstance(exc, LmlabError) else f"{type(exc).__name__}: {detail}"


def _subprocess_command(plan: ComparePlan, spec: RunSpec, how: str) -> list[str]:
    base = [sys.executable, "-m", "lmlab.cli", "train", "--quiet"]
    if how == "resumed":
        return [*base, "--resume", str(spec.run_dir), *_threads_override(spec)]
    return [*base, "--config", str(_config_path(plan, spec))]


def _last_line(path: Path) -> str:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    return (errors or [line for line in lines if line.strip()] or ["no output"])[-1]


def _run_parallel(
    plan: ComparePlan, todo: list[tuple[RunSpec, str]], report: Callable[[Outcome], None]
) -> list[Outcome]:
    """Train in ``plan.parallel`` child processes at once (each ``lmlab train``)."""
    pending = list(todo)
    running: dict[subprocess.Popen, tuple[RunSpec, str, float]] = {}
    outcomes = []
    try:
        while pending or running:
            while pending and len(running) < plan.parallel:
                spec, how = pending.pop(0)
                log = _log_path(plan, spec)
                log.parent.mkdir(parents=True, exist_ok=True)
                with log.open("w", encoding="utf-8") as stream:
                    process = subprocess.Popen(
                        _subprocess_command(plan, spec, how),
                        stdout=stream,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                running[process] = (spec, how, time.perf_counter())
            time.sleep(0.05)
            for process in [p for p in running if p.poll() is not None]:
                spec, how, started = running.pop(process)
                error = None
                if process.returncode != 0:
                    error = f"exit code {process.returncode}: {_last_line(_log_path(plan, spec))}"
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
    plan: ComparePlan, show_progress: bool, registry_location: str | Path | None
) -> list[Outcome]:
    todo = [(spec, _how(spec)) for spec in plan.runs]
    total = len(todo)
    done = [Outcome(spec, how) for spec, how in todo if how == "reused"]
    todo = [(spec, how) for spec, how in todo if how != "reused"]
    for spec in plan.runs:
        _config_path(plan, spec).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(_config_path(plan, spec), dump_config(spec.config))
    if done:
        print(f"reusing {len(done)} finished run(s) of {total}", file=sys.stderr)
        _record_runs(plan, done, registry_location)

    def report(outcome: Outcome) -> None:
        state = f"failed: {outcome.error}" if outcome.error else "finished"
        print(f"{outcome.spec.key} {state} ({outcome.wall_seconds:.1f}s)", file=sys.stderr)
        _record_runs(plan, [outcome], registry_location)

    if plan.parallel:
        for spec, how in todo:
            print(f"{spec.key}: {how} run in {spec.run_dir}", file=sys.stderr)
        return done + _run_parallel(plan, todo, report)
    for index, (spec, how) in enumerate(todo, start=len(done) + 1):
        print(f"[{index}/{total}] {spec.key}: {how} run in {spec.run_dir}", file=sys.stderr)
        started = time.perf_counter()
        error = None
        try:
            _train_in_process(plan, spec, how, show_progress)
        except Exception as exc:
            error = _error_text(exc)
        outcome = Outcome(spec, how, error, time.perf_counter() - started)
        done.append(outcome)
        report(outcome)
    return done


def _record_runs(plan: ComparePlan, outcomes: list[Outcome], location: str | Path | None) -> None:
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
                compare=str(plan.out.resolve()),
            )
        )
    registry.record_runs(rows, location)


# ------------------------------------------------------------------------ measuring


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


def time_to_target(xs: list[float], ys: list[float], target: float) -> float | None:
    """Where a falling curve first reaches ``target``, linearly interpolated between the last
    evaluation above it and the first at or below it; None if it never does."""
    for i, y in enumerate(ys):
        if y <= target:
            if i == 0 or ys[i - 1] == y:
                return float(xs[i])
            fraction = (ys[i - 1] - target) / (ys[i - 1] - y)
            return float(xs[i - 1] + fraction * (xs[i] - xs[i - 1]))
    return None


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


ARM_STATS = (
    "val_bits_per_byte",
    "best_val_bits_per_byte",
    "auc_bits_per_byte",
    "val_loss",
    "best_val_loss",
    "auc_loss",
    "tokens",
    "train_seconds",
    "tokens_per_s",
    "peak_memory_mb",
)


def _mean(values: list[float]) -> float:
    return float(np.mean(values))


def analyse(plan: ComparePlan, outcomes: list[Outcome]) -> dict:
    """Per-run records, per-arm statistics and one verdict per candidate."""
    records = []
    for outcome in sorted(outcomes, key=lambda o: (plan.arms.index(o.spec.arm), o.spec.seed)):
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
                record.update(collect_run(spec.run_dir))
            except (OSError, KeyError, ValueError) as exc:
                record.update(status="failed", error=f"unreadable results: {exc}")
        records.append(record)
    finished = [r for r in records if r["status"] == "finished"]
    by_arm = {
        arm.name: {r["seed"]: r for r in finished if r["arm"] == arm.name} for arm in plan.arms
    }

    target = plan.target
    baseline_runs = by_arm[plan.baseline]
    if target is None and baseline_runs:
        target = float(np.median([r["val_bits_per_byte"] for r in baseline_runs.values()]))
    for record in finished:
        bpb = [p["bits_per_byte"] for p in record["curve"]]
        for key, axis in (("time_to_target_s", "seconds"), ("tokens_to_target", "tokens")):
            xs = [p[axis] for p in record["curve"]]
            record[key] = time_to_target(xs, bpb, target) if target is not None else None

    arms = []
    for arm in plan.arms:
        runs = list(by_arm[arm.name].values())
        reached = [r["time_to_target_s"] for r in runs if r["time_to_target_s"] is not None]
        probe_names = sorted({name for r in runs for name in r["probes"]})
        feature_names = sorted({name for r in runs for name in r["feature_calls"]})
        arms.append(
            {
                "name": arm.name,
                "source": arm.source,
                "overrides": arm.overrides,
                "baseline": arm.name == plan.baseline,
                "parameters": runs[0]["parameters"] if runs else None,
                "training_flops_per_token": (
                    runs[0]["training_flops_per_token"] if runs else arm.flops_per_token
                ),
                "token_budget": arm.tokens,
                "finished": len(runs),
                "failed": sum(1 for r in records if r["arm"] == arm.name) - len(runs),
                "stats": {key: describe([r[key] for r in runs]) for key in ARM_STATS},
                "time_to_target_s": describe(reached),
                "reached_target": len(reached),
                "probes": {
                    name: _mean([r["probes"][name] for r in runs if name in r["probes"]])
                    for name in probe_names
                },
                "feature_calls_min": {
                    name: min(r["feature_calls"].get(name, 0) for r in runs)
                    for name in feature_names
                },
            }
        )

    metric = plan.rule.metric
    base = next(a for a in arms if a["baseline"])
    verdicts = []
    for arm in arms:
        if arm["baseline"]:
            continue
        shared = sorted(set(arm["probes"]) & set(base["probes"]))
        verdict = decide(
            plan.rule,
            arm["name"],
            plan.baseline,
            {seed: r[metric] for seed, r in baseline_runs.items()},
            {seed: r[metric] for seed, r in by_arm[arm["name"]].items()},
            expected_pairs=plan.seeds,
            probe_changes={p: arm["probes"][p] - base["probes"][p] for p in shared},
            features=arm["feature_calls_min"],
        )
        verdicts.append(verdict.to_dict())

    return {
        "compare": plan.out.name,
        "path": str(plan.out),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "budget": {
            "kind": plan.budget.kind,
            "amount": plan.budget.amount,
            "text": plan.budget.text,
        },
        "seeds": plan.seeds,
        "baseline": plan.baseline,
        "rule": vars(plan.rule),
        "target_bits_per_byte": target,
        "arms": arms,
        "runs": records,
        "verdicts": verdicts,
        "failed": [f"{r['arm']}/seed{r['seed']}: {r['error']}" for r in records if r["error"]],
    }


def train_runs(
    plan: ComparePlan, show_progress: bool = True, registry_location: str | Path | None = None
) -> list[Outcome]:
    """Train (or reuse, or resume) every run of ``plan`` in its folder, recording each in the
    run registry; shared by ``compare``, ``scale`` and any command that trains a set of runs."""
    plan.out.mkdir(parents=True, exist_ok=True)
    _check_plan_file(plan)
    return _execute(plan, show_progress, registry_location)


def run_compare(
    plan: ComparePlan,
    show_progress: bool = True,
    registry_location: str | Path | None = None,
) -> dict:
    """Train (or reuse) every run of ``plan``, then write ``results.json``, ``report.md`` and
    the plots in the compare folder and record the comparison in the run registry."""
    from lmlab.eval.report import write_report

    started = time.perf_counter()
    outcomes = train_runs(plan, show_progress, registry_location)
    results = analyse(plan, outcomes)
    results["wall_seconds"] = time.perf_counter() - started
    atomic_write_json(plan.out / RESULTS_FILE, results)
    write_report(results, plan.out)
    registry.record_compare(
        plan.out.name,
        plan.out,
        baseline=plan.baseline,
        arms=[arm.name for arm in plan.arms],
        budget=plan.budget.text,
        seeds=plan.seeds,
        verdicts={v["candidate"]: v["decision"] for v in results["verdicts"]},
        status="failed runs" if results["failed"] else "finished",
        location=registry_location,
    )
    return results


def summary_lines(results: dict) -> list[str]:
    """What ``lmlab compare`` prints at the end."""
    runs = results["runs"]
    counts = {how: sum(1 for r in runs if r["how"] == how) for how in ("new", "resumed", "reused")}
    lines = [
        f"compare {results['path']}: {len(runs)} runs ("
        + ", ".join(f"{n} {how}" for how, n in counts.items() if n)
        + f"), {len(results['failed'])} failed"
    ]
    for arm in results["arms"]:
        final = arm["stats"]["val_bits_per_byte"]
        value = f"{final['mean']:.4f} ± {final['sd']:.4f}" if final["n"] else "no finished run"
        lines.append(f"  {arm['name']}: final {value} bits/byte ({final['n']} seeds)")
    for verdict in results["verdicts"]:
        lines.append(f"{verdict['candidate']} vs {verdict['baseline']}: {verdict['decision']}")
        lines.extend(f"  - {reason}" for reason in verdict["reasons"])
    lines.extend(f"FAILED {failure}" for failure in results["failed"])
    lines.append(f"report: {Path(results['path']) / 'report.md'}")
    return lines
