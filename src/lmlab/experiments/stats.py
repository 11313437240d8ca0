"""Statistics over seeds and the promotion rule that turns them into a verdict.

A comparison pairs the runs of two arms by seed index (same initial seed, same batches), so
the unit of evidence is the per-seed difference ``candidate - baseline``. Its mean gets a
Student-t interval (exact under normal noise, the verdict's default) and a seeded percentile
bootstrap interval (no normality assumption, but too narrow with few seeds), and Cohen's d of
the differences (mean / sd) says how large the effect is relative to seed noise.

The t quantile is computed here (regularised incomplete beta function, inverted by bisection)
so the statistics need nothing beyond numpy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import yaml

from lmlab.errors import LmlabError

PROMOTE = "PROMOTE"
REGRESSION = "REGRESSION"
NO_EVIDENCE = "NO EVIDENCE"


@dataclass(frozen=True)
class Metric:
    """A per-run number a rule can decide on."""

    unit: str
    lower_is_better: bool = True
    per_token: bool = False
    """Measured in nats per token: only comparable between arms with the same tokenizer."""


METRICS = {
    "val_bits_per_byte": Metric("bits/byte"),
    "best_val_bits_per_byte": Metric("bits/byte"),
    "auc_bits_per_byte": Metric("bits/byte"),
    "val_loss": Metric("nats/token", per_token=True),
    "best_val_loss": Metric("nats/token", per_token=True),
    "auc_loss": Metric("nats/token", per_token=True),
    "tokens_per_s": Metric("tokens/s", lower_is_better=False),
}


# ------------------------------------------------------------------------ distributions


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz evaluation)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return result


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the CDF of a Beta(a, b) distribution at ``x``."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (e.g. 0.975 with df=2 is 4.303)."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2.0 * high
    for _ in range(200):
        middle = 0.5 * (low + high)
        if t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle
        if high - low < 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


# ------------------------------------------------------------------------ summaries


def describe(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min, max and count; None when empty."""
    if not values:
        return {"n": 0, "mean": None, "sd": None, "min": None, "max": None}
    array = np.asarray(values, dtype=float)
    return {
        "n": len(values),
        "mean": float(array.mean()),
        "sd": float(array.std(ddof=1)) if len(values) > 1 else 0.0,
        "min": float(array.min()),
        "max": float(array.max()),
    }


@dataclass
class PairedDifference:
    """``candidate - baseline`` over the seed indices where both runs finished."""

    n: int
    mean: float | None
    sd: float | None
    confidence: float
    t_interval: tuple[float, float] | None
    bootstrap_interval: tuple[float, float] | None
    cohens_d: float | None
    """Mean / sd of the differences (d_z); None when the differences do not vary."""
    seeds: list[int] = field(default_factory=list)


def paired_difference(
    baseline: dict[int, float],
    candidate: dict[int, float],
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> PairedDifference:
    """Per-seed differences of two arms (keyed by seed index), their t and bootstrap intervals."""
    seeds = sorted(set(baseline) & set(candidate))
    diffs = np.array([candidate[s] - baseline[s] for s in seeds], dtype=float)
    n = len(diffs)
    if n == 0:
        return PairedDifference(0, None, None, confidence, None, None, None, seeds)
    mean = float(diffs.mean())
    if n == 1:
        return PairedDifference(1, mean, None, confidence, None, None, None, seeds)
    sd = float(diffs.std(ddof=1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return PairedDifference(
        n=n,
        mean=mean,
        sd=sd,
        confidence=confidence,
        t_interval=(mean - half, mean + half),
        bootstrap_interval=(float(low), float(high)),
        cohens_d=mean / sd if sd > 0 else None,
        seeds=seeds,
    )


# ------------------------------------------------------------------------ the rule


@dataclass
class Rule:
    """When a candidate may replace the baseline; every field can be set in a ``--rule`` YAML."""

    metric: str = "val_bits_per_byte"
    min_effect: float = 0.01
    """Smallest improvement worth promoting, in the metric's unit."""
    confidence: float = 0.95
    interval: str = "t"
    """Which interval must exclude zero: ``t`` (Student) or ``bootstrap``."""
    probe_tolerance: float = 0.02
    """Largest allowed drop of any probe score (probe scores: higher is better)."""

    def validate(self) -> None:
        if self.metric not in METRICS:
            raise LmlabError(
                f"rule metric {self.metric!r} is unknown; use one of {', '.join(METRICS)}"
            )
        if self.min_effect < 0:
            raise LmlabError(f"rule min_effect={self.min_effect} must not be negative")
        if not 0 < self.confidence < 1:
            raise LmlabError(f"rule confidence={self.confidence} must be between 0 and 1")
        if self.interval not in ("t", "bootstrap"):
            raise LmlabError(f"rule interval={self.interval!r} is unknown; use t or bootstrap")
        if self.probe_tolerance < 0:
            raise LmlabError(f"rule probe_tolerance={self.probe_tolerance} must not be negative")

    @property
    def unit(self) -> str:
        return METRICS[self.metric].unit


def load_rule(path: str | Path | None) -> Rule:
    """The default rule, updated by the keys of a YAML file."""
    rule = Rule()
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise LmlabError(f"rule file {file} does not exist; give a YAML file of rule settings")
        try:
            settings = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            raise LmlabError(f"rule file {file} is not valid YAML; fix its syntax") from None
        if not isinstance(settings, dict):
            raise LmlabError(f"rule file {file} must hold a mapping, e.g. 'min_effect: 0.02'")
        known = {f.name: f for f in fields(Rule)}
        for key, value in settings.items():
            if key not in known:
                raise LmlabError(f"unknown rule key {key!r} in {file}; keys: {', '.join(known)}")
            expected = float if known[key].type == "float" else str
            if expected is float and (
                isinstance(value, bool) or not isinstance(value, int | float)
            ):
                raise LmlabError(f"rule {key}={value!r} in {file} must be a number")
            if expected is str and not isinstance(value, str):
                raise LmlabError(f"rule {key}={value!r} in {file} must be a string")
            setattr(rule, key, expected(value))
    rule.validate()
    return rule


@dataclass
class Verdict:
    """The decision for one candidate against the baseline, and one sentence per rule."""

    candidate: str
    baseline: str
    decision: str
    reasons: list[str]
    difference: PairedDifference

    def to_dict(self) -> dict:
        return asdict(self)


def _check(passed: bool, sentence: str) -> str:
    return f"{sentence}: {'pass' if passed else 'fail'}"


def tolerated_drops(rule: Rule, kind: str, changes: dict[str, float]) -> str:
    """The check that no score (``kind``: probe, lm-eval task; higher is better) falls by more
    than the rule's ``probe_tolerance``; names the largest drop when one does."""
    drops = {
        name: -change for name, change in sorted(changes.items()) if -change > rule.probe_tolerance
    }
    if drops:
        name, drop = max(drops.items(), key=lambda item: item[1])
        return _check(False, f"{kind} {name} drops {drop:.4g} > tolerance {rule.probe_tolerance:g}")
    if changes:
        return _check(True, f"no {kind} of {len(changes)} drops more than {rule.probe_tolerance:g}")
    return _check(True, f"no {kind} scores to check")


def decide(
    rule: Rule,
    candidate: str,
    baseline: str,
    baseline_values: dict[int, float],
    candidate_values: dict[int, float],
    expected_pairs: int,
    probe_changes: dict[str, float] | None = None,
    features: dict[str, int] | None = None,
    task_changes: dict[str, float] | None = None,
) -> Verdict:
    """Apply ``rule`` to per-seed values of the rule's metric (keyed by seed index).

    ``probe_changes`` is candidate minus baseline mean score per probe; ``features`` the
    smallest total of each enabled feature's integrity counter over the candidate's runs;
    ``task_changes`` (when benchmark tasks were scored) the candidate's mean gain per task,
    positive when better, held to the probes' tolerance (see :func:`tolerated_drops`).
    PROMOTE needs every check to pass; REGRESSION needs only the interval to lie on the worse
    side; anything else is NO EVIDENCE.
    """
    metric = METRICS[rule.metric]
    unit = rule.unit
    diff = paired_difference(baseline_values, candidate_values, rule.confidence)
    reasons = []

    finished = diff.n == expected_pairs and diff.n > 0
    reasons.append(_check(finished, f"{diff.n} of {expected_pairs} seed pairs finished"))

    if diff.mean is None:
        reasons.append(_check(False, "no finished seed pair, so no effect to measure"))
        return Verdict(candidate, baseline, NO_EVIDENCE, reasons, diff)

    sign = -1.0 if metric.lower_is_better else 1.0
    improvement = sign * diff.mean + 0.0  # no "-0" in the sentence
    big_enough = improvement > rule.min_effect
    relation = ">" if big_enough else "<="
    reasons.append(
        _check(
            big_enough,
            f"improvement {improvement:.4g} {unit} {relation} min effect {rule.min_effect:g}",
        )
    )

    interval = diff.t_interval if rule.interval == "t" else diff.bootstrap_interval
    better = worse = False
    if interval is None:
        reasons.append(_check(False, f"only {diff.n} seed pair: no interval (it needs 2 or more)"))
    else:
        gains = sorted(sign * bound for bound in interval)
        better, worse = gains[0] > 0, gains[1] < 0
        where = "on the better side" if better else "on the worse side" if worse else "zero"
        verb = "excludes zero, lies" if better or worse else "includes"
        reasons.append(
            _check(
                better,
                f"{rule.confidence:.0%} {rule.interval}-interval of the difference "
                f"[{interval[0]:.4g}, {interval[1]:.4g}] {unit} {verb} {where}",
            )
        )

    reasons.append(tolerated_drops(rule, "probe", probe_changes or {}))
    if task_changes is not None:
        reasons.append(tolerated_drops(rule, "lm-eval task", task_changes))

    idle = sorted(name for name, calls in (features or {}).items() if calls <= 0)
    if idle:
        reasons.append(_check(False, f"feature(s) {', '.join(idle)} never ran in some run"))
    elif features:
        reasons.append(_check(True, f"all {len(features)} enabled feature(s) ran in every run"))
    else:
        reasons.append(_check(True, "no optional features to check"))

    if all(reason.endswith(": pass") for reason in reasons):
        decision = PROMOTE
    elif worse:
        decision = REGRESSION
    else:
        decision = NO_EVIDENCE
    return Verdict(candidate, baseline, decision, reasons, diff)
