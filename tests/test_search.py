"""``lmlab search`` end to end on a tiny corpus: trials, pruning through the trainer's
evaluation hook, best.yaml, resuming (also after an interrupted trial) and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import TINY_GRID

from lmlab.cli import main
from lmlab.config.load import build_config
from lmlab.errors import LmlabError
from lmlab.experiments.search import STUDY_FILE, STUDY_NAME, _objective, _open_study, plan_search
from lmlab.train import registry
from lmlab.train.trainer import Trainer


@pytest.fixture
def space(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv(registry.REGISTRY_ENV, str(tmp_path / "registry.sqlite"))
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(3):
        lines = [
            f"Line {j} of work {i}: to be or not to be, that is the question." for j in range(300)
        ]
        (folder / f"work{i}.txt").write_text("\n".join(lines), encoding="utf-8")
    path = tmp_path / "space.yaml"
    write_space(path)
    return path


def write_space(path: Path, **params) -> None:
    """A space over the tiny corpus next to ``path``; ``params`` replace or add entries."""
    overrides = [*TINY_GRID, f"data.path={path.parent / 'corpus'}"]
    spec = {
        "train.lr": {"low": 1.0e-3, "high": 3.0e-2, "log": True},
        "model.d_model": {"low": 16, "high": 32, "step": 16},
        "model.position": ["rope", "none"],
        **params,
    }
    path.write_text(yaml.safe_dump({"base": "gpt-tiny", "overrides": overrides, "params": spec}))


def search_args(space: Path, trials: int, *extra: str) -> list[str]:
    out = space.parent / "search"
    return [
        "search",
        str(space),
        "--trials",
        str(trials),
        "--budget",
        "tokens=4k",
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


def test_search_end_to_end_best_config_and_resume(space, capsys):
    out = space.parent / "search"
    assert main(search_args(space, 2)) == 0
    assert main(search_args(space, 3)) == 0  # continues: one more trial, not three
    assert "continuing: 2 trial(s) done, 1 to go" in capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert [t["number"] for t in results["trials"]] == [0, 1, 2]
    for trial in results["trials"]:
        assert 1e-3 <= trial["params"]["train.lr"] <= 3e-2
        assert trial["params"]["model.d_model"] in (16, 32)
        assert trial["params"]["model.position"] in ("rope", "none")
    complete = [t for t in results["trials"] if t["state"] == "complete"]
    best = results["best"]
    assert best["value"] == min(t["value"] for t in complete)
    run = Path(best["run"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["val_bits_per_byte"] == best["value"]

    config = build_config(str(out / "best.yaml"))
    assert config.model.d_model == best["params"]["model.d_model"]
    assert config.train.lr == pytest.approx(best["params"]["train.lr"])
    assert config.train.max_tokens == 4000 and config.name == ""
    report = (out / "report.md").read_text()
    assert f"**Best: trial {best['number']}**" in report
    assert report.count("\n| ") == 1 + 3  # header and one row per trial
    rows, study = registry.list_runs(space.parent / "registry.sqlite", compare="search")
    assert len(rows) == 3
    assert study["verdicts"] == {"best": f"trial{best['number']}"}

    retrain = ["train", str(out / "best.yaml"), f"out_dir={space.parent / 'again'}", "--quiet"]
    assert main(retrain) == 0  # best.yaml is a config lmlab train accepts


def test_pruning_stops_a_trial_through_the_eval_hook(space):
    plan = plan_search(space, trials=1, budget="tokens=8k", out=space.parent / "pruned")
    plan.out.mkdir()
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0))
    study.optimize(lambda trial: _objective(plan, False, None, trial), n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert list(trial.intermediate_values) == [trial.user_attrs["tokens"]]
    assert trial.user_attrs["tokens"] < 8000
    assert not (Path(trial.user_attrs["run"]) / "summary.json").exists()


def test_an_interrupted_trial_is_tried_again(space):
    out = space.parent / "search"
    plan = plan_search(space, trials=1, budget="tokens=4k", out=out)
    out.mkdir()
    storage = f"sqlite:///{out / STUDY_FILE}"
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, direction="minimize")
    study.set_user_attr("fingerprint", plan.fingerprint)
    stale = study.ask()  # left running, as by a killed process
    lr = stale.suggest_float("train.lr", 1e-3, 3e-2, log=True)
    stale.suggest_int("model.d_model", 16, 32, step=16)
    stale.suggest_categorical("model.position", ["rope", "none"])
    assert main(search_args(space, 1)) == 0
    results = json.loads((out / "results.json").read_text())
    first, retry = results["trials"]
    assert first["state"] == "fail" and first["error"] == "interrupted"
    assert retry["state"] == "complete" and retry["params"]["train.lr"] == lr


def test_a_trial_stopped_by_ctrl_c_is_tried_again(space, monkeypatch):
    out = space.parent / "search"

    def interrupted(self):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "train", interrupted)
        assert main(search_args(space, 1)) == 130
    assert main(search_args(space, 1)) == 0
    first, retry = json.loads((out / "results.json").read_text())["trials"]
    assert first["state"] == "fail" and first["error"] == "interrupted"
    assert retry["state"] == "complete" and retry["params"] == first["params"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train.lr": {"low": 1.0, "high": 0.1}}, "needs low < high"),
        ({"train.lr": {"low": 0.0, "high": 0.1, "log": True}}, "needs low > 0"),
        ({"train.lr": {"low": "a", "high": 0.1}}, "must be numbers"),
        ({"train.lr": {"low": 0.1, "high": 0.2, "scale": 2}}, "unknown field"),
        ({"train.lr": 0.1}, "must be a list of choices"),
        ({"model.mixer": []}, "no or repeated choices"),
        ({"model.d_modl": [16, 32]}, "did you mean model.d_model"),
        ({"model.mixer": ["attention", "gpt"]}, "model.mixer"),
        ({"model.d_model": {"low": 16, "high": 17}}, "not divisible"),
    ],
)
def test_bad_space_is_one_line_error(space, capsys, change, message):
    write_space(space, **change)
    assert main(search_args(space, 1)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trials", "0"], "--trials=0 must be at least 1"),
        (["--budget", "tokens=lots"], "malformed"),
    ],
)
def test_bad_options_are_one_line_errors(space, capsys, args, message):
    assert main([*search_args(space, 1), *args]) == 2
    assert message in capsys.readouterr().err


def test_a_config_that_fails_in_one_trial_fails_that_trial(space):
    write_space(space, **{"model.d_model": {"low": 16, "high": 18}})
    plan = plan_search(space, trials=1, budget="tokens=4k", out=space.parent / "failed")
    plan.out.mkdir()
    values = {"train.lr": 1e-3, "model.d_model": 17, "model.position": "rope"}
    trial = optuna.trial.FixedTrial(values)
    with pytest.raises(LmlabError, match="not divisible"):
        _objective(plan, False, None, trial)
    assert "not divisible" in trial.user_attrs["error"]
    assert "not divisible" in (plan.out / "logs" / "trial0.log").read_text()


def test_missing_or_invalid_space_file(tmp_path, capsys):
    assert main(["search", str(tmp_path / "nope.yaml"), "--budget", "tokens=4k"]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("params: [\n")
    assert main(["search", str(bad), "--budget", "tokens=4k"]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    bad.write_text("base: gpt-tiny\nparam: {}\n")
    assert main(["search", str(bad), "--budget", "tokens=4k"]) == 2
    assert "unknown key(s) param" in capsys.readouterr().err


def test_another_space_in_the_same_folder_is_refused(space):
    out = space.parent / "search"
    _open_study(plan_search(space, trials=1, budget="tokens=4k", out=out))
    _open_study(plan_search(space, trials=5, budget="tokens=4k", out=out))  # more trials: fine
    with pytest.raises(LmlabError, match="another space or budget"):
        _open_study(plan_search(space, trials=1, budget="tokens=8k", out=out))
    write_space(space, **{"train.lr": {"low": 1.0e-4, "high": 1.0e-3}})
    with pytest.raises(LmlabError, match="another space or budget"):
        _open_study(plan_search(space, trials=1, budget="tokens=4k", out=out))


@pytest.mark.slow
def test_each_trial_in_several_processes(space):
    assert main(search_args(space, 1, "--nproc-per-run", "2")) == 0
    results = json.loads((space.parent / "search" / "results.json").read_text())
    [trial] = results["trials"]
    assert trial["state"] == "complete"
    summary = json.loads((Path(trial["run"]) / "summary.json").read_text())
    assert (summary["processes"], summary["parallel"]) == (2, "ddp")
    assert summary["val_bits_per_byte"] == trial["value"]


@pytest.mark.slow
def test_pruning_stops_a_trial_job_through_its_metrics(space):
    plan = plan_search(
        space, trials=1, budget="tokens=64k", out=space.parent / "pruned", nproc_per_run=2
    )
    plan.out.mkdir()
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0))
    study.optimize(lambda trial: _objective(plan, False, None, trial), n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert list(trial.intermediate_values) == [trial.user_attrs["tokens"]]
    assert not (Path(trial.user_attrs["run"]) / "summary.json").exists()
