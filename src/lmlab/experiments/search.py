"""``lmlab search``: explore a config space with Optuna (TPE sampler, successive halving).

A space file names a base config, fixed overrides and the parameters to sample::

    base: gpt-tiny                                  # preset, or YAML path (relative to this file)
    overrides: [model.n_layers=2]                   # optional, applied to every trial
    params:
      train.lr: {low: 1.0e-4, high: 1.0e-2, log: true}   # float (log or linear)
      model.d_model: {low: 32, high: 96, step: 16}       # int when low and high are ints
      model.mixer: [attention, gla]                      # categorical

Each trial is an ordinary run folder (``SEARCH/runs/trial<k>/``) trained at the same budget.
The trainer reports validation bits per byte at every evaluation through its ``eval_listeners``
hook; the objective passes it to ``trial.report`` and stops the run when the successive-halving
pruner says so, which keeps one uninterrupted learning-rate schedule per trial (training in
rungs would restart the schedule at every rung). The study lives in ``SEARCH/study.sqlite3``:
the same command continues it, and a trial cut short by an interruption is tried again.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmlab.config.load import build_config, dump_config, read_source
from lmlab.config.schema import Config
from lmlab.errors import LmlabError, ParamError
from lmlab.experiments.runset import (
    Budget,
    build_arm,
    error_line,
    parse_budget,
)
from lmlab.files import atomic_write_json, atomic_write_text
from lmlab.posttrain.launch import start_run
from lmlab.train import registry
from lmlab.train.metrics import read_metrics
from lmlab.train.run import METRICS_FILE, SUMMARY_FILE, open_run

STUDY_FILE = "study.sqlite3"
STUDY_NAME = "lmlab-search"
BEST_FILE = "best.yaml"
RESULTS_FILE = "results.json"
EVAL_METRIC = "bits_per_byte"
"""Reported to the pruner at every evaluation (the trainer's eval row)..."""
FINAL_METRIC = "val_bits_per_byte"
"""... and the objective: the final value in summary.json. Bits per byte, so a space may
include the tokenizer."""
REDUCTION_FACTOR = 3
INTERRUPTED = "interrupted"
"""User attribute of a trial cut short by an interruption (Ctrl-C, or its process killed): not
counted, and its parameters are queued again as a trial whose ``RETRY_OF`` names it."""
RETRY_OF = "retry_of"


@dataclass(frozen=True)
class Param:
    """One searched setting: a float or int range, or a list of choices."""

    key: str
    kind: str
    """``float``, ``int`` or ``categorical``."""
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: int | float | None = None
    choices: tuple = ()

    def suggest(self, trial: Any) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(
                self.key, self.low, self.high, step=self.step or 1, log=self.log
            )
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)


@dataclass
class SearchPlan:
    out: Path
    space_file: Path
    base: str
    overrides: list[str]
    params: list[Param]
    budget: Budget
    trials: int
    seed: int
    fingerprint: str
    nproc_per_run: int = 1
    """Processes of each trial (a ``lmlab train --nproc`` job when above 1)."""


def _param(key: str, spec: Any, where: str) -> Param:
    """Read one entry of ``params``; every mistake is a one-line error naming the key."""
    if isinstance(spec, list):
        if not spec or len({json.dumps(c) for c in spec}) < len(spec):
            raise LmlabError(f"{where}: {key} lists no or repeated choices")
        if not all(c is None or isinstance(c, str | int | float | bool) for c in spec):
            raise LmlabError(f"{where}: {key} choices must be plain values (text, numbers)")
        return Param(key, "categorical", choices=tuple(spec))
    if not isinstance(spec, dict) or not {"low", "high"} <= set(spec):
        raise LmlabError(
            f"{where}: {key} must be a list of choices or {{low: ..., high: ...}} "
            "(with optional log: true, step: ...)"
        )
    unknown = set(spec) - {"low", "high", "log", "step"}
    if unknown:
        raise LmlabError(f"{where}: {key} has unknown field(s) {', '.join(sorted(unknown))}")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    numbers = [v for v in (low, high, step) if v is not None]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers):
        raise LmlabError(f"{where}: {key} low/high/step must be numbers (write 1.0e-4, not 1e-4)")
    if not isinstance(log, bool):
        raise LmlabError(f"{where}: {key} log must be true or false")
    if not low < high:
        raise LmlabError(f"{where}: {key} needs low < high (got {low} and {high})")
    if log and (low <= 0 or step is not None):
        raise LmlabError(f"{where}: {key} with log: true needs low > 0 and no step")
    if step is not None and step <= 0:
        raise LmlabError(f"{where}: {key} step must be positive")
    kind = "int" if all(isinstance(v, int) for v in numbers) else "float"
    return Param(key, kind, low, high, log, step)


def _fingerprint(space: dict, budget: str) -> str:
    text = json.dumps({"space": space, "budget": budget}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def plan_search(
    space: str | Path,
    *,
    trials: int,
    budget: str,
    out: str | Path | None = None,
    seed: int = 0,
    nproc_per_run: int = 1,
) -> SearchPlan:
    """Read and check the space file and budget before anything trains. ``nproc_per_run`` > 1
    trains each trial as a torchrun job of that many processes (``train.parallel=ddp`` unless
    the space's config says ``fsdp``)."""
    path = Path(space)
    if not path.is_file():
        raise LmlabError(
            f"space file {path} does not exist; give a YAML file (see lmlab search -h)"
        )
    if trials < 1:
        raise ParamError(f"<trials>={trials} must be at least 1", "trials")
    if nproc_per_run < 1:
        raise ParamError(f"<nproc_per_run>={nproc_per_run} must be at least 1", "nproc_per_run")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        raise LmlabError(f"space file {path} is not valid YAML; fix its syntax") from None
    if not isinstance(data, dict):
        raise LmlabError(f"space file {path} must hold a mapping with base, overrides and params")
    unknown = set(data) - {"base", "overrides", "params"}
    if unknown:
        raise LmlabError(
            f"space file {path}: unknown key(s) {', '.join(sorted(unknown))}; "
            "use base, overrides and params"
        )
    base = str(data.get("base") or "gpt-tiny")
    if base.endswith((".yaml", ".yml")) and not Path(base).is_absolute():
        base = str(path.parent / base)
    read_source(base)
    overrides = data.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise LmlabError(f"space file {path}: overrides must be a list of 'key=value' strings")
    params_spec = data.get("params")
    if not isinstance(params_spec, dict) or not params_spec:
        raise LmlabError(f"space file {path}: params must map setting keys to ranges or choices")
    params = [_param(str(key), spec, f"space file {path}") for key, spec in params_spec.items()]
    parsed_budget = parse_budget(budget)
    for param in params:  # every key exists; every choice and both ends of a range build
        ends = param.choices if param.kind == "categorical" else (param.low, param.high)
        for value in ends:
            setting = _override(param.key, value)
            try:
                build_arm(f"params.{setting}", base, [*overrides, setting], parsed_budget, {})
            except LmlabError as exc:
                raise LmlabError(f"space file {path}: {str(exc).removeprefix('arm ')}") from None
    folder = (
        Path(out) if out else Path(build_config(base, overrides).out_dir) / f"search-{path.stem}"
    )
    return SearchPlan(
        folder,
        path,
        base,
        list(overrides),
        params,
        parsed_budget,
        trials,
        seed,
        _fingerprint(data, parsed_budget.text),
        nproc_per_run,
    )


def _override(key: str, value: Any) -> str:
    """``key=value`` with the value written as JSON (valid YAML, so it parses back exactly)."""
    return f"{key}={json.dumps(value)}"


def _trial_config(plan: SearchPlan, values: dict[str, Any], number: int) -> Config:
    """The full config of one trial: base, fixed overrides, sampled values, the budget."""
    settings = [_override(key, value) for key, value in values.items()]
    arm = build_arm(f"trial{number}", plan.base, [*plan.overrides, *settings], plan.budget, {})
    config = copy.deepcopy(arm.config)
    config.out_dir = str(plan.out / "runs")
    config.name = f"trial{number}"
    return config


def _open_study(plan: SearchPlan):
    """The study in the search folder: created, or loaded to continue (same space and budget
    only); trials left running by an interrupted search are failed and queued again."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial's end is printed here
    plan.out.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{(plan.out / STUDY_FILE).resolve()}")
    study = optuna.create_study(
        study_name=STUDY_NAME,
        storage=storage,
        load_if_exists=True,
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=plan.seed),
        pruner=optuna.pruners.SuccessiveHalvingPruner(reduction_factor=REDUCTION_FACTOR),
    )
    saved = study.user_attrs.get("fingerprint")
    if saved is None:
        study.set_user_attr("fingerprint", plan.fingerprint)
    elif saved != plan.fingerprint:
        raise ParamError(
            f"{plan.out} holds a search of another space or budget; use another <out> or "
            "delete that folder",
            "out",
        )
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get(RETRY_OF) for t in trials}
    for trial in trials:
        killed = trial.state == TrialState.RUNNING  # its process died (kill -9, power cut)
        if killed:
            storage.set_trial_user_attr(trial._trial_id, INTERRUPTED, True)
            storage.set_trial_user_attr(trial._trial_id, "error", "interrupted")
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        if killed or (trial.user_attrs.get(INTERRUPTED) and trial.number not in retried):
            study.enqueue_trial(trial.params, user_attrs={RETRY_OF: trial.number})
    return study


def _objective(plan: SearchPlan, show_progress: bool, registry_location, trial) -> float:
    """Train one trial, reporting every evaluation; raises ``TrialPruned`` when pruned. Any
    other failure (a config that does not build, a diverged loss) fails only this trial: its
    first line is kept with the trial and the traceback in ``logs/trial<k>.log``."""
    import optuna

    values = {param.key: param.suggest(trial) for param in plan.params}
    print(f"trial {trial.number}: {_describe(values)}", file=sys.stderr)
    try:
        config = _trial_config(plan, values, trial.number)
        value = _train_trial(plan, config, trial, show_progress, registry_location)
    except optuna.TrialPruned as exc:
        print(f"trial {trial.number} {exc}", file=sys.stderr)
        raise
    except KeyboardInterrupt:  # optuna fails the trial; the next search tries it again
        trial.set_user_attr(INTERRUPTED, True)
        trial.set_user_attr("error", "interrupted")
        raise
    except Exception as exc:
        trial.set_user_attr("error", error_line(exc))
        log = plan.out / "logs" / f"trial{trial.number}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(traceback.format_exc(), encoding="utf-8")
        print(f"trial {trial.number} failed: {error_line(exc)} (see {log})", file=sys.stderr)
        raise
    print(f"trial {trial.number} finished: {value:.4f} bits/byte", file=sys.stderr)
    return value


def _train_trial(
    plan: SearchPlan, config: Config, trial, show_progress: bool, registry_location
) -> float:
    """Train a trial's run folder, reporting each evaluation to the pruner (never the final one
    of a token budget); record the run in the registry however it ends."""
    import optuna

    def report(result: dict) -> None:
        trial.report(result[EVAL_METRIC], result["tokens"])
        trial.set_user_attr("tokens", result["tokens"])
        final = 0 < config.train.max_tokens <= result["tokens"]
        if not final and trial.should_prune():
            raise optuna.TrialPruned(f"pruned at {result['tokens']} tokens")

    run_dir = Path(config.out_dir) / config.name
    trial.set_user_attr("run", str(run_dir))
    status, summary = "failed", None
    try:
        if plan.nproc_per_run > 1:
            summary = _train_trial_job(plan, config, report, registry_location)
        else:
            trainer = start_run(config, config.name, show_progress)
            trainer.registry = registry.registry_path(registry_location)
            trainer.eval_listeners.append(report)
            summary = trainer.train()
        status = "finished"
        return summary[FINAL_METRIC]
    except optuna.TrialPruned:
        status = "pruned"
        raise
    finally:
        if run_dir.exists():
            row = registry.run_row(
                run_dir,
                status=status,
                config=config,
                summary=summary,
                arm=f"trial{trial.number}",
                preset=plan.base,
                compare=str(plan.out.resolve()),
            )
            registry.record_runs([row], registry_location)


def _train_trial_job(
    plan: SearchPlan, config: Config, report: Callable[[dict], None], registry_location
) -> dict:
    """Train a trial as ``lmlab train --nproc N`` and feed each evaluation rank 0 writes to
    ``report`` as it appears in ``metrics.jsonl``; when ``report`` prunes the trial, the job
    is stopped with SIGTERM (every rank saves and exits, as on Ctrl-C) and the error goes on."""
    if config.train.parallel == "none":
        config.train.parallel = "ddp"
    path = plan.out / "configs" / f"{config.name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, dump_config(config))
    log = plan.out / "logs" / f"{config.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "lmlab", "train", "--quiet"]
    command += ["--nproc", str(plan.nproc_per_run), "--config", str(path)]
    env = {**os.environ, registry.REGISTRY_ENV: str(registry.registry_path(registry_location))}
    run_dir = Path(config.out_dir) / config.name
    seen = 0
    with log.open("w", encoding="utf-8") as output:
        job = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                finished = job.poll() is not None
                metrics = run_dir / METRICS_FILE
                evals = (
                    [r for r in read_metrics(metrics) if r.get("kind") == "eval"]
                    if (metrics.is_file())
                    else []
                )
                for row in evals[seen:]:
                    report(row)
                seen = len(evals)
                if finished:
                    break
                time.sleep(0.5)
        except BaseException:
            job.send_signal(signal.SIGTERM)
            job.wait()
            raise
    if job.returncode != 0:
        raise LmlabError(f"the trial's job exited with {job.returncode} (see {log})")
    return json.loads((run_dir / SUMMARY_FILE).read_text(encoding="utf-8"))


def _show(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _describe(values: dict[str, Any]) -> str:
    return " ".join(f"{key}={_show(value)}" for key, value in values.items())


def run_search(
    plan: SearchPlan, show_progress: bool = True, registry_location: str | Path | None = None
) -> dict:
    """Run the trials still missing (of ``plan.trials``), then write best.yaml, results.json
    and report.md and record the search in the run registry."""
    from optuna.trial import TrialState

    started = time.perf_counter()
    study = _open_study(plan)
    ended = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    trials = study.get_trials(deepcopy=False, states=ended)
    counted = [t for t in trials if not t.user_attrs.get(INTERRUPTED)]
    remaining = plan.trials - len(counted)
    if remaining < plan.trials:
        print(
            f"continuing: {len(counted)} trial(s) done, {max(remaining, 0)} to go", file=sys.stderr
        )
    if remaining > 0:
        study.optimize(
            lambda trial: _objective(plan, show_progress, registry_location, trial),
            n_trials=remaining,
            catch=(Exception,),
        )
    results = _results(plan, study)
    results["wall_seconds"] = time.perf_counter() - started
    atomic_write_json(plan.out / RESULTS_FILE, results)
    if results["best"]:
        best = open_run(results["best"]["run"])[1]
        best.name, best.out_dir = "", "runs"
        atomic_write_text(plan.out / BEST_FILE, dump_config(best))
    atomic_write_text(plan.out / "report.md", render_search_markdown(results))
    registry.record_compare(
        plan.out.name,
        plan.out,
        baseline="",
        arms=[f"trial{t['number']}" for t in results["trials"]],
        budget=plan.budget.text,
        seeds=1,
        verdicts={"best": f"trial{results['best']['number']}"} if results["best"] else {},
        status="finished" if results["best"] else "no finished trial",
        location=registry_location,
    )
    return results


def _results(plan: SearchPlan, study) -> dict:
    from optuna.trial import TrialState

    trials = []
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.RUNNING:
            continue
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        trials.append(
            {
                "number": t.number,
                "state": t.state.name.lower(),
                "params": t.params,
                "value": t.value,
                "last_reported": last,
                "tokens": t.user_attrs.get("tokens"),
                "run": t.user_attrs.get("run"),
                "error": t.user_attrs.get("error"),
                "seconds": t.duration.total_seconds() if t.duration else None,
            }
        )
    complete = [t for t in trials if t["state"] == "complete"]
    best = min(complete, key=lambda t: t["value"]) if complete else None
    if best and not (Path(best["run"]) / SUMMARY_FILE).is_file():
        best = None
    return {
        "search": plan.out.name,
        "path": str(plan.out),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "space_file": str(plan.space_file),
        "base": plan.base,
        "overrides": plan.overrides,
        "params": [vars(p) | {"choices": list(p.choices)} for p in plan.params],
        "budget": {
            "kind": plan.budget.kind,
            "amount": plan.budget.amount,
            "text": plan.budget.text,
        },
        "sampler": f"TPE (seed {plan.seed})",
        "pruner": f"successive halving (reduction factor {REDUCTION_FACTOR}, resource: tokens)",
        "metric": FINAL_METRIC,
        "trials": trials,
        "best": best,
    }


def _value(value: float | None) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.4f}"


def render_search_markdown(results: dict) -> str:
    keys = [p["key"] for p in results["params"]]
    best = results["best"]
    lines = [
        f"# Search {results['search']}",
        "",
        f"Space `{results['space_file']}` over base `{results['base']}`"
        + (f" with `{' '.join(results['overrides'])}`" if results["overrides"] else "")
        + f"; budget **{results['budget']['text']}** per trial; sampler {results['sampler']}; "
        f"pruner {results['pruner']}. Objective: final validation bits per byte (lower is "
        "better); pruned trials show the last value they reported.",
        "",
    ]
    if best:
        lines += [
            f"**Best: trial {best['number']}**, {_value(best['value'])} bits/byte with "
            f"{_describe(best['params'])}; its full config is `{BEST_FILE}` "
            f"(`lmlab train {BEST_FILE}`).",
            "",
        ]
    else:
        lines += ["No trial finished; see the errors below.", ""]
    lines.append("| trial | state | " + " | ".join(keys) + " | bits/byte | tokens | s | note |")
    lines.append("|---:|---|" + "---|" * len(keys) + "---:|---:|---:|---|")
    for t in results["trials"]:
        cells = [_show(t["params"][k]) if k in t["params"] else "—" for k in keys]
        value = t["value"] if t["state"] == "complete" else t["last_reported"]
        mark = " **best**" if best and t["number"] == best["number"] else ""
        lines.append(
            f"| {t['number']} | {t['state']}{mark} | "
            + " | ".join(cells)
            + f" | {_value(value)} | {t['tokens'] or '—'} | "
            + ("—" if t["seconds"] is None else f"{t['seconds']:.1f}")
            + f" | {t['error'] or ''} |"
        )
    return "\n".join(lines) + "\n"


def summary_lines(results: dict) -> list[str]:
    """What ``lmlab search`` prints at the end."""
    states = {}
    for t in results["trials"]:
        states[t["state"]] = states.get(t["state"], 0) + 1
    lines = [
        f"search {results['path']}: {len(results['trials'])} trials ("
        + ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
        + ")"
    ]
    best = results["best"]
    if best:
        lines.append(
            f"best: trial {best['number']}, {_value(best['value'])} bits/byte, "
            f"{_describe(best['params'])}"
        )
        lines.append(f"config: {Path(results['path']) / BEST_FILE}")
    else:
        lines.append("no trial finished")
    lines.append(f"report: {Path(results['path']) / 'report.md'}")
    return lines
