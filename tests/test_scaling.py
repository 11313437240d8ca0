"""The scaling-law fit on synthetic data, and ``lmlab scale`` end to end on a tiny corpus."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_GRID

from lmlab.cli import main
from lmlab.errors import LmlabError
from lmlab.experiments.scale import parse_holdout, parse_sizes, parse_tokens
from lmlab.experiments.scaling import fit_scaling_law, relative_error
from lmlab.train import registry

TRUE = {"E": 1.5, "A": 30.0, "alpha": 0.35, "B": 60.0, "beta": 0.3}
SIZES = [1e4, 3e4, 1e5, 3e5]
TOKENS = [1e5, 3e5, 1e6, 3e6]


def law(n: float, d: float) -> float:
    return TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]


def synthetic(noise: float, seed: int = 0) -> tuple[list[float], list[float], list[float]]:
    rng = np.random.default_rng(seed)
    n = [size for size in SIZES for _ in TOKENS]
    d = [tokens for _ in SIZES for tokens in TOKENS]
    loss = [law(a, b) * (1 + noise * rng.standard_normal()) for a, b in zip(n, d, strict=True)]
    return n, d, loss


def test_fit_recovers_exact_parameters():
    fit = fit_scaling_law(*synthetic(0.0))
    for name, value in TRUE.items():
        assert getattr(fit, name) == pytest.approx(value, rel=1e-4), name
    assert fit.rms_log_residual < 1e-6
    assert fit.warnings == ()


def test_noisy_fit_predicts_a_larger_held_out_run():
    fit = fit_scaling_law(*synthetic(0.001, seed=1))
    assert fit.alpha == pytest.approx(TRUE["alpha"], rel=0.1)
    assert fit.beta == pytest.approx(TRUE["beta"], rel=0.1)
    # 3x beyond the largest model and 3x beyond the largest token budget
    assert abs(relative_error(fit.predict(1e6, 1e7), law(1e6, 1e7))) < 0.005


def test_fit_warns_when_an_exponent_is_not_identified():
    n = [size for size in SIZES for _ in TOKENS[:2]]
    d = [tokens for _ in SIZES for tokens in TOKENS[:2]]
    fit = fit_scaling_law(n, d, [law(a, b) for a, b in zip(n, d, strict=True)])
    assert len(fit.warnings) == 1 and "2 token budgets" in fit.warnings[0]


@pytest.mark.parametrize(
    ("n", "d", "loss", "message"),
    [
        ([1e4, 2e4, 3e4, 4e4], [1e5, 2e5, 1e5, 2e5], [3.0, 2.9, 2.8, 2.7], "at least 5 runs"),
        ([1e4] * 6, [1e5, 2e5, 3e5] * 2, [3.0] * 6, "two different model sizes"),
        ([1e4, 2e4, 3e4] * 2, [1e5] * 6, [3.0] * 6, "two different token budgets"),
        ([1e4, 2e4, 3e4] * 2, [1e5] * 3 + [2e5] * 3, [3.0] * 5 + [0.0], "loss L must be positive"),
        ([1e4, 2e4], [1e5], [3.0, 2.0], "one value per run"),
    ],
)
def test_degenerate_inputs_are_refused(n, d, loss, message):
    with pytest.raises(LmlabError, match=message):
        fit_scaling_law(n, d, loss)


def test_parsers():
    assert parse_sizes(["d_model=16,32", "n_layers=1,2"]) == (
        ["model.d_model", "model.n_layers"],
        [["16", "1"], ["32", "2"]],
    )
    assert parse_tokens("8k, 16k") == ["8k", "16k"]
    assert parse_holdout("d_model=64 tokens=32k", ["model.d_model"]) == (
        {"model.d_model": "64"},
        "32k",
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--tokens", "8k,16k"], "give --sizes"),
        (["--sizes", "d_model=16,24,32"], "give --tokens"),
        (["--sizes", "d_model=16,24", "--sizes", "n_layers=1", "--tokens", "8k"], "equally many"),
        (["--sizes", "train.lr=1,2,3", "--tokens", "8k,16k"], "scale model settings"),
        (["--sizes", "d_model=16,24,32", "--tokens", "8k"], "two or more token budgets"),
        (["--sizes", "d_model=16,24", "--tokens", "8k,16k"], "4 points but the law has 5"),
        (["--sizes", "rope_theta=1,2,3", "--tokens", "8k,16k"], "same parameter count"),
        (["--sizes", "d_model=16,24,32", "--tokens", "8k,8x"], "malformed"),
        (["--sizes", "d_model=16,24,32", "--tokens", "8k,16k", "--holdout", "d_model=64"], "needs"),
        (
            [
                "--sizes",
                "d_model=16,24,32",
                "--tokens",
                "8k,16k",
                "--holdout",
                "d_model=16 tokens=8k",
            ],
            "is a grid point",
        ),
        (["--sizes", "d_model=16,24,32", "--tokens", "8k,16k", "model.d_modl=3"], "did you mean"),
    ],
)
def test_bad_input_is_one_line_error(tmp_path, capsys, options, message):
    code = main(["scale", "--quiet", "--out", str(tmp_path / "s"), *options, *TINY_GRID])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / "s").exists()


def test_scale_end_to_end_and_resume(tmp_path, corpus, monkeypatch, capsys):
    monkeypatch.setenv(registry.REGISTRY_ENV, str(tmp_path / "registry.sqlite"))
    out = tmp_path / "study"
    args = [
        "scale",
        "gpt-tiny",
        "--sizes",
        "d_model=16,24,32",
        "--tokens",
        "4k,8k",
        "--holdout",
        "d_model=48 tokens=12k",
        "--quiet",
        "--out",
        str(out),
        *TINY_GRID,
        f"data.path={corpus}",
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "relative error" in printed
    results = json.loads((out / "results.json").read_text())
    assert len(results["points"]) == 6 and results["fit"]["points"] == 6
    assert [r["how"] for r in results["runs"]] == ["new"] * 7
    held = results["holdout"]
    assert held["relative_error"] == pytest.approx(
        (held["predicted"] - held["actual"]) / held["actual"]
    )
    assert held["D"] == held["D_trained"] >= 12_000  # predicted at the tokens it then trained
    assert held["N"] > max(p["N"] for p in results["points"])
    for point in results["points"]:
        assert point["L"] > 0 and point["seeds_finished"] == 1
    report = (out / "report.md").read_text()
    assert "## Held-out run" in report and "loss_vs_params.png" in report
    assert (out / "loss_vs_params.png").stat().st_size > 0
    rows, study = registry.list_runs(tmp_path / "registry.sqlite", compare="study")
    assert len(rows) == 7 and all(r["status"] == "finished" for r in rows)
    assert "holdout relative error" in study["verdicts"]

    assert main(args) == 0  # everything is reused; the fit and prediction are the same
    again = json.loads((out / "results.json").read_text())
    assert [r["how"] for r in again["runs"]] == ["reused"] * 7
    assert again["holdout"]["predicted"] == pytest.approx(held["predicted"], rel=1e-6)
