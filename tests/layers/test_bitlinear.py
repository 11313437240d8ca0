"""BitLinear: the quantisers, the straight-through gradient, conversion, packing, learning,
integrity counters, and the ternary export of a trained run through the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import safetensors
import torch
import torch.nn.functional as F
from conftest import expect_one_error, metrics_rows, tiny_run_args, write_corpus
from mixer_checks import check_learns
from torch import nn

from lmlab.cli import main
from lmlab.config.load import build_config
from lmlab.config.schema import ModelConfig
from lmlab.data.tokenizers import ByteTokenizer
from lmlab.errors import LmlabError
from lmlab.layers.base import Router
from lmlab.layers.bitlinear import (
    BitLinear,
    convert_to_bitlinear,
    pack_ternary,
    quantize_activations,
    ternary_codes,
    unpack_ternary,
)
from lmlab.layers.features import feature_counters
from lmlab.model.lm import LanguageModel
from lmlab.train.export import load_ternary, ternary_bytes
from lmlab.train.run import load_trained_model


def test_weights_are_ternary_times_absmean():
    weight = torch.randn(24, 40) * torch.linspace(0.1, 3, 40)
    layer = BitLinear(40, 24)
    with torch.no_grad():
        layer.weight.copy_(weight)
    scale = weight.abs().mean()
    quantized = layer.quantized_weight()
    assert set((quantized / scale).round().unique().tolist()) == {-1.0, 0.0, 1.0}
    assert torch.allclose(quantized, (weight / scale).round().clamp(-1, 1) * scale)
    assert torch.equal(quantized == 0, weight.abs() < 0.5 * scale)


def test_activations_on_the_int8_grid_per_token():
    x = torch.randn(3, 7, 32) * torch.logspace(-3, 2, 7).view(1, 7, 1)
    step = x.abs().amax(dim=-1, keepdim=True) / 127
    levels = quantize_activations(x) / step
    assert torch.allclose(levels, levels.round(), atol=1e-3)
    assert levels.round().min() >= -128 and levels.round().max() <= 127
    assert torch.allclose(levels.abs().amax(dim=-1), torch.full((3, 7), 127.0))
    assert ((quantize_activations(x) - x).abs() <= step / 2 * (1 + 1e-5)).all()
    assert torch.equal(quantize_activations(torch.zeros(2, 5)), torch.zeros(2, 5))


def test_straight_through_gradient_is_the_identity():
    torch.manual_seed(0)
    layer = BitLinear(16, 8).double()
    x = torch.randn(4, 5, 16, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(4, 5, 8, dtype=torch.float64)
    y = layer(x)
    x_q, w_q = quantize_activations(x.detach()), layer.quantized_weight().detach()
    assert torch.allclose(y, F.linear(x_q, w_q, layer.bias))
    (y * upstream).sum().backward()
    assert torch.allclose(x.grad, upstream @ w_q)
    assert torch.allclose(layer.weight.grad, upstream.flatten(0, 1).T @ x_q.flatten(0, 1))
    assert torch.allclose(layer.bias.grad, upstream.sum(dim=(0, 1)))


def test_convert_keeps_parameters_and_skips_the_module_itself():
    inner = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4, bias=False))
    outer = nn.ModuleDict({"a": inner, "b": nn.Linear(4, 3), "norm": nn.LayerNorm(3)})
    before = [id(p) for p in outer.parameters()]
    assert convert_to_bitlinear(outer) == 3
    assert [id(p) for p in outer.parameters()] == before
    assert isinstance(inner[0], BitLinear) and inner[2].bias is None
    assert convert_to_bitlinear(outer) == 0
    plain = nn.Linear(3, 3)
    assert convert_to_bitlinear(plain) == 0 and type(plain) is nn.Linear


def test_model_with_bitlinear_keeps_parameters_flops_and_counts_calls():
    cfg = dict(vocab_size=30, d_model=32, n_layers=2, n_heads=2, tie_embeddings=False)
    plain, ternary = (
        LanguageModel(ModelConfig(**cfg)),
        LanguageModel(ModelConfig(**cfg, bitlinear=True)),
    )
    linears = [m for m in ternary.modules() if isinstance(m, nn.Linear)]
    assert type(ternary.head) is nn.Linear
    assert all(isinstance(m, BitLinear) for m in linears if m is not ternary.head)
    assert ternary.num_parameters() == plain.num_parameters()
    assert ternary.flops_per_token(64) == plain.flops_per_token(64)
    assert feature_counters(ternary) == {"bitlinear": 0}
    ternary(torch.randint(0, 30, (2, 8)))
    assert feature_counters(ternary) == {"bitlinear": len(linears) - 1}
    assert feature_counters(plain) == {}


@pytest.mark.parametrize("shape", [(1,), (3,), (5, 7), (13, 11), (2, 3, 5), (8, 8)])
def test_pack_unpack_round_trip(shape):
    weight = torch.randn(shape)
    packed, scale, got_shape = pack_ternary(weight)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(math.prod(shape) / 4)
    assert got_shape == shape
    codes, expected_scale = ternary_codes(weight)
    assert torch.equal(scale, expected_scale)
    assert torch.equal(unpack_ternary(packed, scale, shape), codes * scale)
    fixed = torch.tensor(0.25)
    packed, scale, _ = pack_ternary(weight, fixed)
    assert torch.equal(unpack_ternary(packed, scale, shape), ternary_codes(weight, fixed)[0] * 0.25)
    with pytest.raises(ValueError, match="do not hold"):
        unpack_ternary(packed[:-1], scale, shape)


def test_learns():
    final, unigram = check_learns("attention", model_fields={"bitlinear": True})
    assert final < 0.8 * unigram, (final, unigram)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two tiny trained runs, ``bit`` (BitLinear) and ``plain``, under one folder."""
    root = tmp_path_factory.mktemp("bitlinear")
    corpus = write_corpus(root / "corpus")
    for name, extra in (("bit", ["model.bitlinear=true"]), ("plain", [])):
        argv = tiny_run_args(
            corpus, root / "runs", name, "train.max_steps=3", "model.tie_embeddings=false"
        )
        assert main([*argv, *extra]) == 0
    return root


def test_trainer_reports_bitlinear_calls(runs):
    rows = metrics_rows(runs / "runs" / "bit")
    calls = [r["feature_calls"].get("bitlinear") for r in rows]
    assert len(calls) == 3 and all(c and c > 0 for c in calls), calls


def test_export_then_load_gives_the_same_logits(runs, capsys):
    out = runs / "bit.safetensors"
    capsys.readouterr()
    assert (
        main(["export", str(runs / "runs" / "bit"), "--format", "ternary", "--out", str(out)]) == 0
    )
    assert "ternary layers" in capsys.readouterr().out
    config, model, tokenizer, step = load_trained_model(runs / "runs" / "bit")
    loaded_config, loaded, loaded_tokenizer, loaded_step = load_ternary(out)
    assert (loaded_config, loaded_tokenizer, loaded_step) == (config, tokenizer, step)
    checkpoint = next((runs / "runs" / "bit" / "checkpoints").glob("step_*/model.safetensors"))
    assert out.stat().st_size < checkpoint.stat().st_size / 4
    idx = torch.tensor([tokenizer.encode("to be or not to be, that is")])
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])
    again = runs / "again.safetensors"

    again.write_bytes(ternary_bytes(loaded, loaded_config, loaded_tokenizer, loaded_step))
    with torch.no_grad():
        assert torch.equal(load_ternary(again)[1](idx)[0], model(idx)[0])


def test_export_errors_are_one_line(runs, capsys):
    bit, plain = str(runs / "runs" / "bit"), str(runs / "runs" / "plain")
    out = str(runs / "x.safetensors")
    expect_one_error(capsys, ["export", str(runs), "--out", out], "not an lmlab run")
    expect_one_error(capsys, ["export", plain, "--out", out], "no BitLinear layers")
    expect_one_error(
        capsys, ["export", bit, "--format", "gguf", "--out", out], "unknown export format"
    )
    expect_one_error(capsys, ["export", bit, "--out", str(runs / "no" / "x")], "does not exist")
    expect_one_error(capsys, ["export", bit, "--out", str(runs)], "is a folder")
    assert not (runs / "x.safetensors").exists()
    (runs / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LmlabError, match="not a safetensors file"):
        load_ternary(runs / "junk.safetensors")
    checkpoint = next((runs / "runs" / "bit" / "checkpoints").glob("step_*/model.safetensors"))
    with pytest.raises(LmlabError, match="not an lmlab ternary export"):
        load_ternary(checkpoint)


def test_moe_router_stays_float_and_export_gives_the_same_logits(tmp_path):
    """The MoE router routes in full precision (a ``Router``, not converted), so the export
    stores it as float and the reloaded model picks the same experts: bit-identical logits,
    since every BitLinear reloads its exact ``codes * scale`` weight and scale."""
    config = build_config(
        None,
        [
            "model.d_model=32",
            "model.n_layers=2",
            "model.n_heads=2",
            "model.vocab_size=256",
            "model.bitlinear=true",
            "model.channel_mixer=moe",
            "model.mixer_options.moe.n_experts=4",
        ],
    )
    torch.manual_seed(0)
    model = LanguageModel(config.model).eval()
    routers = [block.channel.router for block in model.blocks]
    assert all(type(router) is Router for router in routers)
    with torch.no_grad():
        for router in routers:  # far from ternary: a ternary router would route differently
            router.weight.normal_(std=1.0)
    path = tmp_path / "moe.safetensors"
    path.write_bytes(ternary_bytes(model, config, ByteTokenizer(), step=0))
    _, loaded, _, _ = load_ternary(path)
    ternary = json.loads(safetensors.safe_open(str(path), "pt").metadata()["ternary"])
    assert "blocks.0.channel.router.weight" not in ternary
    assert "blocks.0.channel.experts.0.gate_up.weight" in ternary
    idx = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], model(idx)[0])
