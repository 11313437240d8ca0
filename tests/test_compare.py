"""``lmlab compare`` end to end on a tiny corpus: matched budgets, seeds, verdicts, report,
resume after an interruption, crashed runs, parallel processes and one-line errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import TINY_RUN, metrics_rows

from lmlab.cli import main
from lmlab.errors import LmlabError, ParamError
from lmlab.experiments.compare import plan_compare, time_to_target
from lmlab.experiments.runset import curve_area, parse_budget, read_probes
from lmlab.train import registry
from lmlab.train.trainer import Trainer

TINY = [*TINY_RUN, "model.d_model=16", "model.n_layers=1", "train.batch_size=8"]
"""Wider batches than the shared tiny run: the budgets below are counted in these steps."""


@pytest.fixture(autouse=True)
def private_registry(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "registry.sqlite"
    monkeypatch.setenv(registry.REGISTRY_ENV, str(path))
    return path


def compare_args(tmp_path: Path, corpus: Path, *arms_and_options: str) -> list[str]:
    return [
        "compare",
        *arms_and_options,
        "--quiet",
        "--out",
        str(tmp_path / "cmp"),
        *TINY,
        f"data.path={corpus}",
    ]


def results_of(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "cmp" / "results.json").read_text())


def steps_of(run: Path) -> list[int]:
    return [row["step"] for row in metrics_rows(run)]


def test_parse_budget():
    assert parse_budget("tokens=2M").amount == 2e6
    assert parse_budget("tokens=1500").amount == 1500
    assert parse_budget("flops=1e15").amount == 1e15
    assert parse_budget("flops=3P").amount == 3e15
    assert parse_budget("time=10m").amount == 600
    assert parse_budget("time=90").amount == 90
    assert parse_budget("time=1.5h").amount == 5400
    assert parse_budget("steps=300").amount == 300
    for bad in (
        "tokens",
        "epochs=10",
        "steps=1.5",
        "tokens=2X",
        "time=10d",
        "tokens=-5",
        "tokens=0",
        "flops=e",
    ):
        with pytest.raises(LmlabError, match=f"^budget '{bad}' "):
            parse_budget(bad)


def test_curve_area_and_time_to_target():
    assert curve_area([0, 10], [4.0, 2.0]) == pytest.approx(3.0)
    assert curve_area([100, 200, 400], [3.0, 2.0, 2.0]) == pytest.approx((250 + 400) / 300)
    assert curve_area([5], [1.5]) == 1.5 and curve_area([], []) is None
    assert time_to_target([1, 2, 3], [4.0, 3.0, 2.0], 2.5) == pytest.approx(2.5)
    assert time_to_target([1, 2, 3], [4.0, 3.0, 2.0], 5.0) == 1.0
    assert time_to_target([1, 2, 3], [4.0, 3.0, 2.0], 1.0) is None


def test_read_probes(tmp_path):
    assert read_probes(tmp_path) == {}
    (tmp_path / "probes.json").write_text(
        json.dumps({"mqar": 0.5, "induction": {"score": 0.75, "n": 10}, "note": "x", "ok": True})
    )
    assert read_probes(tmp_path) == {"mqar": 0.5, "induction": 0.75}


def test_plan_matches_budgets_and_names_arms(tmp_path, corpus):
    common = [*TINY, f"data.path={corpus}"]
    plan = plan_compare(
        ["gpt-tiny"],
        budget="flops=2e8",
        variants=["model.d_model=32"],
        overrides=common,
        seeds=2,
        out=tmp_path / "c",
    )
    small, wide = plan.arms
    assert (small.name, wide.name) == ("gpt-tiny", "gpt-tiny+d_model=32")
    assert wide.config.model.d_model == 32 and small.config.model.d_model == 16
    for arm in plan.arms:  # the same compute: tokens x FLOPs/token = budget
        assert arm.tokens * arm.flops_per_token == pytest.approx(2e8, rel=1e-3)
        assert arm.config.train.eval_interval == max(1, math.ceil(arm.tokens / 256) // 8)
    assert small.tokens > wide.tokens
    assert [(s.arm.name, s.seed, s.config.train.seed) for s in plan.runset.runs] == [
        ("gpt-tiny", 0, 0),
        ("gpt-tiny", 1, 1),
        ("gpt-tiny+d_model=32", 0, 0),
        ("gpt-tiny+d_model=32", 1, 1),
    ]
    assert plan.runset.runs[1].run_dir == tmp_path / "c" / "runs" / "gpt-tiny" / "seed1"
    timed = plan_compare(["gpt-tiny", "gpt-tiny"], budget="time=30s", overrides=common, seeds=1)
    assert [a.name for a in timed.arms] == ["gpt-tiny", "gpt-tiny-2"]
    assert all(a.config.train.max_time == 30 and a.config.train.max_tokens == 0 for a in timed.arms)
    assert timed.out.name == "compare-gpt-tiny-vs-gpt-tiny-2"
    stepped = plan_compare(["gpt-tiny", "gpt-tiny"], budget="steps=40", overrides=common, seeds=1)
    for arm in stepped.arms:  # the same optimiser steps, no token or time budget left over
        train = arm.config.train
        assert (train.max_steps, train.max_tokens, train.max_time) == (40, 0, 0.0)
        assert train.eval_interval == 5 and arm.tokens is None
    threads = plan_compare(
        ["gpt-tiny"],
        budget="tokens=4k",
        variants=["train.lr=1e-3"],
        overrides=common,
        parallel=2,
        out=tmp_path / "p",
    )
    assert all(spec.config.train.threads >= 1 for spec in threads.runset.runs)


def test_wider_model_is_promoted_then_rerun_reuses_and_probes_count(tmp_path, corpus, capsys):
    args = compare_args(
        tmp_path,
        corpus,
        "gpt-tiny",
        "--variant",
        "model.d_model=64",
        "--seeds",
        "3",
        "--budget",
        "tokens=6k",
    )
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "gpt-tiny+d_model=64 vs gpt-tiny: PROMOTE" in out
    folder = tmp_path / "cmp"
    for name in (
        "report.md",
        "results.json",
        "val_vs_tokens.png",
        "val_vs_time.png",
        "throughput.png",
        "plan.json",
    ):
        assert (folder / name).is_file(), name
    results = results_of(tmp_path)
    assert results["baseline"] == "gpt-tiny" and results["failed"] == []
    assert len(results["runs"]) == 6 and {r["how"] for r in results["runs"]} == {"new"}
    base, wide = results["arms"]
    assert base["stats"]["val_bits_per_byte"]["n"] == 3
    assert base["stats"]["tokens"]["mean"] == wide["stats"]["tokens"]["mean"] >= 6000
    assert wide["parameters"] > base["parameters"]
    run = results["runs"][0]
    assert run["auc_bits_per_byte"] > run["val_bits_per_byte"] > 0
    assert len(run["curve"]) >= 8 and run["peak_memory_mb"] > 0
    (verdict,) = results["verdicts"]
    assert verdict["decision"] == "PROMOTE" and verdict["difference"]["n"] == 3
    assert verdict["difference"]["t_interval"][1] < 0
    report = (folder / "report.md").read_text()
    assert "| gpt-tiny (baseline) |" in report and "**PROMOTE**" in report
    assert "improvement" in report and "![val_vs_tokens.png](val_vs_tokens.png)" in report
    same_batches = [r for r in results["runs"] if r["seed"] == 1]
    assert {r["tokens"] for r in same_batches} == {base["stats"]["tokens"]["mean"]}

    listed, compare = registry.list_runs(compare="cmp")
    assert len(listed) == 6 and {r["status"] for r in listed} == {"finished"}
    assert compare["verdicts"] == {"gpt-tiny+d_model=64": "PROMOTE"}

    for r in results["runs"]:  # a probe the wide model is much worse at
        score = 0.2 if r["arm"] == "gpt-tiny+d_model=64" else 0.9
        (Path(r["path"]) / "probes.json").write_text(json.dumps({"recall": score}))
    assert main(args) == 0
    rerun = results_of(tmp_path)
    assert {r["how"] for r in rerun["runs"]} == {"reused"}
    assert rerun["verdicts"][0]["decision"] == "NO EVIDENCE"
    assert "probe recall drops 0.7 > tolerance 0.02: fail" in rerun["verdicts"][0]["reasons"]
    assert "## Probes" in (folder / "report.md").read_text()

    capsys.readouterr()
    changed = [a if a != "tokens=6k" else "tokens=8k" for a in args]
    assert main(changed) == 2
    assert "already holds gpt-tiny/seed0 trained with other settings" in capsys.readouterr().err


def test_interrupted_compare_resumes_where_it_stopped(tmp_path, corpus, monkeypatch):
    args = compare_args(
        tmp_path,
        corpus,
        "gpt-tiny",
        "--variant",
        "train.lr=1e-2",
        "--seeds",
        "1",
        "--budget",
        "tokens=4k",
    )
    original = Trainer._step

    def stop_second_run(trainer):
        if "lr=" in str(trainer.run_dir) and trainer.state.step == 6:
            raise KeyboardInterrupt
        original(trainer)

    monkeypatch.setattr(Trainer, "_step", stop_second_run)
    assert main(args) == 130
    runs = tmp_path / "cmp" / "runs"
    first, second = runs / "gpt-tiny" / "seed0", runs / "gpt-tiny+lr=1e-2" / "seed0"
    assert (first / "summary.json").is_file() and not (second / "summary.json").exists()
    monkeypatch.setattr(Trainer, "_step", original)
    finished_before = (first / "summary.json").stat().st_mtime_ns
    assert main(args) == 0
    results = results_of(tmp_path)
    assert [r["how"] for r in results["runs"]] == ["reused", "resumed"]
    assert (first / "summary.json").stat().st_mtime_ns == finished_before
    assert steps_of(second) == list(range(1, 17))  # ceil(4000 / (8 * 32)) steps, no gap


def test_crashed_run_is_reported_and_exit_is_nonzero(tmp_path, corpus, monkeypatch, capsys):
    original = Trainer._step

    def crash(trainer):
        if "lr=" in str(trainer.run_dir) and trainer.run_dir.name == "seed1":
            raise RuntimeError("boom")
        original(trainer)

    monkeypatch.setattr(Trainer, "_step", crash)
    args = compare_args(
        tmp_path,
        corpus,
        "gpt-tiny",
        "--variant",
        "train.lr=1e-2",
        "--seeds",
        "2",
        "--budget",
        "tokens=2k",
    )
    assert main(args) == 1
    assert "FAILED gpt-tiny+lr=1e-2/seed1: RuntimeError: boom" in capsys.readouterr().out
    results = results_of(tmp_path)
    assert [r["status"] for r in results["runs"]] == ["finished", "finished", "finished", "failed"]
    assert results["arms"][1]["failed"] == 1
    assert "1 of 2 seed pairs finished: fail" in results["verdicts"][0]["reasons"]
    assert "## Failed runs" in (tmp_path / "cmp" / "report.md").read_text()
    log = tmp_path / "cmp" / "logs" / "gpt-tiny+lr=1e-2-seed1.log"
    assert "RuntimeError: boom" in log.read_text()
    failed = registry.list_runs(filters=["status=failed"])[0]
    assert [(r["arm"], r["seed"]) for r in failed] == [("gpt-tiny+lr=1e-2", 1)]


def test_parallel_runs_in_child_processes(tmp_path, corpus):
    args = compare_args(
        tmp_path,
        corpus,
        "gpt-tiny",
        "--variant",
        "model.d_model=32",
        "--seeds",
        "1",
        "--budget",
        "tokens=2k",
        "--parallel",
        "2",
    )
    assert main(args) == 0
    results = results_of(tmp_path)
    assert [r["status"] for r in results["runs"]] == ["finished", "finished"]
    for r in results["runs"]:
        saved = yaml.safe_load((Path(r["path"]) / "config.yaml").read_text())
        assert saved["train"]["threads"] >= 1
        assert (tmp_path / "cmp" / "logs" / f"{r['arm']}-seed0.log").is_file()


def test_bad_input_is_one_line_exit_2(tmp_path, corpus, capsys):
    rule = tmp_path / "nats.yaml"
    rule.write_text("metric: val_loss\n")
    cases = [
        (["gpt-tiny", "--variant", "model.d_model=32", "--budget", "tokens=lots"], "malformed"),
        (["gpt-tiny", "--variant", "model.d_model=32"], "give --budget"),
        (
            ["gpt-tiny", "--variant", "model.d_model=32", "--budget", "tokens=100"],
            "less than one training step",
        ),
        (
            ["gpt-tiny", "--variant", "model.d_model=32", "--budget", "flops=1e5"],
            "less than one training step",
        ),
        (
            ["gpt-tiny", "--variant", "model.mixer=nosuch", "--budget", "tokens=4k"],
            "arm gpt-tiny+mixer=nosuch: unknown token mixer",
        ),
        (["gpt-tiny", "--variant", "model.n_heads=3", "--budget", "tokens=4k"], "not divisible"),
        (
            [
                "gpt-tiny",
                "--variant",
                "data.tokenizer=byte",
                "--budget",
                "tokens=4k",
                "--rule",
                str(rule),
            ],
            "different tokenizers",
        ),
        (["gpt-tiny", "--budget", "tokens=4k"], "compare needs two arms"),
        (["gpt-tiny", "gpt-tiny", "--budget", "tokens=4k", "--baseline", "x"], "not an arm"),
        (["gpt-tiny", "gpt-tiny", "--budget", "tokens=4k", "--seeds", "0"], "--seeds=0"),
        (["gpt-tiny", "missing.yaml", "--budget", "tokens=4k"], "does not exist"),
    ]
    for argv, fragment in cases:
        capsys.readouterr()
        assert main(compare_args(tmp_path, corpus, *argv)) == 2, argv
        err = capsys.readouterr().err.strip()
        assert fragment in err, (argv, err)
        assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert not (tmp_path / "cmp").exists()


@pytest.mark.slow
def test_each_run_in_several_processes(tmp_path, corpus):
    args = compare_args(
        tmp_path,
        corpus,
        "gpt-tiny",
        "--variant",
        "model.d_model=32",
        "--seeds",
        "1",
        "--budget",
        "tokens=2k",
        "--parallel",
        "1",
        "--nproc-per-run",
        "2",
    )
    assert main(args) == 0
    results = results_of(tmp_path)
    assert [r["status"] for r in results["runs"]] == ["finished", "finished"]
    for r in results["runs"]:
        summary = json.loads((Path(r["path"]) / "summary.json").read_text())
        assert (summary["processes"], summary["parallel"]) == (2, "ddp")


def test_several_processes_per_run_need_child_processes(tmp_path, corpus):
    with pytest.raises(ParamError, match=r"nproc_per_run.*parallel"):
        plan_compare(
            ["gpt-tiny"],
            variants=["model.d_model=32"],
            budget="tokens=2k",
            nproc_per_run=2,
            out=tmp_path / "cmp",
        )
