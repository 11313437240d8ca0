"""Optimisers: AdamW everywhere, or Muon for hidden matrices with AdamW for the rest.

Muon orthogonalises the update of a weight matrix; it suits the matrices inside blocks but not
embeddings, the output head (rows are per-token vectors), norms, biases or scalar gates, which
stay with AdamW as Keller Jordan's recipe prescribes. Routers are classifiers too: each row of
a MoE router, mixture-of-heads router or Mixture-of-Depths router is one class's logit.

The rule (:func:`split_parameters`): Muon takes the ``weight`` of every ``nn.Linear`` (or
subclass, e.g. a BitLinear's latent weight) except the output head and any module under one
that declares ``optimizer_hint = "adamw"`` (``lmlab.layers.base.LayerHooks``); every other
parameter goes to AdamW. Raw ``nn.Parameter`` tensors (convolution kernels, decay rates,
per-channel biases, position tables) are not matrices that map a hidden vector to another, so
going by module type, not by ``ndim == 2``, keeps them out of Muon.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from lmlab.config.schema import TrainConfig
from lmlab.distributed.parallel import load_optimizer_state, optimizer_state
from lmlab.layers.base import LayerHooks
from lmlab.train.device import cpu_has_fast_bf16
from lmlab.train.muon import Muon


class OptimizerSet:
    """Several optimisers stepped together, with one schedule multiplier for all of them."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        for optimizer in optimizers.values():
            for group in optimizer.param_groups:
                group.setdefault("base_lr", group["lr"])

    def set_lr_multiplier(self, multiplier: float) -> None:
        for optimizer in self.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * multiplier

    def learning_rates(self) -> dict[str, float]:
        """The current rate of each optimiser (its first group; all groups share the multiplier)."""
        return {name: opt.param_groups[0]["lr"] for name, opt in self.optimizers.items()}

    def step(self) -> None:
        for optimizer in self.optimizers.values():
            optimizer.step()

    def zero_grad(self) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)

    def state_dict(self, model: nn.Module) -> dict:
        """Each optimiser's whole state, keyed by the names of ``model``'s parameters, so it
        loads into the same model in any number of processes (a collective under FSDP)."""
        return {name: optimizer_state(model, opt) for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict, model: nn.Module) -> None:
        """Load :meth:`state_dict`'s states (or those of checkpoints written before the names,
        keyed by position, which load in one process only)."""
        if set(state) != set(self.optimizers):
            raise ValueError(
                f"optimizer state has {sorted(state)}, expected {sorted(self.optimizers)}"
            )
        for name, optimizer in self.optimizers.items():
            saved = state[name]
            if all(isinstance(p, int) for g in saved["param_groups"] for p in g["params"]):
                optimizer.load_state_dict(saved)
            else:
                load_optimizer_state(model, optimizer, saved)


def split_parameters(
    model: nn.Module,
) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """``(muon, adamw)`` named parameters by the rule above; each parameter in exactly one."""
    head = getattr(model, "head", None)
    hidden: set[int] = set()

    def visit(module: nn.Module, adamw: bool) -> None:
        hint = module.optimizer_hint if isinstance(module, LayerHooks) else None
        adamw = adamw or module is head or hint == "adamw"
        if isinstance(module, nn.Linear) and not adamw:
            hidden.add(id(module.weight))
        for child in module.children():
            visit(child, adamw)

    visit(model, False)
    if head is not None:
        hidden -= {id(p) for p in head.parameters()}  # a head tied to a hidden matrix
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return (
        [(n, p) for n, p in named if id(p) in hidden],
        [(n, p) for n, p in named if id(p) not in hidden],
    )


def _adamw(params: Iterable[tuple[str, nn.Parameter]], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains, biases and gates are not decayed)."""
    decay, no_decay = [], []
    for _, param in params:
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=False
    )


def build_optimizers(
    model: nn.Module, cfg: TrainConfig, device: torch.device | None = None
) -> OptimizerSet:
    """The optimiser set for ``cfg.optimizer``; tied weights appear once, frozen ones (a LoRA
    run's base) not at all."""
    device = device or next(model.parameters()).device
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return OptimizerSet({"adamw": _adamw(named, cfg)})
    matrices, rest = split_parameters(model)
    fast_bf16 = device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16())
    muon = Muon(
        [p for _, p in matrices],
        lr=cfg.muon_lr,
        weight_decay=cfg.weight_decay,
        ns_dtype=torch.bfloat16 if fast_bf16 else torch.float32,
    )
    return OptimizerSet({"muon": muon, "adamw": _adamw(rest, cfg)})
