"""LoRA through PEFT: only adapters train, the adapter is saved apart in PEFT's format, `merge`
gives an ordinary run with the adapted model's logits, the int8 base (CPU QLoRA) is within half
a quantisation step of the weights, and a LoRA run resumes exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import TINY_GRID
from peft import LoraConfig

from lmlab.cli import main
from lmlab.config.schema import PostConfig
from lmlab.errors import LmlabError
from lmlab.model.lm import LanguageModel
from lmlab.posttrain.datasets import pretraining_text
from lmlab.posttrain.merge import merge_run
from lmlab.train.adapters import Int8Linear, add_lora, lora_target_names, trainable_parameters
from lmlab.train.checkpoint import load_latest_checkpoint
from lmlab.train.run import load_trained_model

PRETRAIN = [*TINY_GRID, "model.d_model=32", "data.seq_len=24", "train.eval_interval=1000"]
LORA = ["--lora", "train.warmup_steps=1", "train.eval_interval=1000", "post.eval_examples=4"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lora")
    text = folder / "arith.txt"
    text.write_text(pretraining_text(), encoding="utf-8")
    settings = [*PRETRAIN, f"data.path={text}", f"out_dir={folder}", "train.max_steps=10"]
    assert main(["train", "--quiet", *settings, "name=base"]) == 0
    return folder / "base"


def finetune(base: Path, out: Path, name: str, *extra: str) -> Path:
    argv = ["finetune", str(base), "--data", "addition2", "--quiet", *LORA, *extra]
    assert main([*argv, "train.max_steps=6", f"out_dir={out}", f"name={name}"]) == 0
    return out / name


def test_only_adapters_train_and_their_count_is_printed(base, tmp_path, capsys):
    run = finetune(base, tmp_path, "lora", "post.lora_targets=qkv,out")
    err = capsys.readouterr().err
    parent = load_latest_checkpoint(base).model
    child = load_latest_checkpoint(run).model
    lora_keys = [k for k in child if ".lora_" in k]
    rank = 8
    model = LanguageModel(load_trained_model(base)[0].model)
    names = lora_target_names(model, "qkv,out")
    expected = sum(
        rank * (model.get_submodule(n).in_features + model.get_submodule(n).out_features)
        for n in names
    )
    assert sum(child[k].numel() for k in lora_keys) == expected
    assert f"LoRA: {expected:,} of" in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trainable_parameters"] == expected
    for key, tensor in child.items():
        if ".lora_" in key:
            continue
        plain = key.replace(".base_layer", "")
        assert torch.equal(tensor, parent[plain]), key  # the base stayed frozen
    assert any(not torch.all(child[k] == 0) for k in lora_keys if "lora_B" in k)  # B moved


def test_adapter_is_saved_apart_in_peft_format(base, tmp_path):
    run = finetune(base, tmp_path, "lora")
    folder = run / "adapter"
    config = LoraConfig.from_pretrained(str(folder))
    assert config.r == 8 and config.base_model_name_or_path == f"{base.resolve()}@10"
    saved = safetensors.torch.load_file(folder / "adapter_model.safetensors")
    checkpoint = load_latest_checkpoint(run).model
    assert saved and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in saved)
    for key, tensor in saved.items():
        assert torch.equal(tensor, checkpoint[key.replace(".weight", ".default.weight")]), key


def logits_of(run: Path) -> torch.Tensor:
    _, model, tokenizer, _ = load_trained_model(run)
    ids = torch.tensor([tokenizer.encode("12+34=46\n7+8=15")])
    with torch.no_grad():
        return model(ids)[0]


@pytest.mark.parametrize("base_weights", ["none", "int8"])
def test_merge_gives_an_ordinary_run_with_the_adapted_logits(base, tmp_path, base_weights):
    run = finetune(base, tmp_path, "lora", f"post.quantize_base={base_weights}")
    merged = merge_run(run)
    assert merged == tmp_path / "lora-merged"
    config, model, _, step = load_trained_model(merged)
    assert not config.post.lora and step == 6 and config.parent.run == str(run.resolve())
    assert set(model.state_dict()) == set(LanguageModel(config.model).state_dict())
    torch.testing.assert_close(logits_of(merged), logits_of(run), rtol=1e-5, atol=1e-5)
    assert main(["eval", str(merged), "--batches", "1"]) == 0
    with pytest.raises(LmlabError, match="not a LoRA run"):
        merge_run(merged)
    with pytest.raises(LmlabError, match="already exists"):
        merge_run(run)


def test_int8_base_is_within_half_a_step_and_a_quarter_of_the_bytes():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    quantized = Int8Linear(linear)
    error = (quantized.dequantized() - linear.weight).abs()
    assert torch.all(error <= quantized.scale / 2 + 1e-7)
    assert quantized.weight_int8.dtype == torch.int8
    x = torch.randn(5, 64)
    torch.testing.assert_close(
        quantized(x), torch.nn.functional.linear(x, quantized.dequantized(), linear.bias)
    )
    assert quantized.weight_int8.nbytes * 4 == linear.weight.nbytes


def test_lora_model_trains_adapters_only_and_int8_layers_hold_no_float_weight():
    torch.manual_seed(0)
    from lmlab.config.schema import ModelConfig

    model = LanguageModel(ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2))
    add_lora(model, PostConfig(lora=True, quantize_base="int8"))
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(".lora_" in n for n in trained)
    assert not any(n.endswith("base_layer.weight") for n, _ in model.named_parameters())
    count, total = trainable_parameters(model)
    assert count == sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)
    assert 0 < count < total
    with pytest.raises(LmlabError, match="matches no linear layer"):
        lora_target_names(model, "nothing")


def test_a_lora_run_resumes_exactly(base, tmp_path):
    """A LoRA run that lost its last checkpoint (as after a crash) resumes from step 3 to the
    weights of an uninterrupted run."""
    common = ["train.deterministic=true", "train.checkpoint_interval=3"]
    whole = finetune(base, tmp_path, "whole", *common)
    part = finetune(base, tmp_path, "part", *common)
    shutil.rmtree(part / "checkpoints" / "step_00000006")
    assert load_latest_checkpoint(part).step == 3
    assert main(["train", "--quiet", "--resume", str(part)]) == 0
    resumed, expected = load_latest_checkpoint(part).model, load_latest_checkpoint(whole).model
    assert resumed.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(resumed[key], tensor), key
