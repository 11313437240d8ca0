"""Weight-only int8 / int4 quantisation: the layers against their dequantised oracle, the
quantisation error bound, and ``lmlab quantize`` runs that eval and generate load as usual."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_RUN
from torch import nn

from lmlab.cli import main
from lmlab.errors import LmlabError, ParamError
from lmlab.layers.quantized import QuantizedLinear, convert_to_quantized, unpack_int4
from lmlab.train.checkpoint import MODEL_FILE, list_checkpoints
from lmlab.train.launch import resume_trainer
from lmlab.train.quantize import quantize_run
from lmlab.train.run import load_trained_model

TINY = [*TINY_RUN, "model.d_model=64", "train.max_steps=3", "train.eval_batches=1"]


def linear(rows: int, cols: int, bias: bool = True) -> nn.Linear:
    torch.manual_seed(rows + cols)
    layer = nn.Linear(cols, rows, bias=bias)
    nn.init.normal_(layer.weight, std=0.05)
    return layer


@pytest.mark.parametrize("bits, group", [(8, 0), (4, 32), (4, 64), (4, 128)])
@pytest.mark.parametrize("rows", [20, 48])  # 20: not a multiple of the int4 kernel's 16 rows
def test_kernel_equals_the_dequantised_weight(bits: int, group: int, rows: int) -> None:
    """PyTorch's quantised kernel computes x @ dequantised(W).T (the oracle, here in float64
    on the bfloat16-rounded activations the kernel takes), with a bias, in the caller's
    dtype; what remains is the kernel's bfloat16 output rounding."""
    source = linear(rows, 128)
    layer = QuantizedLinear.from_linear(source, bits, group)
    x = torch.randn(3, 5, 128)
    rounded = x.bfloat16().double()
    expected = nn.functional.linear(rounded, layer.weight.double(), source.bias.double())
    for dtype in (torch.float32, torch.bfloat16):
        actual = layer(x.to(dtype))
        assert actual.dtype == dtype
        torch.testing.assert_close(actual.double(), expected, rtol=1e-2, atol=1e-2)
    assert (layer(x).double() - expected).abs().max() < 0.02 * expected.abs().max()


def test_quantisation_error_is_within_half_a_step() -> None:
    source = linear(32, 128, bias=False)
    int8 = QuantizedLinear.from_linear(source, 8)
    step8 = int8.scale[:, None]
    assert ((int8.weight - source.weight).abs() <= step8 / 2 + 1e-7).all()
    int4 = QuantizedLinear.from_linear(source, 4, 32)
    step4 = int4.scale.float().repeat_interleave(32, 1)
    error4 = (int4.weight - source.weight).abs()
    assert (error4 <= step4 / 2 + 1e-6).all()
    assert error4.mean() > (int8.weight - source.weight).abs().mean() * 4  # 4 bits are coarser


def test_int4_codes_pack_two_per_byte() -> None:
    layer = QuantizedLinear.from_linear(linear(16, 64), 4, 32)
    assert layer.codes.dtype == torch.uint8 and layer.codes.shape == (16, 32)
    codes = unpack_int4(layer.codes)
    assert codes.shape == (16, 64) and int(codes.max()) <= 15
    assert torch.equal(unpack_int4(codes[:, 0::2] | (codes[:, 1::2] << 4)), codes)


def test_layers_the_group_size_does_not_divide_stay_float() -> None:
    model = nn.Sequential(nn.Linear(64, 32), nn.Sequential(nn.Linear(48, 16)))
    kept = convert_to_quantized(model, 4, 32)
    assert kept == ["1.0"]
    assert isinstance(model[0], QuantizedLinear) and type(model[1][0]) is nn.Linear


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    assert main(["train", "--quiet", *TINY, f"out_dir={out}", "name=float"]) == 0
    return out / "float"


@pytest.fixture(scope="module")
def quantised(run: Path) -> dict[str, dict]:
    return {
        "int8": quantize_run(run, run.parent / "int8", "int8"),
        "int4": quantize_run(run, run.parent / "int4", "int4", group_size=32),
    }


def test_file_sizes(run: Path, quantised: dict[str, dict]) -> None:
    """The checkpoint shrinks by exactly what the linear layers save (4 bytes per float
    weight against the codes and scales), up to the safetensors header; int8 is ~4x and
    int4 ~6x (groups of 32) smaller for these layers."""
    float_bytes = quantised["int8"]["source_bytes"]
    for method, least_ratio in (("int8", 3.7), ("int4", 5.3)):
        result = quantised[method]
        _, model, _, _ = load_trained_model(result["out"])
        layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
        float_weights = 4 * sum(m.in_features * m.out_features for m in layers)
        stored = sum(b.numel() * b.element_size() for m in layers for b in m.buffers())
        assert float_weights / stored > least_ratio, method
        assert abs(float_bytes - result["bytes"] - (float_weights - stored)) < 4096, method
        folder = list_checkpoints(Path(result["out"]))[0]
        assert (folder / MODEL_FILE).stat().st_size == result["bytes"]
        assert result["float_layers"] == []
    written = json.loads((run.parent / "int8" / "quantization.json").read_text())
    assert written["method"] == "int8"


@pytest.mark.parametrize("method, tolerance", [("int8", 0.01), ("int4", 0.1)])
def test_quantised_logits_are_close_to_float(run, quantised, method, tolerance) -> None:
    """Relative RMS error of the (centred) logits below the weights' own relative RMS
    quantisation error for Gaussian weights: ~1% for int8 (a step of max|w| / 127 per row),
    ~11% for int4 (a 15th of each group's range), which the float embedding and residual
    stream only dilute."""
    _, model, _, _ = load_trained_model(run)
    _, quant, _, _ = load_trained_model(quantised[method]["out"])
    assert any(isinstance(m, QuantizedLinear) for m in quant.modules())
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=generator)
    with torch.no_grad():
        expected, actual = model(idx)[0], quant(idx)[0]
    centred = expected - expected.mean(-1, keepdim=True)
    error = float((actual - expected).norm() / centred.norm())
    assert 0 < error < tolerance


def test_eval_and_generate_load_a_quantised_run(run, quantised, capsys) -> None:
    capsys.readouterr()
    assert main(["eval", str(run), "--batches", "2", "--json"]) == 0
    float_bpb = json.loads(capsys.readouterr().out)["bits_per_byte"]
    for method in ("int8", "int4"):
        out = quantised[method]["out"]
        assert main(["eval", out, "--batches", "2", "--json"]) == 0
        bpb = json.loads(capsys.readouterr().out)["bits_per_byte"]
        assert abs(bpb - float_bpb) < 0.05 * float_bpb, method
        assert main(["generate", out, "--prompt", "To be", "--max-new-tokens", "10"]) == 0
        assert capsys.readouterr().out.startswith("To be")


def test_bad_input(run, quantised, tmp_path) -> None:
    with pytest.raises(ParamError, match="method"):
        quantize_run(run, tmp_path / "x", "int3")
    with pytest.raises(ParamError, match="group_size"):
        quantize_run(run, tmp_path / "x", "int4", group_size=48)
    with pytest.raises(ParamError, match="already exists"):
        quantize_run(run, quantised["int8"]["out"], "int8")
    with pytest.raises(LmlabError, match="already quantised"):
        quantize_run(quantised["int8"]["out"], tmp_path / "x", "int4")
    with pytest.raises(LmlabError, match="no float weights to train"):
        resume_trainer(quantised["int4"]["out"], show_progress=False)
    assert not (tmp_path / "x").exists()
