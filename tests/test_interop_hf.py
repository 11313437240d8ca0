"""Hugging Face export and import: Llama checkpoints that load without lmlab, ``model_type:
lmlab`` for every other model with cached ``generate()``, tokenizers with the same ids, and
Llama folders imported as runs with the same logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from interop_runs import TEXT, make_run
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from lmlab.cli import main
from lmlab.errors import LmlabError
from lmlab.interop.hf import import_hf
from lmlab.interop.tokenizer import to_hf_tokenizer
from lmlab.model.generate import SamplingSettings, generate
from lmlab.train.run import load_trained_model

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

RARE = "naïve café — Ωmega ∑ 漢字 🦀\t\x00 end\n"
PROMPT = "To be, or no"
GREEDY = SamplingSettings(temperature=0)


def lmlab_reference(run: Path, prompt: str, new_tokens: int) -> tuple[torch.Tensor, list[int]]:
    """lmlab's logits of ``prompt`` and its greedy continuation (as ``lmlab generate``)."""
    _, model, tokenizer, _ = load_trained_model(run)
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        logits = model(ids)[0][0]
    return logits, generate(model, ids, new_tokens, GREEDY)[0].tolist()


WITHOUT_LMLAB = """
import json, pathlib, sys
sys.path[:] = [p for p in sys.path if not (pathlib.Path(p or ".") / "lmlab").exists()]
try:
    import lmlab
except ImportError:
    pass
else:
    raise SystemExit("lmlab is importable: the test would not show anything")
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
results = {}
for folder in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(sys.argv[1], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    results[folder] = {
        "class": type(model).__name__,
        "ids": ids[0].tolist(),
        "logits": logits.tolist(),
        "generated": out[0].tolist(),
        "text": tokenizer.decode(out[0]),
    }
print(json.dumps(results))
"""


def test_llama_export_loads_without_lmlab(tmp_path: Path, capsys: pytest.CaptureFixture):
    """GQA with an untied head and MHA with a tied one: plain LlamaForCausalLM folders that a
    Python without lmlab loads, with lmlab's logits (1e-4) and greedy tokens."""
    runs = {
        "gqa": make_run(
            tmp_path, "gqa", overrides=("model.n_kv_heads=2", "model.tie_embeddings=false")
        ),
        "mha": make_run(tmp_path, "mha", overrides=("model.rope_theta=500.0",)),
    }
    folders = []
    for name, run in runs.items():
        assert (
            main(["export", str(run), "--format", "hf", "--out", str(tmp_path / f"hf-{name}")]) == 0
        )
        folders.append(str(tmp_path / f"hf-{name}"))
        config = json.loads((tmp_path / f"hf-{name}" / "config.json").read_text())
        assert config["model_type"] == "llama"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-I", "-c", WITHOUT_LMLAB, PROMPT, *folders],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout)
    for run, folder in zip(runs.values(), folders, strict=True):
        got = results[folder]
        assert got["class"] == "LlamaForCausalLM"
        logits, greedy = lmlab_reference(run, PROMPT, 12)
        _, _, tokenizer, _ = load_trained_model(run)
        assert got["ids"] == tokenizer.encode(PROMPT)
        assert (torch.tensor(got["logits"]) - logits).abs().max().item() < 1e-4
        assert got["generated"] == greedy
        capsys.readouterr()
        assert (
            main(
                [
                    "generate",
                    str(run),
                    "--prompt",
                    PROMPT,
                    "--temperature",
                    "0",
                    "--max-new-tokens",
                    "12",
                ]
            )
            == 0
        )
        assert capsys.readouterr().out == got["text"] + "\n"


@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_tokenizers_export_with_the_same_ids(tmp_path: Path, kind: str):
    """Every lmlab tokenizer as tokenizers/AutoTokenizer gives its ids, rare characters
    included (the char tokenizer maps unseen ones to its unknown id 0), and decodes back."""
    run = make_run(tmp_path, kind, tokenizer=kind)
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    _, _, tokenizer, _ = load_trained_model(run)
    text = TEXT[:60] + RARE
    expected = tokenizer.encode(text)
    assert to_hf_tokenizer(tokenizer).encode(text).ids == expected
    auto = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert auto(text).input_ids == expected
    assert auto.decode(expected) == tokenizer.decode(expected)
    if kind == "char":
        assert 0 in expected
    else:
        assert auto.decode(expected) == text


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("window", ("model.mixer_options.attention.window=4",)),
        ("gla", ("model.mixer=gla",)),
        ("hybrid", ("model.pattern=MA",)),
        ("moe", ("model.channel_mixer=moe",)),
    ],
)
def test_lmlab_model_type_generates_like_lmlab(tmp_path: Path, name: str, overrides: tuple):
    """Attention with a sliding window (not Llama), a recurrent mixer, a Mamba-2/attention
    hybrid and MoE load through AutoModelForCausalLM (no trust_remote_code) and generate with
    their cache exactly as lmlab does."""
    run = make_run(tmp_path, name, overrides=overrides)
    folder = tmp_path / "hf"
    assert main(["export", str(run), "--format", "hf", "--out", str(folder)]) == 0
    assert json.loads((folder / "config.json").read_text())["model_type"] == "lmlab"
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    logits, greedy = lmlab_reference(run, PROMPT, 12)
    with torch.no_grad():
        hf_logits = model(ids).logits[0]
    assert (hf_logits - logits).abs().max().item() < 1e-5
    assert model.generate(ids, max_new_tokens=12, do_sample=False)[0].tolist() == greedy


def test_lmlab_model_type_refuses_padding(tmp_path: Path):
    run = make_run(tmp_path, "gla", overrides=("model.mixer=gla",))
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="no padding"):
        model(torch.ones(1, 3, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1]]))


def small_llama(folder: Path, **config: object) -> LlamaForCausalLM:
    """A randomly initialised Llama with a byte-level BPE tokenizer, saved in ``folder``."""
    hf_tok = HFTokenizer(models.BPE())
    hf_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    hf_tok.train_from_iterator([TEXT], trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=hf_tok).save_pretrained(folder)
    settings = dict(
        vocab_size=hf_tok.get_vocab_size(),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**settings, **config})).eval()
    model.save_pretrained(folder)
    return model


def test_import_llama_gives_equal_logits(tmp_path: Path, capsys: pytest.CaptureFixture):
    """A random LlamaForCausalLM (GQA, untied) and its BPE tokenizer become a run with the same
    token ids and logits; exporting that run gives the same Llama tensors back."""
    source = tmp_path / "llama"
    hf_model = small_llama(source)
    assert main(["import", str(source), "--out", str(tmp_path / "runs" / "imported")]) == 0
    run = tmp_path / "runs" / "imported"
    _, model, tokenizer, step = load_trained_model(run)
    assert step == 0
    text = TEXT[:50] + RARE
    hf_tokenizer = AutoTokenizer.from_pretrained(source)
    assert tokenizer.encode(text) == hf_tokenizer(text).input_ids
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.no_grad():
        diff = (model(ids)[0] - hf_model(ids).logits).abs().max().item()
    assert diff < 1e-4
    assert main(["export", str(run), "--format", "hf", "--out", str(tmp_path / "again")]) == 0
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    for name, tensor in hf_model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name


def test_import_names_every_unsupported_feature(tmp_path: Path):
    source = tmp_path / "llama"
    small_llama(
        source,
        attention_bias=True,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
    )
    with pytest.raises(LmlabError) as caught:
        import_hf(source, tmp_path / "run")
    message = str(caught.value)
    assert "attention biases" in message and "rope scaling 'linear'" in message
    assert "\n" not in message
    assert not (tmp_path / "run").exists()


LAZY_REGISTRATION = """
import sys
import lmlab
assert "torch" not in sys.modules and "transformers" not in sys.modules, "lmlab must stay light"
from transformers import AutoConfig, AutoModelForCausalLM
config = AutoConfig.for_model("lmlab", lmlab={"d_model": 32, "n_layers": 1}, vocab_size=11)
model = AutoModelForCausalLM.from_config(config)
print(type(model).__name__, model.model.cfg.d_model, model.model.cfg.vocab_size)
"""


def test_import_lmlab_registers_the_model_type_when_transformers_comes_later():
    """``import lmlab`` imports neither transformers nor torch, yet the auto classes build
    lmlab models once transformers is imported (a fresh interpreter, so the order is known)."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    done = subprocess.run(
        [sys.executable, "-c", LAZY_REGISTRATION],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": src},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["LmlabForCausalLM", "32", "11"]


def test_install_registers_at_once_when_transformers_is_loaded(monkeypatch):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from lmlab.interop.autoregister import install

    monkeypatch.delitem(CONFIG_MAPPING._extra_content, "lmlab", raising=False)
    assert "lmlab" not in CONFIG_MAPPING
    install()
    assert CONFIG_MAPPING["lmlab"].__name__ == "LmlabConfig"
