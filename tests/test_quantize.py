"""Weight-only int8 / int4 quantisation: the layers and the embedding's gather against their
dequantised oracle, the quantisation error bound, whole models (tied or untied head, MoE,
BitLinear) through a checkpoint, and ``lmlab quantize`` runs that eval, generate and serve
load as usual."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
import torch
from conftest import TINY_RUN
from torch import nn

from lmlab.cli import main
from lmlab.config.schema import ModelConfig
from lmlab.errors import LmlabError, ParamError
from lmlab.interop.export import export_run
from lmlab.layers.quantized import (
    STORED,
    QuantizedEmbedding,
    QuantizedLinear,
    QuantizedWeight,
    convert_to_quantized,
    unpack_int4,
)
from lmlab.model.generate import SamplingSettings, generate
from lmlab.model.lm import LanguageModel
from lmlab.model.quantized import quantize_model
from lmlab.serve.server import open_service, serving_in_thread
from lmlab.train.checkpoint import MODEL_FILE, list_checkpoints, load_latest_checkpoint
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
# 20: not a multiple of the int4 kernel's 16 rows; 85: a character vocabulary, as in a head
@pytest.mark.parametrize("rows", [20, 48, 85])
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


def test_a_group_that_does_not_divide_falls_back_to_a_smaller_one_or_float() -> None:
    """Groups of 128 on widths 64 and 192 become groups of 64 (the largest that divides),
    width 512 keeps 128, and width 48, which no group divides, stays float."""
    model = nn.Sequential(
        nn.Linear(64, 32), nn.Sequential(nn.Linear(48, 16)), nn.Linear(192, 8), nn.Linear(512, 8)
    )
    kept, smaller = convert_to_quantized(model, 4, 128)
    assert kept == ["1.0"] and smaller == {"0": 64, "2": 64}
    assert type(model[1][0]) is nn.Linear
    assert [model[i].group_size for i in (0, 2, 3)] == [64, 64, 128]
    assert convert_to_quantized(nn.Sequential(nn.Linear(48, 16)), 8) == ([], {})


@pytest.mark.parametrize("bits, group", [(8, 0), (4, 32), (4, 64)])
def test_the_embedding_gathers_the_dequantised_tables_rows_exactly(bits: int, group: int) -> None:
    """The lookup dequantises only the gathered rows, with the same arithmetic as the whole
    table: bit for bit equal to the dequantised table's rows, repeated ids included, within
    half a quantisation step of the float table."""
    torch.manual_seed(0)
    source = nn.Embedding(85, 192)
    nn.init.normal_(source.weight, std=0.02)
    table = QuantizedEmbedding.from_embedding(source, bits, group)
    idx = torch.tensor([[0, 84, 3, 3], [17, 0, 42, 84]])
    rows = table(idx)
    assert rows.dtype == torch.float32 and rows.shape == (2, 4, 192)
    assert torch.equal(rows, table.weight[idx])
    step = table.scale[:, None] if bits == 8 else table.scale.float().repeat_interleave(group, 1)
    assert ((table.weight - source.weight).abs() <= step / 2 + 1e-6).all()


def test_a_tied_embedding_reads_the_heads_codes() -> None:
    """Tied: one set of codes, scales and offsets (the same tensors), so the lookup returns
    the rows of the weight the head's kernel multiplies by."""
    model = LanguageModel(ModelConfig(vocab_size=85, d_model=64, n_layers=1, n_heads=2)).eval()
    done = quantize_model(model, 4, 32, 4)
    assert done.tied and done.embeddings == "int4 g32" and done.float_layers == []
    head, embed = model.head, model.embed
    assert isinstance(head, QuantizedLinear) and isinstance(embed, QuantizedEmbedding)
    for name in ("codes", "scale", "offset"):
        assert getattr(embed, name) is getattr(head, name)
    idx = torch.arange(85)
    assert torch.equal(embed(idx), head.weight)


MODELS = {
    "tied": {},
    "untied": {"tie_embeddings": False},
    "moe": {"channel_mixer": "moe", "tie_embeddings": False},
    "bitlinear": {"bitlinear": True},
    "mod": {"mod_capacity": 0.5, "n_layers": 2},
}
"""Model features that meet the embedding and head or sit beside the quantised layers."""


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("bits, group", [(8, 0), (4, 32)])
def test_a_quantised_model_round_trips_through_its_state_dict(name, bits, group) -> None:
    """Every model feature that meets the embedding and head: the model quantises (the head
    and embedding too, here with the blocks' bits; BitLinear layers and MoE routers stay as
    they are), its logits stay near the float model's, and a fresh model quantised by the
    same rule loads its state dict and computes the same logits; an untied head keeps codes
    of its own."""
    cfg = ModelConfig(
        **{"vocab_size": 85, "d_model": 64, "n_layers": 1, "n_heads": 2, **MODELS[name]}
    )
    torch.manual_seed(0)
    model = LanguageModel(cfg).eval()
    idx = torch.randint(0, 85, (2, 12))
    with torch.no_grad():
        expected = model(idx)[0]
        done = quantize_model(model, bits, group, bits)
        actual = model(idx)[0]
    assert done.embeddings == model.head.method() and done.tied == cfg.tie_embeddings
    assert (model.embed.codes is model.head.codes) == cfg.tie_embeddings
    centred = expected - expected.mean(-1, keepdim=True)
    assert 0 < float((actual - expected).norm() / centred.norm()) < (0.02 if bits == 8 else 0.2)
    fresh = LanguageModel(cfg).eval()
    quantize_model(fresh, bits, group, bits)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(idx)[0], actual)


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
        "int4-int4-embeddings": quantize_run(
            run, run.parent / "int4-all", "int4", group_size=32, embeddings="int4"
        ),
        "int4-float-embeddings": quantize_run(
            run, run.parent / "int4-keep", "int4", group_size=32, embeddings="float"
        ),
    }


def tensor_bytes(path: Path) -> int:
    """The bytes of a safetensors file's tensors (the file less its 8-byte length and header)."""
    data = path.read_bytes()
    return len(data) - 8 - int.from_bytes(data[:8], "little")


def unique_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of ``tensors``, each storage once (a tied table and head share theirs)."""
    unique = {t.untyped_storage().data_ptr(): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


def stored_bytes(matrix: QuantizedWeight) -> int:
    """What a quantised matrix must take: int8 codes and a float32 scale per row, or half a
    byte per int4 code and a bfloat16 scale and offset per group."""
    if matrix.bits == 8:
        return matrix.rows * matrix.cols + 4 * matrix.rows
    return matrix.rows * matrix.cols // 2 + 4 * matrix.rows * matrix.cols // matrix.group_size


def test_file_sizes(run: Path, quantised: dict[str, dict]) -> None:
    """The checkpoint's tensors are exactly the model's, the tied table and head's codes once;
    against the float run they shrink by exactly what the quantised matrices save (4 bytes per
    float weight against their codes, scales and offsets)."""
    float_folder = list_checkpoints(run)[0]
    float_data = tensor_bytes(float_folder / MODEL_FILE)
    tables = {
        "int8": "int8",
        "int4": "int8",
        "int4-int4-embeddings": "int4 g32",
        "int4-float-embeddings": "float",
    }
    for method, table in tables.items():
        result = quantised[method]
        _, model, _, _ = load_trained_model(result["out"])
        folder = list_checkpoints(Path(result["out"]))[0]
        assert (folder / MODEL_FILE).stat().st_size == result["bytes"]
        assert tensor_bytes(folder / MODEL_FILE) == unique_bytes(list(model.state_dict().values()))
        quantized = [m for m in model.modules() if isinstance(m, QuantizedWeight)]
        matrices = {m.codes.untyped_storage().data_ptr(): m for m in quantized}.values()
        float_weights = 4 * sum(m.rows * m.cols for m in matrices)
        stored = unique_bytes([b for m in matrices for b in m.buffers()])
        assert stored == sum(stored_bytes(m) for m in matrices), method
        assert float_data - tensor_bytes(folder / MODEL_FILE) == float_weights - stored, method
        assert result["float_layers"] == [] and result["smaller_groups"] == {}
        assert result["tied"] and result["embeddings"] == table
        written = json.loads((Path(result["out"]) / "quantization.json").read_text())
        assert written == result
    for method in ("int4", "int4-int4-embeddings"):  # the tied table and head: stored once
        checkpoint = load_latest_checkpoint(Path(quantised[method]["out"]))
        assert checkpoint.model["embed.codes"] is checkpoint.model["head.codes"]
        _, model, _, _ = load_trained_model(quantised[method]["out"])
        assert isinstance(model.embed, QuantizedEmbedding)
        assert all(getattr(model.embed, name) is getattr(model.head, name) for name in STORED)
    assert model.embed.bits == 4 and model.blocks[0].mixer.qkv.bits == 4
    _, kept, _, _ = load_trained_model(quantised["int4-float-embeddings"]["out"])
    assert type(kept.embed) is nn.Embedding and type(kept.head) is nn.Linear
    assert kept.head.weight is kept.embed.weight


@pytest.mark.parametrize(
    "method, tolerance",
    [("int8", 0.01), ("int4", 0.1), ("int4-int4-embeddings", 0.1), ("int4-float-embeddings", 0.1)],
)
def test_quantised_logits_are_close_to_float(run, quantised, method, tolerance) -> None:
    """Relative RMS error of the (centred) logits below the weights' own relative RMS
    quantisation error for Gaussian weights: ~1% for int8 (a step of max|w| / 127 per row),
    ~11% for int4 (a 15th of each group's range), which the residual stream dilutes (an int8
    or float embedding and head dilute it further)."""
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
    for method in ("int8", "int4", "int4-int4-embeddings"):
        out = quantised[method]["out"]
        assert main(["eval", out, "--batches", "2", "--json"]) == 0
        bpb = json.loads(capsys.readouterr().out)["bits_per_byte"]
        assert abs(bpb - float_bpb) < 0.05 * float_bpb, method
        assert main(["generate", out, "--prompt", "To be", "--max-new-tokens", "10"]) == 0
        assert capsys.readouterr().out.startswith("To be")


def test_serve_loads_a_quantised_run(quantised) -> None:
    """The OpenAI-compatible server answers from a quantised run what generate samples."""
    out = Path(quantised["int4"]["out"])
    _, model, tokenizer, _ = load_trained_model(out)
    ids = torch.tensor([tokenizer.encode("To be")])
    tokens = generate(model, ids, 12, SamplingSettings(temperature=0))[0, ids.shape[1] :]
    with serving_in_thread(open_service(out, device="cpu")) as url:
        api = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
        answer = api.completions.create(
            model=out.name, prompt="To be", max_tokens=12, temperature=0
        )
    assert answer.choices[0].text == tokenizer.decode(tokens.tolist())


def test_bad_input(run, quantised, tmp_path) -> None:
    with pytest.raises(ParamError, match="method"):
        quantize_run(run, tmp_path / "x", "int3")
    with pytest.raises(ParamError, match="group_size"):
        quantize_run(run, tmp_path / "x", "int4", group_size=48)
    with pytest.raises(ParamError, match="embeddings"):
        quantize_run(run, tmp_path / "x", "int4", embeddings="fp16")
    with pytest.raises(ParamError, match=r"embeddings.*needs int4 blocks"):
        quantize_run(run, tmp_path / "x", "int8", embeddings="int4")
    with pytest.raises(ParamError, match="already exists"):
        quantize_run(run, quantised["int8"]["out"], "int8")
    with pytest.raises(LmlabError, match="already quantised"):
        quantize_run(quantised["int8"]["out"], tmp_path / "x", "int4")
    with pytest.raises(LmlabError, match="no float weights to train"):
        resume_trainer(quantised["int4"]["out"], show_progress=False)
    with pytest.raises(LmlabError, match="export the float run"):
        export_run(quantised["int4"]["out"], tmp_path / "x", "hf")
    assert not (tmp_path / "x").exists()
