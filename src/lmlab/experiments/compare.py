"""``lmlab compare``: is B better than A at the same budget?

Every arm trains under the same budget (tokens, FLOPs or wall time) with the same seeds; seed
index *i* sets ``train.seed = i``, which fixes both the initial weights and the batch order, so
run *i* of every arm sees the same batches and the arms can be compared seed by seed
(:mod:`lmlab.experiments.stats`). The compare folder holds one run folder per arm and seed
(``runs/<arm>/seed<i>/``); rerunning the same command reuses finished runs, resumes unfinished
ones from their checkpoints and starts the missing ones. A run that crashes is reported as
failed; the others still run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmlab.errors import LmlabError, ParamError
from lmlab.experiments.report import write_report
from lmlab.experiments.runset import (
    Arm,
    Budget,
    Outcome,
    RunSet,
    arm_name,
    build_arm,
    check_nproc_per_run,
    outcome_record,
    parse_budget,
    seed_runs,
    train_runs,
    variant_name,
)
from lmlab.experiments.stats import METRICS, Rule, decide, describe, load_rule
from lmlab.files import atomic_write_json
from lmlab.interop.lm_eval_tasks import check_tasks, headline_score, run_lm_eval
from lmlab.train import registry

RESULTS_FILE = "results.json"


@dataclass
class ComparePlan:
    """Everything decided before any training: arms, budget, seeds, rule, and the runs."""

    arms: list[Arm]
    baseline: str
    seeds: int
    budget: Budget
    rule: Rule
    target: float | None
    runset: RunSet
    tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks every finished run is scored on (none: no scoreboard)."""
    tasks_path: str | None = None
    tasks_limit: float | None = None

    @property
    def out(self) -> Path:
        return self.runset.out


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
    nproc_per_run: int = 1,
    tasks: str | None = None,
    tasks_path: str | None = None,
    tasks_limit: float | None = None,
) -> ComparePlan:
    """Check every input and decide every run; raises :class:`LmlabError` on bad input before
    anything trains. ``variants`` add arms: the first source plus one ``key=value`` each;
    ``overrides`` apply to every arm. ``nproc_per_run`` > 1 trains each run in that many
    processes (torchrun, ``train.parallel=ddp`` unless a config says ``fsdp``); it needs
    ``parallel`` child processes. ``tasks`` (comma-separated lm-eval task names, own YAML
    tasks in ``tasks_path``, ``tasks_limit`` examples each) add a per-task scoreboard."""
    if not sources:
        raise LmlabError("give at least one config (a preset or YAML file) to compare")
    if len(sources) + len(variants) < 2:
        raise ParamError(
            "compare needs two arms: give two configs, or one config and <variants> key=value",
            "variants",
        )
    if seeds < 1:
        raise ParamError(f"<seeds>={seeds} must be at least 1 (3 or more for a verdict)", "seeds")
    if parallel < 0:
        raise ParamError(
            f"<parallel>={parallel} must be 0 (in this process) or a process count", "parallel"
        )
    check_nproc_per_run(nproc_per_run, parallel)
    for variant in variants:
        if "=" not in variant:
            raise ParamError(f"<variants> {variant!r} must look like section.key=value", "variants")
    task_names = list(check_tasks(tasks, tasks_path, tasks_limit)[0]) if tasks else []
    parsed_budget = parse_budget(budget)
    parsed_rule = load_rule(rule)
    wanted = [(Path(s).stem if s.endswith((".yaml", ".yml")) else s, s, []) for s in sources]
    wanted += [(variant_name(wanted[0][0], v), sources[0], [v]) for v in variants]
    arms: list[Arm] = []
    cache: dict[str, int] = {}
    for label, source, extra in wanted:
        name = arm_name(label)
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
        raise ParamError(
            f"<baseline>={chosen!r} is not an arm; arms: {', '.join(names)}", "baseline"
        )
    folder = (
        Path(out) if out else Path(arms[0].config.out_dir) / ("compare-" + "-vs-".join(names))[:120]
    )
    runs = [spec for arm in arms for spec in seed_runs(arm, seeds, folder, parallel, nproc_per_run)]
    runset = RunSet(folder, runs, parallel, nproc_per_run)
    return ComparePlan(
        arms,
        chosen,
        seeds,
        parsed_budget,
        parsed_rule,
        target,
        runset,
        task_names,
        tasks_path,
        tasks_limit,
    )


# ------------------------------------------------------------------------ measuring


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


def analyse(plan: ComparePlan, outcomes: list[Outcome]) -> dict:
    """Per-run records, per-arm statistics and one verdict per candidate."""
    ordered = sorted(outcomes, key=lambda o: (plan.arms.index(o.spec.arm), o.spec.seed))
    records = [outcome_record(outcome) for outcome in ordered]
    for record in records:
        if record["status"] == "finished":
            try:
                record["tasks"] = _task_scores(Path(record["path"]), plan.tasks)
            except (OSError, KeyError, ValueError) as exc:
                record.update(status="failed", error=f"unreadable task scores: {exc}")
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
                "tasks": {
                    task: describe([r["tasks"][task]["value"] for r in runs if task in r["tasks"]])
                    for task in plan.tasks
                },
            }
        )

    metric = plan.rule.metric
    base = next(a for a in arms if a["baseline"])
    board = scoreboard(plan, arms, finished)
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
            task_changes=(
                {f"{row['task']} ({row['metric']})": row["gain"] for row in board[arm["name"]]}
                if plan.tasks
                else None
            ),
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
        "scoreboard": board,
        "failed": [f"{r['arm']}/seed{r['seed']}: {r['error']}" for r in records if r["error"]],
    }


def _task_scores(run_dir: Path, tasks: list[str]) -> dict[str, dict]:
    """The headline score of each task the run has one for: metric, value, higher_is_better."""
    scores = {}
    for task in tasks:
        found = headline_score(run_dir, task)
        if found is not None:
            metric, value, higher = found
            scores[task] = {"metric": metric, "value": value, "higher_is_better": higher}
    return scores


def scoreboard(plan: ComparePlan, arms: list[dict], finished: list[dict]) -> dict[str, list]:
    """Per candidate, one row per task: baseline and candidate mean of the task's headline
    metric, the gain (positive is better, whichever way the metric runs) and PASS when the
    candidate loses no more than the rule's tolerance (the one probes are held to); empty
    without tasks."""
    if not plan.tasks:
        return {}
    metrics: dict[str, tuple[str, bool]] = {}
    for record in finished:
        for task, score in record["tasks"].items():
            metrics.setdefault(task, (score["metric"], score["higher_is_better"]))
    base = next(a for a in arms if a["baseline"])
    board: dict[str, list] = {}
    for arm in arms:
        if arm["baseline"]:
            continue
        rows = []
        for task, (metric, higher) in metrics.items():
            ours, theirs = arm["tasks"][task]["mean"], base["tasks"][task]["mean"]
            if ours is None or theirs is None:
                continue
            gain = (ours - theirs) * (1 if higher else -1)
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "higher_is_better": higher,
                    "baseline": theirs,
                    "candidate": ours,
                    "gain": gain,
                    "passed": gain >= -plan.rule.probe_tolerance,
                }
            )
        board[arm["name"]] = rows
    return board


def score_tasks(
    plan: ComparePlan, outcomes: list[Outcome], registry_location: str | Path | None
) -> None:
    """Score every finished run on the plan's tasks (runs scored before at the same step and
    settings are reused, so a rerun of the comparison does not evaluate again)."""
    for outcome in outcomes:
        if outcome.error is None:
            run_lm_eval(
                outcome.spec.run_dir,
                ",".join(plan.tasks),
                plan.tasks_path,
                plan.tasks_limit,
                registry=None if registry_location is None else str(registry_location),
                reuse=True,
            )


def run_compare(
    plan: ComparePlan,
    show_progress: bool = True,
    registry_location: str | Path | None = None,
) -> dict:
    """Train (or reuse) every run of ``plan``, then write ``results.json``, ``report.md`` and
    the plots in the compare folder and record the comparison in the run registry."""
    started = time.perf_counter()
    outcomes = train_runs(plan.runset, show_progress, registry_location)
    if plan.tasks:
        score_tasks(plan, outcomes, registry_location)
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
    for candidate, rows in results["scoreboard"].items():
        if not rows:
            continue
        tolerance = results["rule"]["probe_tolerance"]
        lines.append(f"scoreboard {candidate} vs {results['baseline']} (tolerance {tolerance:g}):")
        lines.extend(
            f"  {'PASS' if row['passed'] else 'FAIL'} {row['task']} {row['metric']}: "
            f"{row['candidate']:.4f} vs {row['baseline']:.4f} (gain {row['gain']:+.4f})"
            for row in rows
        )
    lines.extend(f"FAILED {failure}" for failure in results["failed"])
    lines.append(f"report: {Path(results['path']) / 'report.md'}")
    return lines
