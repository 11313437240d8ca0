"""Config validation: every setting's range, strict YAML input, the budget policy, and a table
fuzz over every config key proving that bad input is one ``LmlabError`` line naming the key."""

from __future__ import annotations

import dataclasses
import json
import typing
from importlib import resources

import pytest

from lmlab.cli import main
from lmlab.config.load import build_config
from lmlab.config.schema import (
    INT_MAX,
    RULES,
    Choice,
    Config,
    DataConfig,
    ModelConfig,
    ParentRun,
    PostConfig,
    Range,
    TrainConfig,
)
from lmlab.errors import LmlabError
from lmlab.train.trainer import Budget, budget_for

SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "post": PostConfig,
    "parent": ParentRun,
}


def config_keys() -> list[tuple[str, object]]:
    """Every settable key with its type: the section fields and the top-level strings."""
    keys = []
    for prefix, cls in SECTIONS.items():
        keys += [(f"{prefix}.{name}", kind) for name, kind in typing.get_type_hints(cls).items()]
    hints = typing.get_type_hints(Config)
    keys += [(name, hints[name]) for name in ("name", "out_dir")]
    return keys


def out_of_range(rule: Range, kind: type) -> list[str]:
    """Values just past each bound of ``rule`` (and past INT_MAX for unbounded integers)."""
    step = 1 if kind is int else 0.5
    values = [rule.low if rule.low_open else rule.low - step]
    if rule.high is not None:
        values.append(rule.high if rule.high_open else rule.high + step)
    elif kind is int:
        values.append(INT_MAX + 1)
    return [str(value) for value in values]


WRONG_SHAPE = {
    "model.letters": ["{A: [1]}", "{AB: attention}"],
    "model.mixer_options": ["{gla: 5}", "{gla: [1]}"],
    "model.layer_overrides": ["{0: 5}", "{0: {nope: 1}}", "{9: {mixer: attention}}"],
}
"""Mappings whose inner values have the wrong shape (the outer type check cannot see them)."""


def bad_values(key: str, kind: object) -> list[str]:
    """Bad override values for ``key``: wrong types, out of range, NaN and infinities, huge."""
    containers = ["[1]", "{a: 1}", "null"]
    if kind is int:
        return ['"abc"', "2.5", "true", ".nan", *containers, *out_of_range(RULES[key], int)]
    if kind is float:
        floats = ['"abc"', "true", ".nan", ".inf", "-.inf", '"1e999"', *containers]
        return floats + out_of_range(RULES[key], float)
    if kind is bool:
        return ['"maybe"', "2", *containers]
    if kind is str:
        return containers + (["nope", "5"] if isinstance(RULES.get(key), Choice) else [])
    if typing.get_origin(kind) is dict:
        return ["5", "abc", "[1]", *WRONG_SHAPE[key]]
    return ["{a: 1}", "null", "5", "[AA, AA]"]  # model.pattern: str | list[str]


FUZZ = [(key, value) for key, kind in config_keys() for value in bad_values(key, kind)]


@pytest.mark.parametrize(("key", "value"), FUZZ)
def test_every_key_rejects_bad_values_with_one_line_naming_it(key, value):
    with pytest.raises(LmlabError) as info:
        build_config(None, [f"{key}={value}"])
    message = str(info.value)
    assert key in message, message
    assert "\n" not in message


def test_every_numeric_setting_has_a_rule_and_every_rule_a_setting():
    numeric = {
        f"{prefix}.{name}"
        for prefix, cls in SECTIONS.items()
        for name, kind in typing.get_type_hints(cls).items()
        if kind in (int, float)
    }
    assert numeric <= set(RULES)
    fields = {
        f"{prefix}.{f.name}" for prefix, cls in SECTIONS.items() for f in dataclasses.fields(cls)
    }
    assert set(RULES) <= fields


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.checkpoint_interval=0", "train.checkpoint_interval=0 must be >= 1"),
        ("train.checkpoint_interval=-1", "train.checkpoint_interval=-1 must be >= 1"),
        ("train.threads=-2", "train.threads=-2 must not be negative; 0 leaves torch's default"),
        ("model.mlp_hidden=-64", "model.mlp_hidden=-64 must not be negative"),
        ("model.n_kv_heads=-1", "model.n_kv_heads=-1 must not be negative"),
        ("model.head_dim=-8", "model.head_dim=-8 must not be negative"),
        ("train.seed=-1", "train.seed=-1 must not be negative"),
        ("train.beta1=2", "train.beta1=2.0 must be in [0, 1)"),
        ("train.min_lr_ratio=5", "train.min_lr_ratio=5.0 must be in [0, 1]"),
        ("train.max_time=-5", "train.max_time=-5.0 must not be negative"),
        ("train.max_tokens=-100", "train.max_tokens=-100 must be in [0, "),
        ("model.rope_theta=-1", "model.rope_theta=-1.0 must be positive"),
        ("model.norm_eps=0", "model.norm_eps=0.0 must be positive"),
        ("train.lr=.nan", "train.lr=nan must be a finite number"),
        ("train.grad_clip=.inf", "train.grad_clip=inf must be a finite number"),
        ("train.threads=99999999999", "train.threads=99999999999 must be at most 2147483647"),
        ("model.layer_overrides.1.mlp_hidden=-3", "layer 1 (model.layer_overrides): model.mlp"),
        ("train.lr=[", "override 'train.lr=[' is not valid YAML"),
        ("model..d_model=3", "must look like section.key=value"),
        ("model.mixer_options={gla: {a: 1, a: 2}}", "key 'a' is given twice"),
    ],
)
def test_reviewed_defects_are_one_line_errors(override, message):
    with pytest.raises(LmlabError) as info:
        build_config("gpt-tiny", [override])
    assert message in str(info.value)


def test_curriculum_cannot_start_longer_than_the_sequence():
    with pytest.raises(LmlabError, match=r"train\.seq_len_start=512 exceeds data\.seq_len=128"):
        build_config("gpt-tiny", ["train.seq_len_start=512", "train.curriculum_steps=10"])


# --- YAML files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"- model\n- train\n", "must hold a mapping of settings, not list"),
        (b"model:\n  d_model: 64\n  n_layers: 2\n  d_model: 128\n", "'d_model' is given twice"),
        (b"train:\n  lr: 1.0e-3\ntrain:\n  seed: 1\n", "(lines 1 and 3)"),
        ("name: caf\xe9\n".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 9)"),
        (bytes(range(256)), "is not UTF-8 text (byte 0x80 at offset 128)"),
        (b"name: a\x00b\n", "is not valid YAML"),
    ],
)
def test_bad_config_files_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(LmlabError) as info:
        build_config(str(path))
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_a_yaml_merge_is_not_a_duplicate_key(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("model:\n  <<: {d_model: 64, n_layers: 2}\n  d_model: 32\n  n_heads: 2\n")
    model = build_config(str(path)).model
    assert (model.d_model, model.n_layers) == (32, 2)


def test_a_saved_config_that_is_not_a_mapping_is_an_error():
    with pytest.raises(LmlabError, match="saved config must be a mapping of settings, not list"):
        build_config(base=["model"])  # type: ignore[arg-type]


# --- budgets ------------------------------------------------------------------------------


def test_a_preset_time_budget_rules_without_overrides():
    assert budget_for(build_config("gpt-tiny")) == Budget(steps=0, seconds=150.0)


def test_a_step_budget_on_the_command_line_beats_the_preset_time_budget():
    config = build_config("gpt-tiny", ["train.max_steps=60"])
    assert (config.train.max_time, config.train.max_steps) == (0.0, 60)
    assert budget_for(config) == Budget(steps=60)


def test_a_token_budget_on_the_command_line_beats_file_budgets(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train: {max_time: 100, max_tokens: 5000, batch_size: 4}\ndata: {seq_len: 8}\n")
    config = build_config(str(path), ["train.max_tokens=320"])
    assert budget_for(config) == Budget(steps=10)
    steps = build_config(str(path), ["train.max_steps=7"])
    assert (steps.train.max_time, steps.train.max_tokens) == (0.0, 0)
    assert budget_for(steps) == Budget(steps=7)


def test_a_command_line_budget_beats_a_saved_run_budget():
    saved = dataclasses.asdict(build_config("gpt-tiny"))
    assert budget_for(build_config(base=saved, overrides=["train.max_steps=9"])) == Budget(9)


def test_two_budgets_on_the_command_line_are_an_error():
    with pytest.raises(LmlabError, match=r"train\.max_time and train\.max_steps are both given"):
        build_config("gpt-tiny", ["train.max_steps=60", "train.max_time=10"])
    zeroed = build_config("gpt-tiny", ["train.max_time=0", "train.max_steps=5"])
    assert budget_for(zeroed) == Budget(steps=5)


def test_deterministic_training_refuses_a_time_budget():
    with pytest.raises(LmlabError, match=r"train\.deterministic=true cannot use a time budget"):
        build_config("gpt-tiny", ["train.deterministic=true"])
    config = build_config("gpt-tiny", ["train.deterministic=true", "train.max_steps=5"])
    assert budget_for(config) == Budget(steps=5)


def test_train_from_a_time_budget_file_stops_at_the_command_line_steps(tmp_path, corpus):
    path = tmp_path / "timed.yaml"
    path.write_text(
        "model: {d_model: 32, n_layers: 1, n_heads: 2}\ndata: {seq_len: 16}\n"
        "train: {batch_size: 2, max_time: 150, eval_batches: 1, warmup_steps: 1}\n"
    )
    argv = ["train", "--quiet", str(path), f"data.path={corpus}", f"out_dir={tmp_path}"]
    assert main([*argv, "name=r", "train.max_steps=3"]) == 0
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["steps"] == 3


# --- presets and the CLI ------------------------------------------------------------------


def test_sigma_comment_matches_its_losses():
    text = (resources.files("lmlab.config") / "presets" / "sigma.yaml").read_text("utf-8")
    moe = build_config("sigma").model.mixer_options["moe"]
    assert moe["aux_loss_coef"] == 0 and moe["z_loss_coef"] == pytest.approx(1e-3)
    assert "no auxiliary loss" not in text and "z-loss stays on at 1e-3" in text


def cli_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "Traceback" not in captured.err + captured.out
    return err


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["info", "train.lr=["], "override 'train.lr=[' is not valid YAML"),
        (["info", "train.checkpoint_interval=0"], "train.checkpoint_interval=0 must be >= 1"),
        (["info", "model.rope_theta=.nan"], "model.rope_theta=nan must be a finite number"),
        (["info", "model.mixer_options={gla: 5}"], "model.mixer_options.gla must map settings"),
        (["train", "--preset", "gpt-tiny", "train.deterministic=true"], "cannot use a time"),
        (["train", "train.max_steps=5", "train.max_tokens=9"], "give one budget"),
    ],
)
def test_cli_bad_config_is_one_line_and_exit_2(capsys, argv, fragment):
    assert fragment in cli_error(capsys, argv)


def test_cli_bad_config_files_are_one_line_and_exit_2(tmp_path, capsys):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert "is not UTF-8 text" in cli_error(capsys, ["info", str(latin)])
    listed = tmp_path / "list.yaml"
    listed.write_text("- model\n")
    assert "not list" in cli_error(capsys, ["info", str(listed)])
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("- model\n")
    assert "not list" in cli_error(capsys, ["eval", str(run)])
    (run / "config.yaml").write_text("train:\n  seed: 1\n  seed: 2\n")
    assert "'seed' is given twice (lines 2 and 3)" in cli_error(capsys, ["eval", str(run)])
