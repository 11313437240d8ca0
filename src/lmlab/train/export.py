"""Export a trained BitLinear model as packed ternary weights, and load it back.

The file is one safetensors file (see docs/bitlinear.md):

- ``<name>.weight.packed`` (uint8, 4 codes per byte) and ``<name>.weight.scale`` (float32 [])
  for every ``BitLinear`` weight;
- every other tensor of the state dict as is (tied tensors stored once);
- string metadata: ``format`` (``lmlab-ternary``), ``version``, ``step``, ``config`` (the run's
  YAML), ``ternary`` (JSON: name -> shape), ``aliases`` (JSON: tied name -> stored name),
  ``tokenizer_kind`` and ``tokenizer`` (its saved state), so the file alone rebuilds the model.

The loaded model gives the same logits as the trained one: each BitLinear gets the weight
``codes * scale`` and keeps ``scale`` as its ``fixed_scale``.
"""

from __future__ import annotations

import json
from pathlib import Path

import safetensors
import safetensors.torch
import torch
import yaml

from lmlab.config.load import build_config, dump_config
from lmlab.config.schema import Config
from lmlab.data.tokenizers import Tokenizer, tokenizer_from_state, tokenizer_state
from lmlab.errors import LmlabError, ParamError
from lmlab.files import atomic_write_bytes
from lmlab.layers.bitlinear import BitLinear, pack_ternary, unpack_ternary
from lmlab.model.lm import LanguageModel
from lmlab.train.checkpoint import MODEL_FILE, Checkpoint
from lmlab.train.run import load_run_checkpoint

FORMATS = ("ternary",)
TERNARY_FORMAT = "lmlab-ternary"
TERNARY_VERSION = "1"


def ternary_bytes(model: LanguageModel, config: Config, tokenizer: Tokenizer, step: int) -> bytes:
    """The safetensors bytes of the ternary export of ``model`` (which has BitLinear layers)."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, BitLinear)}
    if not layers:
        raise LmlabError(
            "the model has no BitLinear layers, so there is nothing ternary to export; "
            "train it with model.bitlinear=true"
        )
    tensors: dict[str, torch.Tensor] = {}
    ternary: dict[str, list[int]] = {}
    for name, module in layers.items():
        packed, scale, shape = pack_ternary(module.weight, module.fixed_scale)
        tensors[f"{name}.weight.packed"], tensors[f"{name}.weight.scale"] = packed, scale
        ternary[f"{name}.weight"] = list(shape)
    aliases: dict[str, str] = {}
    stored: dict[int, str] = {}
    for name, tensor in model.state_dict().items():
        if name in ternary:
            continue
        pointer = tensor.untyped_storage().data_ptr()
        if pointer in stored:
            aliases[name] = stored[pointer]
            continue
        stored[pointer] = name
        tensors[name] = tensor.detach().cpu().contiguous()
    kind, state = tokenizer_state(tokenizer)
    metadata = {
        "format": TERNARY_FORMAT,
        "version": TERNARY_VERSION,
        "step": str(step),
        "config": dump_config(config),
        "ternary": json.dumps(ternary),
        "aliases": json.dumps(aliases),
        "tokenizer_kind": kind,
        "tokenizer": state,
    }
    return safetensors.torch.save(tensors, metadata=metadata)


def export_run(run: str | Path, out: str | Path, fmt: str = "ternary") -> dict:
    """Write the export of a run's newest valid checkpoint to ``out`` (atomically); returns
    its size next to the fp32 checkpoint's ``model.safetensors``."""
    if fmt not in FORMATS:
        raise LmlabError(f"unknown export format {fmt!r}; use {', '.join(FORMATS)}")
    out = Path(out)
    if out.is_dir():
        raise ParamError(
            f"<out> {out} is a folder; give a file name, e.g. {out / 'model.safetensors'}",
            "out",
        )
    if not out.parent.is_dir():
        raise ParamError(f"the folder of <out> {out} does not exist; create it first", "out")
    config, model, tokenizer, checkpoint = load_run_checkpoint(run)
    data = ternary_bytes(model, config, tokenizer, checkpoint.step)
    atomic_write_bytes(out, data)
    return {
        "out": str(out),
        "step": checkpoint.step,
        "ternary_layers": sum(isinstance(m, BitLinear) for m in model.modules()),
        "bytes": len(data),
        "checkpoint_bytes": _float_weights_bytes(checkpoint, model),
    }


def _float_weights_bytes(checkpoint: Checkpoint, model: LanguageModel) -> int:
    """The size of the float weights the checkpoint holds: its ``model.safetensors``, or for a
    sharded checkpoint (whose shards hold the optimiser state too) the model's tensors."""
    if checkpoint.sharded is None:
        return (checkpoint.path / MODEL_FILE).stat().st_size
    unique = {t.untyped_storage().data_ptr(): t for t in model.state_dict().values()}
    return sum(t.numel() * t.element_size() for t in unique.values())


def load_ternary(path: str | Path) -> tuple[Config, LanguageModel, Tokenizer, int]:
    """Config, model (eval mode), tokenizer and step rebuilt from a ternary export."""
    path = Path(path)
    if not path.is_file():
        raise LmlabError(f"{path} does not exist; give a file written by lmlab export")
    try:
        with safetensors.safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
        tensors = safetensors.torch.load_file(path)
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise LmlabError(f"{path} is not a safetensors file ({exc}); re-export it") from None
    if metadata.get("format") != TERNARY_FORMAT:
        raise LmlabError(f"{path} is not an lmlab ternary export; write one with lmlab export")
    if metadata.get("version") != TERNARY_VERSION:
        raise LmlabError(
            f"{path} is ternary export version {metadata.get('version')}, this lmlab reads "
            f"version {TERNARY_VERSION}; re-export it"
        )
    try:
        config = build_config(base=yaml.safe_load(metadata["config"]))
        tokenizer = tokenizer_from_state(metadata["tokenizer_kind"], metadata["tokenizer"])
        model = LanguageModel(config.model)
        state = {}
        for name, shape in json.loads(metadata["ternary"]).items():
            module = model.get_submodule(name.removesuffix(".weight"))
            if not isinstance(module, BitLinear):
                raise ValueError(f"{name} is stored ternary but its layer is not BitLinear")
            scale = tensors.pop(f"{name}.scale")
            state[name] = unpack_ternary(tensors.pop(f"{name}.packed"), scale, tuple(shape))
            module.fixed_scale = scale
        state.update(tensors)
        for name, source in json.loads(metadata["aliases"]).items():
            state[name] = state[source]
        model.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError, AttributeError) as exc:
        raise LmlabError(
            f"{path} is damaged or does not fit its config ({exc}); re-export it"
        ) from None
    return config, model.eval(), tokenizer, int(metadata["step"])


def _check_fits(model: LanguageModel, state: dict[str, torch.Tensor]) -> None:
    """ValueError naming the first tensor that is missing, unexpected or of the wrong shape."""
    expected = model.state_dict()
    for name in sorted(set(expected) | set(state)):
        if name not in state or name not in expected:
            where = "missing from the file" if name not in state else "not in the model"
            raise ValueError(f"tensor {name} is {where}")
        if expected[name].shape != state[name].shape:
            raise ValueError(f"tensor {name} has shape {tuple(state[name].shape)}")
