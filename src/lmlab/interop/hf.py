"""``lmlab export --format hf`` and ``lmlab import``: runs to Hugging Face model folders and back.

A run whose every layer is Llama's (attention with RoPE, SwiGLU, no extras) is written as a
plain ``LlamaForCausalLM`` that loads where lmlab is not installed; any other run as
``model_type: lmlab`` (``hf_model.py``), which loads once lmlab is imported. The folder holds
``config.json``, ``model.safetensors`` (float32), ``generation_config.json`` and the tokenizer
(``tokenizer.json``, ``tokenizer_config.json``). Import reads a local Llama-family folder into a
new run folder whose newest checkpoint holds the imported weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch

from lmlab.config.load import config_to_dict
from lmlab.config.schema import Config, DataConfig, TrainConfig
from lmlab.errors import LmlabError, ParamError
from lmlab.files import atomic_write_bytes, atomic_write_text
from lmlab.interop.llama import (
    from_llama_tensors,
    llama_config,
    llama_mismatches,
    model_config_from_llama,
    to_llama_tensors,
)
from lmlab.interop.tokenizer import hf_tokenizer_files, load_hf_tokenizer
from lmlab.model.lm import LanguageModel
from lmlab.train.checkpoint import save_checkpoint
from lmlab.train.registry import record_runs, run_row
from lmlab.train.run import claim_new_run, load_run_checkpoint, run_origin, save_run_config

HF_CONFIG_FILE = "config.json"
HF_WEIGHTS_FILE = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
LMLAB_ARCHITECTURE = "LmlabForCausalLM"


def _export_folder(out: str | Path) -> Path:
    """``out`` checked as a folder to write into: new, empty, or a previous export (its files
    are replaced); nothing is created yet."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ParamError(f"<out> {out} is a file; give a folder for the Hugging Face files", "out")
    if out.is_dir() and any(out.iterdir()) and not (out / HF_CONFIG_FILE).is_file():
        raise ParamError(
            f"<out> {out} is a folder holding other files; give a new or empty folder", "out"
        )
    if not out.parent.is_dir():
        raise ParamError(f"the folder of <out> {out} does not exist; create it first", "out")
    return out


def _unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor once (the tied head is the embedding)."""
    seen: set[int] = set()
    unique = {}
    for name, tensor in state.items():
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in seen:
            seen.add(pointer)
            unique[name] = tensor.detach().float().contiguous()
    return unique


def hf_files(config: Config, model: LanguageModel) -> tuple[dict, dict[str, torch.Tensor]]:
    """``config.json`` and the tensors of the Hugging Face form of ``model``: Llama when every
    layer is Llama's, else ``model_type: lmlab``."""
    if not llama_mismatches(config.model):
        return llama_config(config.model, config.data.seq_len), to_llama_tensors(
            model.state_dict(), config.model
        )
    hf_config = {
        "architectures": [LMLAB_ARCHITECTURE],
        "model_type": "lmlab",
        "lmlab": config_to_dict(config)["model"],
        "vocab_size": config.model.vocab_size,
        "tie_word_embeddings": config.model.tie_embeddings,
        "dtype": "float32",
    }
    tensors = {f"model.{name}": t for name, t in _unique_tensors(model.state_dict()).items()}
    return hf_config, tensors


def export_hf(run: str | Path, out: str | Path) -> dict:
    """Write the run's newest valid checkpoint as a Hugging Face model folder ``out``."""
    out = _export_folder(out)
    config, model, tokenizer, checkpoint = load_run_checkpoint(run)
    if checkpoint.trainer.get("quantization"):
        raise LmlabError(
            f"{run} holds the int8/int4 codes of lmlab quantize, which Hugging Face models do "
            "not read; export the float run it was quantised from"
        )
    hf_config, tensors = hf_files(config, model)
    out.mkdir(exist_ok=True)
    data = safetensors.torch.save(tensors, metadata={"format": "pt"})
    generation = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    texts = {
        HF_CONFIG_FILE: json.dumps(hf_config, indent=2) + "\n",
        GENERATION_CONFIG_FILE: json.dumps(generation, indent=2) + "\n",
        **hf_tokenizer_files(tokenizer),
    }
    atomic_write_bytes(out / HF_WEIGHTS_FILE, data)
    for name, text in texts.items():
        atomic_write_text(out / name, text)
    return {
        "out": str(out),
        "step": checkpoint.step,
        "model_type": hf_config["model_type"],
        "not_llama": llama_mismatches(config.model),
        "bytes": len(data),
    }


def _read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder: one ``model.safetensors`` or the shards its index names."""
    single, index = folder / HF_WEIGHTS_FILE, folder / HF_WEIGHTS_INDEX
    if single.is_file():
        files = [single]
    elif index.is_file():
        shards = json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()
        files = [folder / name for name in sorted(set(shards))]
    else:
        raise LmlabError(
            f"{folder} has no {HF_WEIGHTS_FILE} (nor {HF_WEIGHTS_INDEX}); lmlab imports "
            "safetensors checkpoints (save with save_pretrained(safe_serialization=True))"
        )
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            tensors.update(safetensors.torch.load_file(str(path)))
        except Exception as exc:  # safetensors raises its own error types on damaged files
            raise LmlabError(f"{path} is not a readable safetensors file ({exc})") from None
    return {name: tensor.float() for name, tensor in tensors.items()}


def import_hf(source: str | Path, out: str | Path) -> dict:
    """A new run folder ``out`` from the Llama-family model folder ``source``: config.yaml,
    tokenizer/ and checkpoint step 0 with the imported weights (no optimiser state)."""
    source, out = Path(source), Path(out)
    config_path = source / HF_CONFIG_FILE
    if not config_path.is_file():
        raise LmlabError(f"{source} has no {HF_CONFIG_FILE}; give a Hugging Face model folder")
    try:
        hf_config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LmlabError(f"{config_path} is not JSON ({exc})") from None
    try:
        model_config = model_config_from_llama(hf_config)
    except KeyError as exc:
        raise LmlabError(f"{config_path} lacks {exc}; is it a Llama config?") from None
    tokenizer = load_hf_tokenizer(source)
    tensors = _read_hf_tensors(source)
    config = Config(
        model=model_config,
        data=DataConfig(tokenizer="bpe", vocab_size=max(tokenizer.vocab_size, 260)),
        train=TrainConfig(),
        name=out.name,
        out_dir=str(out.parent),
    )
    config.validate()
    model = LanguageModel(config.model)
    try:
        state = from_llama_tensors(tensors, config.model)
        model.load_state_dict(state)
    except (KeyError, RuntimeError) as exc:
        raise LmlabError(
            f"the weights in {source} do not fit its {HF_CONFIG_FILE} ({exc})"
        ) from None
    if tokenizer.vocab_size > config.model.vocab_size:
        raise LmlabError(
            f"the tokenizer in {source} has {tokenizer.vocab_size} tokens but the model only "
            f"{config.model.vocab_size} embeddings"
        )
    hold = claim_new_run(config, "import")
    try:
        tokenizer.save(hold.run_dir / "tokenizer")
        save_run_config(hold.run_dir, config)
        origin = run_origin(config, tokenizer)
        save_checkpoint(
            hold.run_dir, 0, model.state_dict(), {}, {"origin": origin, "imported": str(source)}
        )
    finally:
        hold.release()
    record_runs([run_row(hold.run_dir, status="imported", config=config, preset="import")])
    return {
        "run": str(hold.run_dir),
        "parameters": model.num_parameters(),
        "layers": config.model.n_layers,
        "vocab_size": config.model.vocab_size,
    }
