"""Sharded checkpoints of a model and its optimisers with ``torch.distributed.checkpoint``.

Every rank writes only its own shards (FSDP2: its slice of each parameter and moment; DDP: the
planner spreads the replicated tensors over the ranks) in parallel, and any number of ranks
reads them back, each taking what its own sharding needs. The storage is DCP's safetensors
format (``HuggingFaceStorageWriter`` / ``HuggingFaceStorageReader``): the tensors and their
offsets are in safetensors headers, so reading parses JSON and raw tensors and never unpickles
(DCP's default ``FileSystemWriter`` keeps its metadata as a pickle). Non-tensor state (the
optimisers' parameter groups) is returned to the caller, which stores it as JSON.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

MODEL = "model"
OPTIMIZER = "optimizer"


def _aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Names in ``state`` that alias an earlier tensor (a head tied to the embedding) -> that
    earlier name. A checkpoint stores one of them: safetensors refuses to write shared memory
    twice."""
    first: dict[tuple, str] = {}
    aliases = {}
    for name, tensor in state.items():
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        where = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape))
        if local.numel() and where in first:
            aliases[name] = first[where]
        else:
            first.setdefault(where, name)
    return aliases


def _model_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's tensors a checkpoint stores (sharded as the model is), under
    ``model/<fqn>``, and the aliases left out."""
    state = get_model_state_dict(model)
    aliases = _aliases(state)
    tensors = {f"{MODEL}/{fqn}": t for fqn, t in state.items() if fqn not in aliases}
    return tensors, aliases


def _set_model(model: nn.Module, tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> None:
    prefix = f"{MODEL}/"
    state = {key[len(prefix) :]: t for key, t in tensors.items() if key.startswith(prefix)}
    state.update({alias: state[source] for alias, source in aliases.items()})
    set_model_state_dict(model, state)


def _optimizer_key(name: str, fqn: str, key: str) -> str:
    return f"{OPTIMIZER}/{name}/{fqn}/{key}"


def sharded_state(
    model: nn.Module, optimizers: dict[str, torch.optim.Optimizer]
) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
    """``(tensors, param_groups)``: every tensor of the model and optimiser states, sharded as
    the model is, under flat names (``model/<fqn>``, ``optimizer/<name>/<fqn>/<key>``), and each
    optimiser's parameter groups (plain values). An optimiser that has not stepped yet gets its
    state created first (torch's ``get_optimizer_state_dict`` does a zero step), so the
    result also serves as the template a checkpoint is loaded into."""
    tensors, _ = _model_tensors(model)
    groups = {}
    for name, optimizer in optimizers.items():
        state = get_optimizer_state_dict(model, optimizer)
        for fqn, moments in state["state"].items():
            for key, value in moments.items():
                if not isinstance(value, torch.Tensor):
                    raise TypeError(f"optimizer {name}: state {fqn}/{key} is not a tensor")
                tensors[_optimizer_key(name, fqn, key)] = value
        groups[name] = state["param_groups"]
    return tensors, groups


def save_sharded(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` (a collective: every rank calls it with its shards)."""
    writer = dcp.HuggingFaceStorageWriter(str(folder), save_distributed=True)
    dcp.save(tensors, storage_writer=writer)


def load_sharded(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Fill ``tensors`` in place from a folder of :func:`save_sharded`, each with the part its
    sharding holds (one process without a process group reads whole tensors)."""
    with warnings.catch_warnings():  # one process reading without a group is intended here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(folder)))


def load_model(model: nn.Module, folder: Path) -> None:
    """The weights only (evaluation, generation, export), into ``model`` as it is sharded."""
    tensors, aliases = _model_tensors(model)
    load_sharded(folder, tensors)
    _set_model(model, tensors, aliases)


def load_model_and_optimizers(
    model: nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    folder: Path,
    param_groups: dict[str, list],
) -> None:
    """Restore what :func:`sharded_state` saved, resharded for this job's ranks."""
    tensors, _ = sharded_state(model, optimizers)
    load_sharded(folder, tensors)
    _set_model(model, tensors, _model_tensors(model)[1])
    for name, optimizer in optimizers.items():
        state: dict[str, dict[str, torch.Tensor]] = {}
        head = f"{OPTIMIZER}/{name}/"
        for key, value in tensors.items():
            if key.startswith(head):
                fqn, moment = key[len(head) :].rsplit("/", 1)
                state.setdefault(fqn, {})[moment] = value
        set_optimizer_state_dict(
            model, optimizer, {"state": state, "param_groups": param_groups[name]}
        )
