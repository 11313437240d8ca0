"""LoRA adapters through PEFT on lmlab's own modules, the int8 frozen base of CPU QLoRA, the
adapter saved apart, and merging adapters back into plain weights.

PEFT's ``inject_adapter_in_model`` wraps the chosen ``nn.Linear`` layers of a
:class:`LanguageModel` in place (no PEFT model class around it), so the model keeps its own
forward and cached decode. It lives in ``train/`` because the Trainer builds a LoRA run's model
and :func:`lmlab.train.run.load_trained_model` rebuilds it for eval and generate.

The int8 base is hand-written: bitsandbytes' 8-bit and 4-bit layers need CUDA, and torchao's
weight-only int8 targets inference kernels, not a frozen layer under PEFT; a row-wise int8
weight with its scale, dequantised per forward, is a few lines and exact to test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config.schema import Config, PostConfig
from lmlab.errors import LmlabError
from lmlab.files import atomic_write_bytes, atomic_write_text
from lmlab.layers.quantized import quantize_int8

if TYPE_CHECKING:  # peft imports transformers: seconds, paid only by runs that use LoRA
    from peft import LoraConfig
    from peft.tuners.lora import LoraLayer

ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class Int8Linear(nn.Module):
    """A frozen linear layer stored as int8 with one float scale per output row (symmetric,
    weight-only, :func:`lmlab.layers.quantized.quantize_int8`): a quarter of float32's bytes.
    Unlike :class:`~lmlab.layers.quantized.QuantizedLinear`, whose int8 kernel has no
    backward, the weight is dequantised for each forward so gradients reach the input (the
    LoRA adapters above it train)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        codes, scale = quantize_int8(linear.weight.detach())
        self.register_buffer("weight_int8", codes)
        self.register_buffer("scale", scale[:, None].to(linear.weight.dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.to(self.scale.dtype) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantized().to(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def to_linear(self) -> nn.Linear:
        """An ordinary ``nn.Linear`` holding the dequantised weight."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.dequantized())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear.to(self.scale.device)


def lora_target_names(model: nn.Module, targets: str) -> list[str]:
    """The ``nn.Linear`` layers inside the blocks that get adapters: all of them, or those
    whose name ends with one of the comma-separated ``targets``."""
    wanted = [t.strip() for t in targets.split(",") if t.strip()]
    names = [
        name
        for name, module in model.named_modules()
        if name.startswith("blocks.") and isinstance(module, nn.Linear)
    ]
    chosen = [n for n in names if not wanted or any(n.split(".")[-1] == t for t in wanted)]
    if not chosen:
        suffixes = sorted({n.split(".")[-1] for n in names})
        raise LmlabError(
            f"post.lora_targets={targets!r} matches no linear layer in the blocks; "
            f"choose among {', '.join(suffixes) or 'none (the model has no linear layers)'}"
        )
    return chosen


def lora_config(model: nn.Module, post: PostConfig) -> LoraConfig:
    """PEFT's LoraConfig for ``post`` on ``model`` (before injection: it names its layers)."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise LmlabError(
            "post.lora=true needs the peft package: pip install 'lmlab[posttrain]'"
        ) from None

    return LoraConfig(
        r=post.lora_rank,
        lora_alpha=post.lora_alpha,
        lora_dropout=post.lora_dropout,
        target_modules=lora_target_names(model, post.lora_targets),
        bias="none",
    )


def add_lora(model: nn.Module, post: PostConfig) -> LoraConfig:
    """Freeze ``model``, inject PEFT LoRA adapters into its target layers (only they train),
    and store the frozen base of those layers as int8 when ``post.quantize_base=int8``;
    returns the LoraConfig used."""
    from peft import inject_adapter_in_model

    config = lora_config(model, post)
    for param in model.parameters():
        param.requires_grad_(False)
    inject_adapter_in_model(config, model)
    if post.quantize_base == "int8":
        for _, module in lora_layers(model):
            module.base_layer = Int8Linear(module.base_layer)
    return config


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (tied weights once; int8 weights count as
    parameters too, one per stored value)."""
    params = list(model.parameters())  # each shared parameter once
    total = sum(p.numel() for p in params)
    total += sum(b.numel() for name, b in model.named_buffers() if name.endswith("weight_int8"))
    return sum(p.numel() for p in params if p.requires_grad), total


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (PEFT's ``merge``) and put plain ``nn.Linear``
    layers back, so the model is an ordinary :class:`LanguageModel` again."""
    for name, module in lora_layers(model):
        if isinstance(module.base_layer, Int8Linear):
            module.base_layer = module.base_layer.to_linear()
        module.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module.get_base_layer())


def save_adapter(model: nn.Module, adapter: LoraConfig, config: Config, run_dir: Path) -> Path:
    """Write the adapter apart, as PEFT does: ``adapter/adapter_model.safetensors`` (the LoRA
    weights under PEFT's names) and ``adapter/adapter_config.json`` (the LoraConfig, its base
    the parent run)."""
    from peft import get_peft_model_state_dict

    folder = run_dir / ADAPTER_DIR
    folder.mkdir(exist_ok=True)
    weights = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    atomic_write_bytes(folder / ADAPTER_WEIGHTS, safetensors.torch.save(weights))
    settings = adapter.to_dict()
    settings["base_model_name_or_path"] = f"{config.parent.run}@{config.parent.step}"
    settings["target_modules"] = sorted(settings["target_modules"])
    settings["peft_type"] = str(settings["peft_type"].value)
    settings["task_type"] = None
    text = json.dumps(settings, indent=2, sort_keys=True, default=_json_value) + "\n"
    atomic_write_text(folder / ADAPTER_CONFIG, text)
    return folder


def _json_value(value: object) -> object:
    return sorted(value) if isinstance(value, set) else str(value)
