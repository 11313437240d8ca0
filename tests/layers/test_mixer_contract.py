"""The generic mixer contract, run over every registered token mixer.

A newly registered mixer is covered with the defaults of ``Contract``: prefill + decode, two
segments, bfloat16 and learning; and, if its options have a ``mode``, chunk (or FFT) vs the
``recurrent`` oracle in outputs and gradients at odd lengths and decode in every mode. A mixer
needs an entry in ``CONTRACTS`` only where its settings differ (smaller heads, variants that
switch on optional paths, another oracle mode). Formula-specific oracles stay in each mixer's
own test file.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import mixer_checks
import pytest
import torch
from mixer_checks import (
    check_bfloat16,
    check_decode_matches_full,
    check_learns,
    check_modes_agree,
    check_segments_match_whole,
    clone_with,
    make_mixer,
)

from lmlab.config.schema import ModelConfig
from lmlab.layers.base import TokenMixer
from lmlab.layers.registry import TOKEN_MIXERS, token_mixer_names
from lmlab.model.lm import LanguageModel

Settings = dict[str, Any]

TIMES = (1, 7, 63, 65, 200)
"""Odd lengths: one token, less than a chunk, one short of and one past a chunk boundary."""
LENGTHS = ((1, 16), (7, 16), (63, 16), (65, 64), (200, 16))
"""(time, chunk_size) for chunked mixers: partial, exact and multiple chunks."""
SHORTER_LAST_CHUNKS = ((1, 16), (7, 16), (63, 16), (65, 32), (200, 64))
"""(time, chunk_size) with larger chunks at the longer lengths (RWKV-7, BDH)."""


@dataclasses.dataclass(frozen=True)
class Contract:
    """How the generic checks build one mixer; every field's default is what a new mixer gets.

    Settings are ``make_mixer`` keywords (``n_heads``, ``model`` fields, mixer options)."""

    variants: tuple[Settings, ...] = ({},)
    """Crossed with the modes, decode and segments checks."""
    reference: str = "recurrent"
    """The oracle mode that the default ``mode`` is checked against."""
    modes: tuple[tuple[int, Settings], ...] | None = None
    """(time, settings) for chunk vs oracle; default ``LENGTHS`` if chunked, else ``TIMES``."""
    decode: tuple[Settings, ...] | None = None
    """Default ``chunk_size=4`` if chunked, so that decode starts mid-chunk."""
    decode_lengths: tuple[tuple[int, int], ...] = ((13, 5),)
    """(time, prefix) pairs."""
    segments: tuple[Settings, ...] | None = None
    """Default ``chunk_size=8`` if chunked, so that the cut falls mid-chunk."""
    segment_lengths: tuple[int, int] = (40, 17)
    """(time, cut)."""
    bfloat16: tuple[Settings, ...] = ({},)
    learns: tuple[tuple[int, Settings], ...] = ((120, {}),)
    """(steps, mixer options) of a tiny language model on Shakespeare."""


MAMBA2_SMALL: Settings = {"head_dim": 16, "d_state": 8}
"""Small heads for Mamba-2 and Mamba-3."""
ATTENTION_VARIANTS = (
    *(
        {"n_heads": 4, "model": {"position": position, "n_kv_heads": kv_heads}, "window": window}
        for position, kv_heads, window in mixer_checks.ATTENTION_VARIANTS
    ),
    {"n_heads": 4, "model": {"n_kv_heads": 2}, "qkv_conv": 3},
    {"n_heads": 4, "model": {"position": "none"}, "window": 5, "qkv_conv": 4},
)
CONTRACTS: dict[str, Contract] = {
    "gla": Contract(segments=({"chunk_size": 16},), bfloat16=({"chunk_size": 16},)),
    "retnet": Contract(segments=({"chunk_size": 16},), bfloat16=({"chunk_size": 16},)),
    "mamba2": Contract(
        variants=(MAMBA2_SMALL,),
        modes=tuple(
            (time, {"chunk_size": chunk_size, "ngroups": ngroups})
            for time, chunk_size, ngroups in [
                (1, 16, 1),
                (7, 16, 2),
                (63, 16, 1),
                (65, 64, 4),
                (200, 16, 2),
            ]
        ),
        decode=tuple({"chunk_size": 4, "norm_before_gate": flag} for flag in (False, True)),
        segments=({"chunk_size": 16, "ngroups": 2},),
        bfloat16=({"chunk_size": 16, "ngroups": 2} | MAMBA2_SMALL,),
    ),
    "titans": Contract(
        variants=(
            {"window": 5},
            {"window": 64, "persistent_tokens": 0, "conv_size": 2},
            {"window": 5, "memory": "mlp", "max_lr": 0.1},
        ),
        bfloat16=({}, {"memory": "mlp", "max_lr": 0.1}),
    ),
    "ttt_linear": Contract(
        modes=tuple(
            (time, {"mini_batch_size": size, "gate": gate})
            for time, size, gate in [(1, 16, True), (7, 4, True), (37, 16, False), (65, 8, True)]
        ),
        decode=tuple({"mini_batch_size": size} for size in (4, 16)),
        decode_lengths=((13, 5), (9, 1)),
        segments=({"mini_batch_size": 8},),
    ),
    "mamba3": Contract(
        variants=(
            MAMBA2_SMALL,
            MAMBA2_SMALL | {"ngroups": 2},
            MAMBA2_SMALL | {"mimo_rank": 2},
            MAMBA2_SMALL | {"ngroups": 2, "mimo_rank": 4},
        ),
        bfloat16=(
            {"chunk_size": 16} | MAMBA2_SMALL,
            {"chunk_size": 16, "mimo_rank": 4} | MAMBA2_SMALL,
        ),
        learns=((120, {}), (80, {"mimo_rank": 2})),
    ),
    "rwkv7": Contract(
        modes=tuple((time, {"chunk_size": size}) for time, size in SHORTER_LAST_CHUNKS),
        learns=((80, {}),),
    ),
    "hyena": Contract(
        reference="direct",
        modes=tuple(
            (time, options)
            for options in ({}, {"code_form": True}, {"order": 3, "emb_dim": 5})
            for time in TIMES
        ),
        segments=({}, {"code_form": True, "short_kernel": 4}),
        bfloat16=({"sine_frequency": 1.0},),  # see test_hyena.py for autocast at the default 14
        learns=((80, {}),),
    ),
    "bdh": Contract(
        variants=tuple({"mlp_multiplier": 1, "forget_gate": flag} for flag in (False, True)),
        modes=tuple((time, {"chunk_size": size}) for time, size in SHORTER_LAST_CHUNKS),
        bfloat16=({"mlp_multiplier": 1},),
        learns=tuple((70, {"mlp_multiplier": 4, "forget_gate": flag}) for flag in (False, True)),
    ),
    "attention": Contract(
        variants=ATTENTION_VARIANTS,
        decode_lengths=((17, 6), (9, 1)),
        segment_lengths=(30, 13),
        bfloat16=(
            {"n_heads": 4, "model": {"position": "alibi"}},
            {"n_heads": 4, "model": {"position": "cope"}, "window": 16},
        ),
        learns=((100, {"window": 16}),),
    ),
    "diff_attention": Contract(
        variants=tuple(
            {"n_heads": 4, "layer_idx": 2, "model": {"position": position, "n_kv_heads": kv}}
            for position, kv in [("rope", 0), ("none", 2)]
        ),
        decode_lengths=((14, 5),),
        segment_lengths=(30, 11),
    ),
    "mla": Contract(
        variants=(
            {"n_heads": 4},
            {"n_heads": 4, "q_lora_rank": 12, "kv_lora_rank": 10, "rope_head_dim": 4},
        ),
        decode_lengths=((15, 5), (6, 1)),
        segment_lengths=(31, 12),
        bfloat16=({"n_heads": 4, "q_lora_rank": 16},),
        learns=((120, {"kv_lora_rank": 32}),),
    ),
    "hopfield": Contract(
        variants=(
            {},
            {"window": 5, "steps": 2},
            {"context": False, "slots": 8, "steps": 3},
            {"slots": 0, "beta": 2.0},
        ),
        decode_lengths=((13, 5), (9, 1)),
    ),
    "moh": Contract(
        variants=(
            {"n_heads": 4},
            {"n_heads": 4, "n_shared": 0, "top_k": 2, "window": 5},
            {"n_heads": 4, "qkv_conv": 2},
        ),
        decode_lengths=((13, 4),),
        segment_lengths=(25, 9),
        bfloat16=({"n_heads": 4},),
        learns=((120, {"n_shared": 1, "top_k": 1}),),
    ),
}


def option_defaults(name: str) -> dict[str, Any]:
    return {f.name: f.default for f in dataclasses.fields(TOKEN_MIXERS[name].Options)}


def modes_of(name: str, contract: Contract) -> tuple[str, ...]:
    """The default mode and the oracle, or nothing for a mixer with a single form."""
    default = option_defaults(name).get("mode")
    return () if default is None else (default, contract.reference)


def chunked(name: str) -> bool:
    return "chunk_size" in option_defaults(name)


def label(value: Any) -> str:
    """A readable test id part: ``position=cope-window=6`` for settings."""
    if not isinstance(value, dict):
        return str(value)
    flat = {**value.get("model", {}), **{k: v for k, v in value.items() if k != "model"}}
    return "-".join(f"{key}={item}" for key, item in flat.items())


def param(name: str, *values: Any) -> Any:
    parts = [name, *(label(value) for value in values)]
    return pytest.param(name, *values, id="-".join(part for part in parts if part))


def mode_cases() -> list[Any]:
    cases = []
    for name in token_mixer_names():
        contract = CONTRACTS.get(name, Contract())
        if not modes_of(name, contract):
            continue
        default = [(t, {"chunk_size": c}) for t, c in LENGTHS] if chunked(name) else []
        default = default or [(t, {}) for t in TIMES]
        for variant in contract.variants:
            for time, settings in contract.modes or default:
                cases.append(param(name, variant | settings, time))
    return cases


def decode_cases() -> list[Any]:
    cases = []
    for name in token_mixer_names():
        contract = CONTRACTS.get(name, Contract())
        extras = contract.decode or ({"chunk_size": 4} if chunked(name) else {},)
        modes = [{"mode": mode} for mode in modes_of(name, contract)] or [{}]
        for variant in contract.variants:
            for extra in extras:
                for mode in modes:
                    for time, prefix in contract.decode_lengths:
                        cases.append(param(name, variant | extra | mode, time, prefix))
    return cases


def segment_cases() -> list[Any]:
    cases = []
    for name in token_mixer_names():
        contract = CONTRACTS.get(name, Contract())
        extras = contract.segments or ({"chunk_size": 8} if chunked(name) else {},)
        for variant in contract.variants:
            for extra in extras:
                cases.append(param(name, variant | extra, *contract.segment_lengths))
    return cases


def simple_cases(field: str) -> list[Any]:
    cases = []
    for name in token_mixer_names():
        for entry in getattr(CONTRACTS.get(name, Contract()), field):
            cases.append(param(name, *entry) if isinstance(entry, tuple) else param(name, entry))
    return cases


def test_every_contract_names_a_registered_mixer() -> None:
    """A renamed or removed mixer must not leave a silently unused entry behind."""
    assert set(CONTRACTS) <= set(token_mixer_names())


def test_a_new_mixer_is_covered_without_an_entry(monkeypatch) -> None:
    """The point of the contract: registering a mixer is enough to have it checked."""

    class Toy(torch.nn.Module):
        @dataclasses.dataclass
        class Options:
            chunk_size: int = 64
            mode: str = "chunk"

    monkeypatch.setitem(TOKEN_MIXERS, "toy", Toy)
    every_check = [
        mode_cases(),
        decode_cases(),
        segment_cases(),
        simple_cases("bfloat16"),
        simple_cases("learns"),
    ]
    toy = [[case.values for case in cases if case.values[0] == "toy"] for cases in every_check]
    modes, decode, segments, bfloat16, learns = toy
    assert modes == [("toy", {"chunk_size": size}, time) for time, size in LENGTHS]
    assert decode == [
        ("toy", {"chunk_size": 4, "mode": mode}, 13, 5) for mode in ("chunk", "recurrent")
    ]
    assert segments == [("toy", {"chunk_size": 8}, 40, 17)]
    assert (bfloat16, learns) == ([("toy", {})], [("toy", 120, {})])


@pytest.mark.parametrize(("name", "settings", "time"), mode_cases())
def test_default_mode_matches_oracle(name: str, settings: Settings, time: int) -> None:
    mixer = make_mixer(name, perturb=True, **settings)
    oracle = CONTRACTS.get(name, Contract()).reference
    check_modes_agree(mixer, clone_with(mixer, mode=oracle), time=time)


@pytest.mark.parametrize(("name", "settings", "time", "prefix"), decode_cases())
def test_prefill_then_decode_matches_full(
    name: str, settings: Settings, time: int, prefix: int
) -> None:
    check_decode_matches_full(make_mixer(name, perturb=True, **settings), time, prefix)


@pytest.mark.parametrize(("name", "settings", "time", "cut"), segment_cases())
def test_two_segments_match_one_sequence(
    name: str, settings: Settings, time: int, cut: int
) -> None:
    check_segments_match_whole(make_mixer(name, perturb=True, **settings), time, cut)


@pytest.mark.parametrize(("name", "settings"), simple_cases("bfloat16"))
def test_bfloat16(name: str, settings: Settings) -> None:
    check_bfloat16(make_mixer(name, perturb=True, **settings))


@pytest.mark.parametrize(("name", "steps", "options"), simple_cases("learns"))
def test_learns(name: str, steps: int, options: Settings) -> None:
    final, unigram = check_learns(name, steps=steps, **options)
    assert final < 0.8 * unigram, f"final loss {final:.3f} vs unigram entropy {unigram:.3f}"


@pytest.mark.parametrize("name", token_mixer_names())
def test_registered_mixer_derives_from_the_base_and_declares_its_flops(name: str) -> None:
    cls = TOKEN_MIXERS[name]
    assert issubclass(cls, TokenMixer) and cls.name == name
    assert "extra_flops_per_token" not in getattr(cls, "__abstractmethods__", ())
    extra = make_mixer(name).extra_flops_per_token(64)
    assert isinstance(extra, float) and math.isfinite(extra) and extra >= 0


@pytest.mark.parametrize("name", token_mixer_names())
def test_model_flops_count_the_mixer_hook(name: str, monkeypatch) -> None:
    """The model's count is 2 per linear weight plus each mixer's declared correction, so a
    changed correction moves the count by exactly that much in every layer."""
    cfg = ModelConfig(vocab_size=16, d_model=32, n_heads=2, n_layers=2, mixer=name)
    model = LanguageModel(cfg)
    linear = sum(2 * m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    extras = [block.mixer.extra_flops_per_token(64) for block in model.blocks]
    assert model.flops_per_token(64) == pytest.approx(linear + sum(extras), rel=1e-12)
    monkeypatch.setattr(TOKEN_MIXERS[name], "extra_flops_per_token", lambda self, context: 1e6)
    assert model.flops_per_token(64) == pytest.approx(linear + 2e6, rel=1e-12)
