"""The human side of a comparison: ``report.md`` with a table, the verdicts and PNG plots.

Curves show validation bits per byte (comparable across tokenizers) against tokens and against
training wall time: one line per arm, the mean over seeds on a common grid, with a band from
the best to the worst seed so the spread that the verdict weighs is visible.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmlab.files import atomic_write_text

PLOTS = {
    "val_vs_tokens.png": ("tokens", "training tokens"),
    "val_vs_time.png": ("seconds", "training time (s)"),
}
THROUGHPUT_PLOT = "throughput.png"
GRID_POINTS = 64


def seed_band(
    curves: list[list[dict]], axis: str, value: str = "bits_per_byte"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, min and max over seeds of curves resampled on a common grid of ``axis``: the
    stretch that every seed covers (its evaluations may sit at different x under a time
    budget). A single shared point gives a grid of one."""
    usable = [c for c in curves if c]
    if not usable:
        empty = np.empty(0)
        return empty, empty, empty, empty
    start = max(c[0][axis] for c in usable)
    stop = min(c[-1][axis] for c in usable)
    grid = np.linspace(start, stop, GRID_POINTS) if stop > start else np.array([stop])
    values = np.stack(
        [np.interp(grid, [p[axis] for p in c], [p[value] for p in c]) for c in usable]
    )
    return grid, values.mean(axis=0), values.min(axis=0), values.max(axis=0)


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(7, 4.2), dpi=110)


def plot_curves(results: dict, out: Path) -> list[str]:
    """One PNG per x axis; returns the file names written."""
    written = []
    for filename, (axis, label) in PLOTS.items():
        plt, figure, ax = _figure()
        for arm in results["arms"]:
            curves = [r["curve"] for r in _finished(results, arm["name"])]
            grid, mean, low, high = seed_band(curves, axis)
            if not len(grid):
                continue
            name = arm["name"] + (" (baseline)" if arm["baseline"] else "")
            if len(grid) == 1:
                ax.errorbar(grid, mean, yerr=[mean - low, high - mean], fmt="o", label=name)
                continue
            (line,) = ax.plot(grid, mean, label=name)
            ax.fill_between(grid, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        target = results.get("target_bits_per_byte")
        if target is not None:
            ax.axhline(target, color="grey", linestyle=":", linewidth=1, label="target")
        ax.set_xlabel(label)
        ax.set_ylabel("validation bits per byte")
        ax.set_title(f"mean over seeds, band: best to worst seed ({results['budget']['text']})")
        ax.grid(alpha=0.3)
        ax.legend()
        figure.tight_layout()
        figure.savefig(out / filename)
        plt.close(figure)
        written.append(filename)
    return written


def plot_throughput(results: dict, out: Path) -> str:
    """Bars of mean training tokens/s per arm with the seed standard deviation."""
    plt, figure, ax = _figure()
    names = [arm["name"] for arm in results["arms"]]
    stats = [arm["stats"]["tokens_per_s"] for arm in results["arms"]]
    means = [s["mean"] or 0.0 for s in stats]
    errors = [s["sd"] or 0.0 for s in stats]
    ax.bar(names, means, yerr=errors, capsize=4, color="tab:blue", alpha=0.8)
    ax.set_ylabel("training tokens/s")
    ax.set_title("throughput (mean ± sd over seeds)")
    ax.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(out / THROUGHPUT_PLOT)
    plt.close(figure)
    return THROUGHPUT_PLOT


def _finished(results: dict, arm: str) -> list[dict]:
    return [r for r in results["runs"] if r["arm"] == arm and r["status"] == "finished"]


def _spread(stats: dict, digits: int = 4) -> str:
    if not stats["n"]:
        return "—"
    return f"{stats['mean']:.{digits}f} ± {stats['sd']:.{digits}f}"


def _interval(bounds: list[float] | None) -> str:
    return f"[{bounds[0]:.4g}, {bounds[1]:.4g}]" if bounds else "—"


def _number(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def scoreboard_lines(results: dict) -> list[str]:
    """The lm-eval scoreboard: each task's headline metric per arm (mean ± sd over seeds) and,
    per candidate, PASS or FAIL against the baseline under the rule's tolerance."""
    board = results.get("scoreboard") or {}
    rows = [row for candidate_rows in board.values() for row in candidate_rows]
    if not rows:
        return []
    tolerance = results["rule"]["probe_tolerance"]
    arms = {arm["name"]: arm for arm in results["arms"]}
    lines = [
        "## lm-eval scoreboard",
        "",
        f"Headline metric of each task, mean ± sd over seeds; a candidate passes a task when it "
        f"loses at most {tolerance:g} (the rule's probe tolerance) against the baseline.",
        "",
        "| candidate | task | metric | baseline | candidate | gain | result |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    base = arms[results["baseline"]]
    for candidate, candidate_rows in board.items():
        for row in candidate_rows:
            lines.append(
                f"| {candidate} | {row['task']} | {row['metric']} "
                f"| {_spread(base['tasks'][row['task']])} "
                f"| {_spread(arms[candidate]['tasks'][row['task']])} | {row['gain']:+.4f} "
                f"| {'PASS' if row['passed'] else '**FAIL**'} |"
            )
    return [*lines, ""]


def render_markdown(results: dict, plots: list[str]) -> str:
    """The report text (plots referenced by file name, next to it in the compare folder)."""
    rule = results["rule"]
    budget = results["budget"]
    target = results["target_bits_per_byte"]
    lines = [
        f"# Comparison {results['compare']}",
        "",
        f"Budget **{budget['text']}** per run, **{results['seeds']}** seed(s) per arm "
        f"(seed index i: same initial seed and batch order in every arm), baseline "
        f"**{results['baseline']}**. Rule: metric `{rule['metric']}`, min effect "
        f"{rule['min_effect']:g}, {rule['confidence']:.0%} {rule['interval']}-interval, probe "
        f"tolerance {rule['probe_tolerance']:g}.",
        "",
        "| arm | parameters | tokens/run | final bits/byte | best bits/byte | area bits/byte "
        "| tokens/s | peak memory MB | time to target s | runs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for arm in results["arms"]:
        stats = arm["stats"]
        reached = (
            f"{_spread(arm['time_to_target_s'], 1)} ({arm['reached_target']}/{arm['finished']})"
        )
        runs = f"{arm['finished']} ok" + (f", **{arm['failed']} failed**" if arm["failed"] else "")
        lines.append(
            f"| {arm['name']}{' (baseline)' if arm['baseline'] else ''} "
            f"| {_number(arm['parameters'], ',')} | {_number(stats['tokens']['mean'], ',.0f')} "
            f"| {_spread(stats['val_bits_per_byte'])} | {_spread(stats['best_val_bits_per_byte'])} "
            f"| {_spread(stats['auc_bits_per_byte'])} | {_spread(stats['tokens_per_s'], 0)} "
            f"| {_spread(stats['peak_memory_mb'], 0)} | {reached} | {runs} |"
        )
    lines += [
        "",
        "Values are mean ± standard deviation over seeds. *Area* is the validation curve's area "
        "over tokens divided by the token span (its mean height). *Time to target* is the "
        "training time (evaluations excluded) to reach "
        + (f"{target:.4f} bits/byte" if target is not None else "the target (none set)")
        + " (default: the baseline's median final value), interpolated between evaluations, "
        "over the seeds that reached it. Peak memory is the process's high-water mark: runs "
        "sharing one process (no `--parallel`) carry the earlier runs' peak.",
        "",
        "## Verdicts",
        "",
    ]
    if not results["verdicts"]:
        lines.append("No candidate arms.")
    for verdict in results["verdicts"]:
        diff = verdict["difference"]
        lines.append(
            f"### {verdict['candidate']} vs {verdict['baseline']}: **{verdict['decision']}**"
        )
        lines.append("")
        lines.extend(f"- {reason}" for reason in verdict["reasons"])
        if diff["mean"] is not None:
            lines += [
                "",
                f"Difference candidate − baseline in `{rule['metric']}` over {diff['n']} seed "
                f"pair(s): mean {diff['mean']:.4g}, sd {_number(diff['sd'], '.4g')}, "
                f"{diff['confidence']:.0%} t-interval {_interval(diff['t_interval'])}, "
                f"bootstrap interval {_interval(diff['bootstrap_interval'])}, "
                f"Cohen's d {_number(diff['cohens_d'], '.3g')}.",
            ]
        lines.append("")
    probes = sorted({name for arm in results["arms"] for name in arm["probes"]})
    if probes:
        lines += ["## Probes (mean score over seeds, higher is better)", ""]
        lines.append("| arm | " + " | ".join(probes) + " |")
        lines.append("|---|" + "---:|" * len(probes))
        for arm in results["arms"]:
            cells = [f"{arm['probes'][p]:.4f}" if p in arm["probes"] else "—" for p in probes]
            lines.append(f"| {arm['name']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += scoreboard_lines(results)
    features = sorted({name for arm in results["arms"] for name in arm["feature_calls_min"]})
    if features:
        lines += ["## Integrity counters (fewest calls in any run)", ""]
        for arm in results["arms"]:
            counts = ", ".join(f"{k} {v:,}" for k, v in arm["feature_calls_min"].items())
            lines.append(f"- {arm['name']}: {counts or 'no optional features'}")
        lines.append("")
    if results["failed"]:
        lines += ["## Failed runs", ""]
        lines.extend(f"- {failure}" for failure in results["failed"])
        lines.append("")
    lines += ["## Plots", ""]
    lines.extend(f"![{name}]({name})" for name in plots)
    lines += ["", "## Runs", "", "| arm | seed | status | final bits/byte | tokens | s | folder |"]
    lines.append("|---|---:|---|---:|---:|---:|---|")
    for run in results["runs"]:
        lines.append(
            f"| {run['arm']} | {run['seed']} | {run['status']} ({run['how']}) "
            f"| {_number(run.get('val_bits_per_byte'), '.4f')} "
            f"| {_number(run.get('tokens'), 'd')} | {_number(run.get('train_seconds'), '.1f')} "
            f"| `{run['path']}` |"
        )
    return "\n".join(lines) + "\n"


def write_report(results: dict, out: Path) -> Path:
    """``report.md`` and its PNG plots in ``out``; returns the report's path."""
    plots = [*plot_curves(results, out), plot_throughput(results, out)]
    path = out / "report.md"
    atomic_write_text(path, render_markdown(results, plots))
    return path
