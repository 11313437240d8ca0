"""Statistics over seeds and the promotion rule, on synthetic numbers (no training)."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from lmlab.errors import LmlabError
from lmlab.experiments.stats import (
    NO_EVIDENCE,
    PROMOTE,
    REGRESSION,
    Rule,
    decide,
    describe,
    load_rule,
    paired_difference,
    t_cdf,
    t_quantile,
)


@pytest.mark.parametrize(
    ("p", "df", "expected"),
    [
        (0.975, 1, 12.7062),
        (0.975, 2, 4.3027),
        (0.975, 4, 2.7764),
        (0.975, 30, 2.0423),
        (0.995, 5, 4.0321),
        (0.975, 1000, 1.9623),
        (0.025, 3, -3.1824),
    ],
)
def test_t_quantile_matches_tables(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=1e-4)
    assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-9)


def test_t_cdf_is_symmetric():
    assert t_cdf(0.0, 3) == pytest.approx(0.5)
    assert t_cdf(-1.5, 7) == pytest.approx(1 - t_cdf(1.5, 7))


def test_describe():
    assert describe([1.0, 2.0, 4.0]) == {
        "n": 3,
        "mean": pytest.approx(7 / 3),
        "sd": pytest.approx(statistics.stdev([1.0, 2.0, 4.0])),
        "min": 1.0,
        "max": 4.0,
    }
    assert describe([5.0])["sd"] == 0.0
    assert describe([])["mean"] is None


def test_paired_difference_t_interval_and_effect_size():
    baseline = {0: 1.0, 1: 2.0, 2: 3.0, 3: 9.0}
    candidate = {0: 0.9, 1: 1.8, 2: 2.9}  # seed 3 missing: only shared seeds pair
    diff = paired_difference(baseline, candidate)
    values = [-0.1, -0.2, -0.1]
    sd = statistics.stdev(values)
    half = 4.302652729749752 * sd / math.sqrt(3)
    assert diff.n == 3 and diff.seeds == [0, 1, 2]
    assert diff.mean == pytest.approx(-0.4 / 3)
    assert diff.sd == pytest.approx(sd)
    assert diff.t_interval == pytest.approx((-0.4 / 3 - half, -0.4 / 3 + half))
    assert diff.cohens_d == pytest.approx((-0.4 / 3) / sd)
    low, high = diff.bootstrap_interval
    assert -0.2 - 1e-9 <= low < high <= -0.1 + 1e-9


def test_bootstrap_is_seeded_and_agrees_with_t_on_many_seeds():
    rng = np.random.default_rng(1)
    baseline = dict(enumerate(rng.normal(size=200)))
    candidate = {k: v + 0.3 + rng.normal() for k, v in baseline.items()}
    first = paired_difference(baseline, candidate)
    assert paired_difference(baseline, candidate).bootstrap_interval == first.bootstrap_interval
    assert paired_difference(baseline, candidate, seed=1).bootstrap_interval != (
        first.bootstrap_interval
    )
    width_t = first.t_interval[1] - first.t_interval[0]
    width_boot = first.bootstrap_interval[1] - first.bootstrap_interval[0]
    assert width_boot == pytest.approx(width_t, rel=0.15)


def test_paired_difference_degenerate_cases():
    assert paired_difference({}, {}).mean is None
    single = paired_difference({0: 1.0}, {0: 0.5})
    assert single.mean == -0.5 and single.t_interval is None and single.bootstrap_interval is None
    constant = paired_difference({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})
    assert constant.t_interval == (0.0, 0.0) and constant.cohens_d is None


def verdict(base, cand, rule=None, **kwargs):
    return decide(
        rule or Rule(),
        "cand",
        "base",
        dict(enumerate(base)),
        dict(enumerate(cand)),
        expected_pairs=kwargs.pop("expected", len(base)),
        **kwargs,
    )


BASE = [2.00, 2.10, 1.95]
BETTER = [1.95, 2.04, 1.91]  # 0.05 better on average, consistently


def test_clear_improvement_is_promoted_with_reasons():
    result = verdict(BASE, BETTER)
    assert result.decision == PROMOTE
    assert len(result.reasons) == 5 and all(r.endswith(": pass") for r in result.reasons)
    assert "improvement 0.05 bits/byte > min effect 0.01: pass" in result.reasons
    assert any("t-interval of the difference" in r and "better side" in r for r in result.reasons)


def test_significant_but_smaller_than_min_effect_is_no_evidence():
    result = verdict(BASE, [b - 0.005 for b in BASE[:2]] + [BASE[2] - 0.006])
    assert result.decision == NO_EVIDENCE
    assert any(r.startswith("improvement 0.005") and r.endswith("fail") for r in result.reasons)
    assert any("better side: pass" in r for r in result.reasons)


def test_large_but_noisy_difference_is_no_evidence():
    result = verdict(BASE, [1.80, 2.30, 1.75])
    assert result.decision == NO_EVIDENCE
    assert any("includes zero: fail" in r for r in result.reasons)


def test_significantly_worse_is_a_regression():
    result = verdict(BASE, [b + 0.05 for b in BASE])
    assert result.decision == REGRESSION
    assert any("worse side: fail" in r for r in result.reasons)


def test_probe_regression_and_idle_feature_block_promotion():
    dropped = verdict(BASE, BETTER, probe_changes={"mqar": -0.05, "induction": 0.1})
    assert dropped.decision == NO_EVIDENCE
    assert "probe mqar drops 0.05 > tolerance 0.02: fail" in dropped.reasons
    within = verdict(BASE, BETTER, probe_changes={"mqar": -0.01})
    assert within.decision == PROMOTE
    idle = verdict(BASE, BETTER, features={"moe_router": 120, "window": 0})
    assert idle.decision == NO_EVIDENCE
    assert "feature(s) window never ran in some run: fail" in idle.reasons
    assert verdict(BASE, BETTER, features={"moe_router": 120}).decision == PROMOTE


def test_missing_pairs_and_single_seed_are_no_evidence():
    missing = verdict(BASE, BETTER[:2], expected=3)
    assert missing.decision == NO_EVIDENCE
    assert "2 of 3 seed pairs finished: fail" in missing.reasons
    single = verdict(BASE[:1], [1.0])
    assert single.decision == NO_EVIDENCE
    assert any("no interval" in r for r in single.reasons)
    nothing = verdict(BASE, [], expected=3)
    assert nothing.decision == NO_EVIDENCE and nothing.difference.n == 0


def test_higher_is_better_metric_and_bootstrap_interval():
    rule = Rule(metric="tokens_per_s", min_effect=100.0, interval="bootstrap")
    result = verdict([1000.0, 1100.0, 1050.0], [1500.0, 1620.0, 1540.0], rule)
    assert result.decision == PROMOTE
    assert any("bootstrap-interval" in r and "tokens/s" in r for r in result.reasons)
    assert verdict([1500.0, 1620.0, 1540.0], [1000.0, 1100.0, 1050.0], rule).decision == REGRESSION


def test_aa_noise_is_promoted_at_most_5_percent():
    """Under no true difference, PROMOTE needs a one-sided 2.5% t-test to fire (and an effect
    above min_effect): even with min_effect 0 the rate stays near 2.5%."""
    rng = np.random.default_rng(0)
    rule = Rule(min_effect=0.0)
    promoted = sum(
        verdict(list(rng.normal(2.0, 0.03, 3)), list(rng.normal(2.0, 0.03, 3)), rule).decision
        == PROMOTE
        for _ in range(600)
    )
    assert promoted / 600 <= 0.05


def test_load_rule(tmp_path):
    assert load_rule(None) == Rule()
    good = tmp_path / "rule.yaml"
    good.write_text("min_effect: 0.05\nconfidence: 0.9\nmetric: best_val_bits_per_byte\n")
    assert load_rule(good) == Rule(metric="best_val_bits_per_byte", min_effect=0.05, confidence=0.9)
    for text, fragment in [
        ("min_efect: 0.05", "unknown rule key 'min_efect'"),
        ("metric: accuracy", "rule metric 'accuracy' is unknown"),
        ("confidence: 1.5", "between 0 and 1"),
        ("min_effect: lots", "must be a number"),
        ("interval: z", "use t or bootstrap"),
        ("- 1", "must hold a mapping"),
        ("a: [", "not valid YAML"),
    ]:
        good.write_text(text)
        with pytest.raises(LmlabError, match=fragment):
            load_rule(good)
    with pytest.raises(LmlabError, match="does not exist"):
        load_rule(tmp_path / "missing.yaml")
