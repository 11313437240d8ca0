"""``lmlab scale``: train a grid of model sizes x token budgets, fit a scaling law, and test it
on a held-out larger run.

The grid is an ordinary set of runs trained by the compare machinery
(:func:`lmlab.experiments.runset.train_runs`): one run folder per grid point and seed under
``SCALE/runs/``, reused when finished, resumed when interrupted, recorded in the run registry.
The law (:mod:`lmlab.experiments.scaling`) is fitted to the grid only, and its prediction for the
held-out run is written to ``results.json`` *before* that run trains, so the reported error is
an honest out-of-sample test rather than a fit after the fact.
"""

from __future__ import annotations

import math
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from lmlab.config.load import read_source
from lmlab.config.schema import Config, ModelConfig
from lmlab.errors import LmlabError, ParamError
from lmlab.experiments.compare import RESULTS_FILE
from lmlab.experiments.runset import (
    Arm,
    RunSet,
    RunSpec,
    build_arm,
    model_skeleton,
    outcome_record,
    parse_budget,
    seed_runs,
    train_runs,
)
from lmlab.experiments.scaling import PARAMETERS, ScalingFit, fit_scaling_law, relative_error
from lmlab.files import atomic_write_json, atomic_write_text
from lmlab.train import registry
from lmlab.train.run import open_run

METRIC = "val_bits_per_byte"
PLOT = "loss_vs_params.png"


@dataclass
class Point:
    """One cell of the study: model settings and a token budget, trained with every seed."""

    arm: Arm
    size: dict[str, str]
    """The ``--sizes`` settings of this cell (full key -> value text)."""
    tokens_text: str
    holdout: bool = False


@dataclass
class ScalePlan:
    out: Path
    source: str
    overrides: list[str]
    size_keys: list[str]
    tokens: list[str]
    seeds: int
    points: list[Point]
    runs: RunSet


def parse_sizes(items: list[str]) -> tuple[list[str], list[list[str]]]:
    """``["d_model=64,96,128", "n_layers=2,3,4"]`` -> keys and one row of values per size
    (several keys grow together, so they need equally many values). Keys without a section
    are model settings."""
    if not items:
        raise ParamError("give <sizes> KEY=V1,V2,..., e.g. d_model=64,96,128", "sizes")
    keys, columns = [], []
    for item in items:
        key, _, values = item.partition("=")
        parts = [v.strip() for v in values.split(",") if v.strip()]
        if not key.strip() or not parts:
            raise ParamError(f"<sizes> {item!r} must look like d_model=64,96,128", "sizes")
        key = key.strip() if "." in key else f"model.{key.strip()}"
        if not key.startswith("model."):
            raise ParamError(
                f"<sizes> {item!r}: scale model settings (model.*), not {key}", "sizes"
            )
        if key in keys:
            raise ParamError(f"<sizes> names {key} twice; give each key once", "sizes")
        keys.append(key)
        columns.append(parts)
    if len({len(c) for c in columns}) > 1:
        counts = ", ".join(f"{k}: {len(c)}" for k, c in zip(keys, columns, strict=True))
        raise ParamError(
            f"<sizes> keys grow together and need equally many values ({counts})", "sizes"
        )
    rows = [list(row) for row in zip(*columns, strict=True)]
    if len({tuple(r) for r in rows}) < len(rows):
        raise ParamError("<sizes> repeats a size; give distinct values", "sizes")
    return keys, rows


def parse_tokens(text: str) -> list[str]:
    """``"200k,400k"`` -> the budgets' texts (each checked like ``--budget tokens=...``)."""
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    if not items:
        raise ParamError("give <tokens> N1,N2,..., e.g. 200k,400k", "tokens")
    for item in items:
        parse_budget(f"tokens={item}")
    if len({parse_budget(f"tokens={t}").amount for t in items}) < len(items):
        raise ParamError(f"<tokens> {text!r} repeats a budget; give distinct values", "tokens")
    return items


def parse_holdout(text: str, keys: list[str]) -> tuple[dict[str, str], str]:
    """``"d_model=192 tokens=800k"`` -> the held-out size (one value per --sizes key) and its
    token budget."""
    settings = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise ParamError(f"<holdout> item {item!r} must look like key=value", "holdout")
        full = "tokens" if key == "tokens" else (key if "." in key else f"model.{key}")
        settings[full] = value
    tokens = settings.pop("tokens", None)
    if tokens is None:
        raise ParamError(f"<holdout> {text!r} needs a token budget, e.g. tokens=800k", "holdout")
    parse_budget(f"tokens={tokens}")
    if set(settings) != set(keys):
        raise ParamError(
            f"<holdout> {text!r} must set exactly the <sizes> keys ({', '.join(keys)}) and tokens",
            "holdout",
            "sizes",
        )
    return {key: settings[key] for key in keys}, tokens


def _point_name(size: dict[str, str], tokens: str) -> str:
    parts = [f"{key.split('.')[-1]}={value}" for key, value in size.items()]
    return re.sub(r"[^\w.+=-]", "_", "+".join([*parts, f"tokens={tokens}"]))


def plan_scale(
    source: str,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    sizes: list[str],
    tokens: str,
    holdout: str | None = None,
    seeds: int = 1,
    out: str | Path | None = None,
) -> ScalePlan:
    """Check every input and build every run's config before anything trains."""
    if seeds < 1:
        raise ParamError(f"<seeds>={seeds} must be at least 1", "seeds")
    read_source(source)
    keys, rows = parse_sizes(sizes)
    budgets = parse_tokens(tokens)
    cells = [(dict(zip(keys, row, strict=True)), t, False) for row in rows for t in budgets]
    if holdout:
        size, budget = parse_holdout(holdout, keys)
        amount = parse_budget(f"tokens={budget}").amount
        for cell_size, cell_tokens, _ in cells:
            if cell_size == size and parse_budget(f"tokens={cell_tokens}").amount == amount:
                raise ParamError(
                    f"<holdout> {holdout!r} is a grid point; hold out a new one", "holdout"
                )
        cells.append((size, budget, True))
    points: list[Point] = []
    for size, budget, held in cells:
        settings = [f"{key}={value}" for key, value in size.items()]
        arm = build_arm(
            _point_name(size, budget),
            source,
            [*overrides, *settings],
            parse_budget(f"tokens={budget}"),
            {},
        )
        points.append(Point(arm, size, budget, held))
    _check_design([p for p in points if not p.holdout])
    stem = Path(source).stem if source.endswith((".yaml", ".yml")) else source
    folder = Path(out) if out else Path(points[0].arm.config.out_dir) / f"scale-{stem}"
    arms = [p.arm for p in points]
    runs = RunSet(folder, [spec for arm in arms for spec in seed_runs(arm, seeds, folder)])
    return ScalePlan(folder, source, list(overrides), keys, budgets, seeds, points, runs)


def _check_design(grid: list[Point]) -> None:
    """Refuse a grid that cannot determine the law before anything trains."""
    sizes = {non_embedding_parameters(p.arm.config.model, vocab=256) for p in grid}
    budgets = {p.arm.tokens for p in grid}
    if len(sizes) < 2:
        raise ParamError(
            "the <sizes> values give every model the same parameter count; scale a setting that "
            "changes it (d_model, n_layers, mlp_hidden, ...) with two or more values",
            "sizes",
        )
    if len(budgets) < 2:
        raise ParamError("give two or more token budgets to <tokens>, e.g. 200k,400k", "tokens")
    if len(grid) < PARAMETERS:
        raise LmlabError(
            f"the grid has {len(grid)} points but the law has {PARAMETERS} parameters; "
            "add a size or a token budget (e.g. 3 sizes x 2 budgets)"
        )


def non_embedding_parameters(model: ModelConfig, vocab: int = 0) -> int:
    """N of the law: parameters without the token embedding (counted on the meta device);
    ``vocab`` stands in for an unresolved ``model.vocab_size`` of 0."""
    if not model.vocab_size:
        model = replace(model, vocab_size=vocab)
    built = model_skeleton(model)
    return built.num_parameters(non_embedding=True)


RECORD_KEYS = (METRIC, "val_loss", "tokens", "train_seconds", "parameters")
"""What the study keeps of each run's results."""


def _point_rows(plan: ScalePlan, records: list[dict], vocab: int) -> list[dict]:
    """One row per cell: N, D, L (mean final bits per byte over seeds). D is the mean of the
    tokens trained for a grid point (the fit's data) and the planned tokens for the held-out
    run, which is predicted before it trains; ``D_trained`` says what it then trained."""
    rows = []
    for point in plan.points:
        done = [r for r in records if r["arm"] == point.arm.name and r["status"] == "finished"]
        losses = [r[METRIC] for r in done]
        trained = float(np.mean([r["tokens"] for r in done])) if done else None
        planned = float(_planned_tokens(point.arm.config))
        rows.append(
            {
                "arm": point.arm.name,
                "size": point.size,
                "token_budget": point.tokens_text,
                "holdout": point.holdout,
                "N": non_embedding_parameters(point.arm.config.model, vocab),
                "D": planned if point.holdout or trained is None else trained,
                "D_trained": trained,
                "L": float(np.mean(losses)) if losses else None,
                "L_sd": float(np.std(losses, ddof=1)) if len(losses) > 1 else None,
                "seeds_finished": len(done),
            }
        )
    return rows


def _planned_tokens(config: Config) -> int:
    """Tokens a run of ``config`` will train: its budget rounded up to whole steps."""
    per_step = config.train.batch_size * config.train.grad_accum * config.data.seq_len
    return math.ceil(config.train.max_tokens / per_step) * per_step


def _fit(rows: list[dict]) -> ScalingFit:
    """The law fitted to the grid points that have a finished run (never the held-out one)."""
    grid = [r for r in rows if not r["holdout"] and r["L"] is not None]
    missing = [r["arm"] for r in rows if not r["holdout"] and r["L"] is None]
    if missing:
        print(
            f"warning: no finished run for {', '.join(missing)}; fitting without", file=sys.stderr
        )
    return fit_scaling_law([r["N"] for r in grid], [r["D"] for r in grid], [r["L"] for r in grid])


def _with_fitted(rows: list[dict], fit: ScalingFit) -> list[dict]:
    return [{**row, "fitted": fit.predict(row["N"], row["D"])} for row in rows]


def _results(plan: ScalePlan, records: list[dict], rows: list[dict], fit: ScalingFit) -> dict:
    holdout = next((r for r in rows if r["holdout"]), None)
    if holdout is not None:
        holdout = {
            "arm": holdout["arm"],
            "size": holdout["size"],
            "token_budget": holdout["token_budget"],
            "N": holdout["N"],
            "D": holdout["D"],
            "D_trained": holdout["D_trained"],
            "predicted": holdout["fitted"],
            "actual": holdout["L"],
            "relative_error": (
                relative_error(holdout["fitted"], holdout["L"])
                if holdout["L"] is not None
                else None
            ),
        }
    return {
        "study": plan.out.name,
        "path": str(plan.out),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "source": plan.source,
        "overrides": plan.overrides,
        "size_keys": plan.size_keys,
        "tokens": plan.tokens,
        "seeds": plan.seeds,
        "metric": METRIC,
        "law": "L(N, D) = E + A / N^alpha + B / D^beta; N non-embedding parameters, "
        "D training tokens, L final validation bits per byte (mean over seeds)",
        "points": [r for r in rows if not r["holdout"]],
        "fit": fit.to_dict(),
        "holdout": holdout,
        "runs": records,
        "failed": [f"{r['arm']}/seed{r['seed']}: {r['error']}" for r in records if r["error"]],
    }


def run_scale(
    plan: ScalePlan, show_progress: bool = True, registry_location: str | Path | None = None
) -> dict:
    """Train the grid, fit, record the held-out prediction, train the held-out run, report."""
    started = time.perf_counter()
    grid_specs = [s for s in plan.runs.runs if not _is_holdout(plan, s)]
    held_specs = [s for s in plan.runs.runs if _is_holdout(plan, s)]
    outcomes = train_runs(replace(plan.runs, runs=grid_specs), show_progress, registry_location)
    records = [outcome_record(o, RECORD_KEYS) for o in outcomes]
    vocabs = [open_run(r["path"])[1].model.vocab_size for r in records if r["status"] == "finished"]
    if not vocabs:
        raise LmlabError(f"every grid run failed; see {plan.out / 'logs'}")
    rows = _point_rows(plan, records, vocabs[0])
    fit = _fit(rows)
    results = _results(plan, records, _with_fitted(rows, fit), fit)
    atomic_write_json(plan.out / RESULTS_FILE, results)  # the prediction, before the held-out run
    if held_specs:
        held = train_runs(replace(plan.runs, runs=held_specs), show_progress, registry_location)
        records += [outcome_record(o, RECORD_KEYS) for o in held]
        rows = _with_fitted(_point_rows(plan, records, vocabs[0]), fit)
        results = _results(plan, records, rows, fit)
    results["wall_seconds"] = time.perf_counter() - started
    atomic_write_json(plan.out / RESULTS_FILE, results)
    write_scale_report(results, plan.out)
    error = (results["holdout"] or {}).get("relative_error")
    registry.record_compare(
        plan.out.name,
        plan.out,
        baseline="",
        arms=[p.arm.name for p in plan.points],
        budget="tokens=" + ",".join(plan.tokens),
        seeds=plan.seeds,
        verdicts={} if error is None else {"holdout relative error": f"{error:+.2%}"},
        status="failed runs" if results["failed"] else "finished",
        location=registry_location,
    )
    return results


def _is_holdout(plan: ScalePlan, spec: RunSpec) -> bool:
    return next(p.holdout for p in plan.points if p.arm is spec.arm)


# ------------------------------------------------------------------------ reporting


def plot_scaling(results: dict, out: Path) -> str:
    """Loss against N (log axis), one colour per token budget: measured means and the fitted
    law; the held-out run as a star (measured) and a ring (predicted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fit = ScalingFit(**{**results["fit"], "warnings": tuple(results["fit"]["warnings"])})
    points, holdout = results["points"], results["holdout"]
    ns = [p["N"] for p in points] + ([holdout["N"]] if holdout else [])
    grid = np.geomspace(min(ns) / 1.5, max(ns) * 1.5, 100)
    figure, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    budgets = list(dict.fromkeys(p["token_budget"] for p in points))
    curves = [(b, [p for p in points if p["token_budget"] == b]) for b in budgets]
    if holdout and holdout["token_budget"] not in budgets:
        curves.append((holdout["token_budget"], []))
    for budget, members in curves:
        d = float(np.mean([p["D"] for p in members])) if members else holdout["D"]
        (line,) = ax.plot(grid, [fit.predict(n, d) for n in grid], label=f"fit, D={budget}")
        done = [p for p in members if p["L"] is not None]
        ax.plot([p["N"] for p in done], [p["L"] for p in done], "o", color=line.get_color())
        if holdout and holdout["token_budget"] == budget:
            line.set_linestyle("--")
            ax.plot(
                holdout["N"],
                holdout["predicted"],
                "o",
                mfc="none",
                color=line.get_color(),
                markersize=10,
                label="held out: predicted",
            )
            if holdout["actual"] is not None:
                ax.plot(
                    holdout["N"],
                    holdout["actual"],
                    "*",
                    color=line.get_color(),
                    markersize=12,
                    label="held out: measured",
                )
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("final validation bits per byte")
    ax.set_title(f"L = {fit.E:.3f} + {fit.A:.3g}/N^{fit.alpha:.3f} + {fit.B:.3g}/D^{fit.beta:.3f}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / PLOT)
    plt.close(figure)
    return PLOT


def _num(value: float | None, spec: str) -> str:
    return (
        "—"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, spec)
    )


def render_scale_markdown(results: dict, plot: str) -> str:
    fit, holdout = results["fit"], results["holdout"]
    keys = results["size_keys"]
    lines = [
        f"# Scaling study {results['study']}",
        "",
        f"Config `{results['source']}`"
        + (f" with `{' '.join(results['overrides'])}`" if results["overrides"] else "")
        + f"; sizes over `{', '.join(keys)}`, token budgets {', '.join(results['tokens'])}, "
        f"{results['seeds']} seed(s) per point.",
        "",
        f"Law: {results['law']}.",
        "",
        "## Fit",
        "",
        "| E | A | alpha | B | beta | points | RMS log residual |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {fit['E']:.4f} | {fit['A']:.4g} | {fit['alpha']:.4f} | {fit['B']:.4g} "
        f"| {fit['beta']:.4f} | {fit['points']} | {fit['rms_log_residual']:.4f} |",
        "",
    ]
    lines.extend(f"- warning: {w}" for w in fit["warnings"])
    if fit["warnings"]:
        lines.append("")
    lines += ["## Held-out run", ""]
    if holdout is None:
        lines.append("None (give --holdout to test the law out of sample).")
    else:
        size = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in holdout["size"].items())
        error = holdout["relative_error"]
        lines.append(
            f"{size}, tokens={holdout['token_budget']} (N={holdout['N']:,}, D={holdout['D']:,.0f}):"
            f" predicted **{holdout['predicted']:.4f}** bits/byte before it trained, measured "
            f"**{_num(holdout['actual'], '.4f')}**, relative error **{_num(error, '+.2%')}**."
        )
    lines += [
        "",
        "## Runs (grid points; L is the mean over seeds)",
        "",
        "| "
        + " | ".join(k.split(".")[-1] for k in keys)
        + " | tokens | N | D | L bits/byte | sd | fitted | residual | seeds |",
        "|" + "---:|" * (len(keys) + 8),
    ]
    for p in results["points"]:
        residual = None if p["L"] is None else p["L"] - p["fitted"]
        lines.append(
            "| "
            + " | ".join(p["size"][k] for k in keys)
            + f" | {p['token_budget']} | {p['N']:,} | {p['D']:,.0f} | {_num(p['L'], '.4f')} "
            f"| {_num(p['L_sd'], '.4f')} | {p['fitted']:.4f} | {_num(residual, '+.4f')} "
            f"| {p['seeds_finished']} |"
        )
    if results["failed"]:
        lines += ["", "## Failed runs", ""]
        lines.extend(f"- {failure}" for failure in results["failed"])
    lines += ["", f"![{plot}]({plot})", "", "## Run folders", ""]
    lines += [
        f"- {r['arm']} seed {r['seed']}: {r['status']} ({r['how']}), `{r['path']}`"
        for r in results["runs"]
    ]
    return "\n".join(lines) + "\n"


def write_scale_report(results: dict, out: Path) -> Path:
    plot = plot_scaling(results, out)
    path = out / "report.md"
    atomic_write_text(path, render_scale_markdown(results, plot))
    return path


def summary_lines(results: dict) -> list[str]:
    """What ``lmlab scale`` prints at the end."""
    fit, holdout = results["fit"], results["holdout"]
    lines = [
        f"scale {results['path']}: {len(results['runs'])} runs, {len(results['failed'])} failed",
        f"fit: L = {fit['E']:.4f} + {fit['A']:.4g}/N^{fit['alpha']:.4f} + "
        f"{fit['B']:.4g}/D^{fit['beta']:.4f}  (bits/byte; RMS log residual "
        f"{fit['rms_log_residual']:.4f})",
    ]
    lines.extend(f"warning: {w}" for w in fit["warnings"])
    if holdout is not None:
        lines.append(
            f"held out {holdout['arm']}: predicted {holdout['predicted']:.4f}, measured "
            f"{_num(holdout['actual'], '.4f')}, "
            f"relative error {_num(holdout['relative_error'], '+.2%')}"
        )
    lines.extend(f"FAILED {failure}" for failure in results["failed"])
    lines.append(f"report: {Path(results['path']) / 'report.md'}")
    return lines
