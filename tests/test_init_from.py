"""``train.init_from``: a new run starts from another run's weights (only its weights), records
its parent, refuses another architecture in one line, and is an ordinary run for every verb."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch
from conftest import TINY_GRID

from lmlab.cli import main
from lmlab.config.load import build_config
from lmlab.errors import LmlabError
from lmlab.train import registry
from lmlab.train.checkpoint import load_checkpoint_at, load_latest_checkpoint
from lmlab.train.launch import new_trainer, parent_config
from lmlab.train.run import open_run, split_init_spec

PARENT = [*TINY_GRID, "model.d_model=32", "train.checkpoint_interval=3", "train.eval_interval=3"]


@pytest.fixture
def parent(tmp_path: Path, corpus: Path) -> Path:
    """A 6-step run with checkpoints at steps 3 and 6."""
    settings = [*PARENT, "train.max_steps=6", f"data.path={corpus}", f"out_dir={tmp_path}"]
    assert main(["train", "--quiet", *settings, "name=parent"]) == 0
    return tmp_path / "parent"


def child_config(parent: Path, *extra: str):
    return parent_config(None, [f"train.init_from={parent}@3", "name=child", *extra])


def test_child_starts_from_the_parent_weights_with_a_fresh_optimiser(parent):
    config = child_config(parent, "train.lr=1e-4", "train.max_steps=2")
    assert config.model == open_run(parent)[1].model  # no config given: the parent's settings
    trainer = new_trainer(config, "init", show_progress=False)
    try:
        weights = load_checkpoint_at(parent, 3).model
        for name, tensor in trainer.model.state_dict().items():
            assert torch.equal(tensor, weights[name]), name
        assert trainer.state.step == 0 and not trainer.optimizers.optimizers["adamw"].state
    finally:
        trainer.hold.release()


def test_parent_is_recorded_in_config_summary_and_registry(parent, capsys):
    out = parent.parent
    assert main(["train", "--quiet", f"train.init_from={parent}@3", "train.max_steps=2"]) == 0
    child = next(p for p in out.iterdir() if p.name.startswith("init-"))
    expected = {
        "run": str(parent.resolve()),
        "step": 3,
        "config_hash": registry.config_hash(open_run(parent)[1]),
    }
    assert vars(open_run(child)[1].parent) == expected
    assert json.loads((child / "summary.json").read_text())["parent"] == expected
    capsys.readouterr()
    assert main(["runs", str(out), "--json"]) == 0
    rows = {Path(r["path"]).name: r for r in json.loads(capsys.readouterr().out)["runs"]}
    assert rows[child.name]["parent"] == f"{parent.resolve()}@3"
    assert rows["parent"]["parent"] is None
    assert main(["runs", str(out)]) == 0
    assert "parent@3" in capsys.readouterr().out


def test_newest_checkpoint_when_no_step_is_given(parent):
    config = child_config(parent)
    config.train.init_from = str(parent)
    trainer = new_trainer(config, "init", show_progress=False)
    trainer.hold.release()
    assert config.parent.step == load_latest_checkpoint(parent).step == 6


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "model.d_model=48",
            "embed.weight has shape (",
        ),
        ("model.n_layers=2", "blocks.1."),
    ],
)
def test_architecture_mismatch_is_one_line_naming_the_first_parameter(parent, override, message):
    config = child_config(parent, override)
    with pytest.raises(LmlabError) as error:
        new_trainer(config, "init", show_progress=False)
    text = str(error.value)
    assert "\n" not in text and message in text and "does not fit this model" in text
    if override.startswith("model.n_layers"):
        assert "is missing from the checkpoint" in text
    assert not (parent.parent / "child").exists()  # nothing left behind


def test_bad_init_from_specs_are_one_line(parent, tmp_path):
    with pytest.raises(LmlabError, match="no checkpoint of step 4; it keeps steps: 3, 6"):
        new_trainer(child_config(parent, f"train.init_from={parent}@4"), "init", False)
    with pytest.raises(LmlabError, match="is not a step"):
        split_init_spec(f"{parent}@latest")
    with pytest.raises(LmlabError, match="does not exist"):
        parent_config(None, [f"train.init_from={tmp_path / 'nothing'}"])
    assert split_init_spec("runs/a@12") == (Path("runs/a"), 12)


def test_resume_before_the_first_checkpoint_reloads_the_parent(parent, tmp_path, capsys):
    """A child killed before its first checkpoint resumes from step 0, again from the parent's
    weights (recorded as a step, so a parent trained further meanwhile changes nothing)."""
    config = child_config(parent, "train.max_steps=2", "train.deterministic=true")
    trainer = new_trainer(config, "init", show_progress=False)
    trainer.hold.fresh = False  # as if killed: the folder stays without a checkpoint
    trainer.hold.release()
    assert main(["train", "--quiet", "--resume", str(tmp_path / "child")]) == 0
    whole = child_config(parent, "train.max_steps=2", "train.deterministic=true", "name=whole")
    new_trainer(whole, "init", show_progress=False).train()
    assert torch.equal(
        load_latest_checkpoint(tmp_path / "child").model["embed.weight"],
        load_latest_checkpoint(tmp_path / "whole").model["embed.weight"],
    )


def test_every_verb_works_on_a_child_run(tmp_path, corpus, capsys):
    settings = [*PARENT, "model.bitlinear=true", f"data.path={corpus}", f"out_dir={tmp_path}"]
    assert main(["train", "--quiet", *settings, "train.max_steps=3", "name=ternary"]) == 0
    config = child_config(tmp_path / "ternary", "train.max_steps=2")
    new_trainer(config, "init", show_progress=False).train()
    child = tmp_path / "child"
    capsys.readouterr()
    assert main(["eval", str(child), "--batches", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 2
    assert main(["generate", str(child), "--prompt", "Line", "--max-new-tokens", "5"]) == 0
    assert main(["export", str(child), "--out", str(tmp_path / "exported")]) == 0
    assert (tmp_path / "exported").exists()


def test_an_older_registry_gains_the_parent_column(tmp_path):
    path = tmp_path / "registry.sqlite"
    with sqlite3.connect(path) as connection:
        connection.executescript(registry.SCHEMA.replace("    parent TEXT,\n", ""))
    config = build_config("gpt-tiny", ["train.init_from=x"])
    config.parent.run, config.parent.step = "/somewhere/base", 7
    assert registry.record_runs(
        [registry.run_row(tmp_path, status="finished", config=config)], path
    )
    (row,) = registry.list_runs(path)[0]
    assert row["parent"] == "/somewhere/base@7"
