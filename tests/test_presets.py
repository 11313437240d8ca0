"""Every shipped preset builds, validates and trains two steps at a tiny width with each of its
optional features proven to run (integrity counters, carried state, curriculum, optimiser)."""

from __future__ import annotations

import pytest
from conftest import metrics_rows

from lmlab.cli import main
from lmlab.config.load import build_config, preset_names
from lmlab.model.lm import LanguageModel
from lmlab.train.launch import new_trainer

SHIPPED = ["bdh", "gpt-tiny", "moh", "nexus", "sigma"]

FEATURES = {
    "moh": {"mixture_of_heads", "sliding_window", "moe"},
    "sigma": {"bitlinear", "moe"},
}
"""Integrity counters each preset must show running (at least; more may appear)."""

SHRINK = [
    "model.d_model=64",
    "model.mlp_hidden=128",
    "data.seq_len=32",
    "data.vocab_size=300",
    "train.batch_size=2",
    "train.max_time=0",
    "train.max_steps=2",
    "train.warmup_steps=1",
    "train.eval_batches=1",
    "train.threads=1",
]
"""Overrides that keep every preset's structure (layers, mixers, features) at a tiny size."""


def test_presets_are_listed_with_a_description(capsys):
    assert preset_names() == SHIPPED
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == SHIPPED
    assert all(len(line.split()) > 3 for line in lines)


@pytest.mark.parametrize("name", SHIPPED)
def test_preset_trains_two_steps_with_its_features_running(name, tmp_path, corpus):
    shrink = list(SHRINK)
    options = build_config(name).model.mixer_options
    if "expert_hidden" in options.get("moe", {}):
        shrink.append("model.mixer_options.moe.expert_hidden=64")
    if build_config(name).train.seq_len_start:
        shrink += ["train.seq_len_start=16", "train.curriculum_steps=2"]
    config = build_config(name, [*shrink, f"data.path={corpus}", f"out_dir={tmp_path}", "name=r"])
    trainer = new_trainer(config, name, show_progress=False)
    trainer.train()
    steps = metrics_rows(trainer.run_dir)
    assert len(steps) == 2
    calls = steps[0]["feature_calls"]
    assert FEATURES.get(name, set()) <= set(calls)
    assert all(count > 0 for count in calls.values()), calls
    assert set(trainer.optimizers.optimizers) >= {config.train.optimizer}
    if config.train.tbptt:
        carried = trainer.task.carried
        assert carried is not None and carried.state is not None
    if config.train.seq_len_start:
        assert [row["seq_len"] for row in steps] == [16, 24]


def test_sigma_switches_its_mamba2_layers_to_mamba3():
    """``model.letters.M=mamba3`` (docs/presets/sigma.md): SIGMA's own Mamba-3 in place of the
    Mamba-2 stand-in, the MLA layers unchanged."""
    config = build_config("sigma", ["model.letters.M=mamba3", "model.d_model=64"])
    config.model.vocab_size = 32
    model = LanguageModel(config.model)
    names = [type(block.mixer).name for block in model.blocks]
    assert names == ["mamba3", "mamba3", "mla", "mamba3", "mamba3", "mla"]
