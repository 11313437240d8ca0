"""The declared layer hooks (``lmlab.layers.base``): registration rules, defaults, and the model
methods that call them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lmlab.config.schema import ModelConfig
from lmlab.layers import registry
from lmlab.layers.base import ChannelMixer, Decode, Router, TokenMixer
from lmlab.layers.bitlinear import convert_to_bitlinear
from lmlab.model.lm import LanguageModel
from lmlab.train.optim import split_parameters


class Counted(TokenMixer):
    def extra_flops_per_token(self, context: int) -> float:
        return 0.0


class Forgetful(TokenMixer):
    """Leaves out its FLOPs correction."""


def test_registry_names_the_class_and_refuses_one_outside_the_contract():
    before = set(registry.TOKEN_MIXERS)
    try:
        assert registry.register_token_mixer("counted")(Counted) is Counted
        assert Counted.name == "counted" and registry.TOKEN_MIXERS["counted"] is Counted
        with pytest.raises(ValueError, match=r"token mixer 'counted' is registered twice"):
            registry.register_token_mixer("counted")(Counted)
        with pytest.raises(TypeError, match=r"must derive from lmlab.layers.base.TokenMixer"):
            registry.register_token_mixer("plain")(nn.Identity)
        with pytest.raises(TypeError, match=r"does not define extra_flops_per_token"):
            registry.register_token_mixer("forgetful")(Forgetful)
        with pytest.raises(TypeError, match=r"ChannelMixer"):
            registry.register_channel_mixer("counted")(Counted)
        assert set(registry.TOKEN_MIXERS) == before | {"counted"}
        assert "counted" not in registry.CHANNEL_MIXERS
    finally:
        registry.TOKEN_MIXERS.pop("counted", None)


def test_forgetting_the_flops_hook_cannot_build_a_mixer():
    with pytest.raises(TypeError, match="extra_flops_per_token"):
        Forgetful()


def test_hook_defaults_are_no_ops():
    mixer = Counted()
    assert (mixer.wants_token_ids, mixer.optimizer_hint, mixer.aux_loss) == (False, None, None)
    assert mixer.pop_statistics() == {} and not mixer.cache_grows_with_context
    assert mixer.reset_parameters() is None
    with pytest.raises(NotImplementedError, match="set_token_ids"):
        mixer.set_token_ids(torch.zeros(1, 1, dtype=torch.long))
    assert issubclass(registry.CHANNEL_MIXERS["moe"], ChannelMixer)


def test_router_stays_float_and_goes_to_adamw():
    parent = nn.Module()
    parent.router, parent.proj = Router(4, 3, bias=False), nn.Linear(4, 4)
    assert convert_to_bitlinear(parent) == 1 and type(parent.router) is Router
    muon, adamw = split_parameters(parent)
    assert [n for n, _ in muon] == ["proj.weight"]
    assert {n for n, _ in adamw} == {"router.weight", "proj.bias"}


class Reporter(ChannelMixer):
    """Adds nothing; records the end-of-training call and reports a statistic when it has one."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, options: object) -> None:
        super().__init__()
        self.ended: list[tuple[Path, str, str]] = []
        self.pending: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

    def extra_flops_per_token(self, context: int) -> float:
        return 0.0

    def pop_statistics(self) -> dict:
        stats, self.pending = self.pending, {}
        return stats

    def on_training_end(self, run_dir: Path, name: str, decode: Decode | None) -> None:
        self.ended.append((run_dir, name, decode([65])))


def test_model_calls_every_hooked_module_by_its_path(tmp_path, monkeypatch):
    monkeypatch.setitem(registry.CHANNEL_MIXERS, "reporter", Reporter)
    cfg = ModelConfig(vocab_size=16, d_model=16, n_heads=2, n_layers=2, channel_mixer="reporter")
    model = LanguageModel(cfg)
    model.on_training_end(tmp_path, decode=lambda ids: chr(ids[0]))
    for i, block in enumerate(model.blocks):
        assert block.channel.ended == [(tmp_path, f"blocks.{i}.channel", "A")]
    assert model.pop_statistics() == {}  # modules with nothing to report are left out
    model.blocks[1].channel.pending = {"tokens": 3}
    assert model.pop_statistics() == {"blocks.1.channel": {"tokens": 3}}
