"""Config building: presets, YAML files, overrides, and one-line errors for mistakes."""

import pytest

from lmlab.config.load import build_config, dump_config, parse_override, preset_names
from lmlab.errors import LmlabError


def test_defaults_then_preset_then_overrides():
    config = build_config("gpt-tiny", ["model.d_model=256", "train.lr=1e-3", "train.max_steps=7"])
    assert config.model.d_model == 256
    assert config.train.lr == pytest.approx(1e-3)
    assert isinstance(config.train.lr, float)
    assert config.train.max_steps == 7
    assert config.data.tokenizer == "char"


def test_yaml_file_and_round_trip(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  n_layers: 2\n  pattern: AA\ntrain:\n  optimizer: muon\n")
    config = build_config(str(path))
    assert config.model.layer_mixers() == ["attention", "attention"]
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(config))
    assert build_config(str(again)) == config


def test_pattern_letters_map_to_mixers():
    config = build_config(None, ["model.n_layers=3", "model.pattern=AMA"])
    assert config.model.layer_mixers() == ["attention", "mamba2", "attention"]


def test_override_parsing_types():
    assert parse_override("train.compile=true") == {"train": {"compile": True}}
    assert parse_override("model.mixer_options.gla={expand_k: 1}") == {
        "model": {"mixer_options": {"gla": {"expand_k": 1}}}
    }


def test_overriding_one_mixer_setting_keeps_the_others(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("model:\n  mixer_options:\n    moe: {router: top_p, top_p: 0.4}\n")
    config = build_config(str(path), ["model.mixer_options.moe.top_p=0.6"])
    assert config.model.mixer_options["moe"] == {"router": "top_p", "top_p": 0.6}


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["model.d_modle=3"], "did you mean model.d_model"),
        (["trian.lr=3"], "did you mean train"),
        (["model.d_model=100", "model.n_heads=3"], "not divisible"),
        (["train.lr=-1"], "train.lr=-1"),
        (["train.lr=abc"], "must be of type float"),
        (["model.n_layers=2.5"], "must be of type int"),
        (["model.pattern=AZ", "model.n_layers=2"], "letter(s) Z"),
        (["model.pattern=AAA"], "3 letters but model.n_layers=4"),
        (["data.tokenizer=words"], "data.tokenizer='words' is unknown"),
        (["train.max_steps=0", "train.max_time=0"], "no training budget"),
        (["model"], "must look like section.key=value"),
    ],
)
def test_bad_values_are_one_line_errors(overrides, fragment):
    with pytest.raises(LmlabError) as info:
        build_config("gpt-tiny", overrides)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_unknown_preset_suggests_nearest():
    with pytest.raises(LmlabError, match="did you mean 'gpt-tiny'"):
        build_config("gpt-tinny")


def test_every_shipped_preset_builds():
    assert "gpt-tiny" in preset_names()
    for name in preset_names():
        build_config(name).validate()


def test_invalid_yaml_is_reported(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(LmlabError, match="not valid YAML"):
        build_config(str(path))
