"""Checkpoints that are safe, atomic, verified and exact.

A checkpoint is a folder ``run_dir/checkpoints/step_00000123/``::

    model.safetensors                      the model state dict
    optimizer.json + optimizer.safetensors optimiser state: nested structure + its tensors
    trainer.json + trainer.safetensors     trainer state (same encoding, so it may hold tensors)
    rng.json + rng.safetensors             RNG states (python's ``random`` state is in the JSON)
    manifest.json                          sha256 and size of every file above, written last

*Safe*: only JSON and safetensors are parsed; nothing is unpickled, so loading cannot run code.
*Atomic*: the folder is written as ``.tmp-step_...``, fsynced and renamed into place, so every
``step_*`` folder is complete; ``.tmp-*`` entries are leftovers of a killed process, ignored by
readers and removed by the next save. One process writes a run's checkpoints at a time (the
run folder's lock, see ``run.RunHold``).
*Verified*: every file's size and sha256 are checked against the manifest before parsing; a damaged
checkpoint is reported in one line and the previous one is used.
*Exact*: tensors keep dtype, shape and bits; the JSON keeps int dict keys, tuples, bools, None and
every float (non-finite ones included), so ``optimizer.load_state_dict`` of a loaded state gives
back an equal ``state_dict()`` and a resumed run continues bit for bit.

A job of several processes writes a *sharded* checkpoint instead (``save_sharded_checkpoint``)::

    state/*.safetensors                    model and optimiser tensors, each rank its own shards
                                           (``torch.distributed.checkpoint``, safetensors format)
    optimizer.json + optimizer.safetensors the optimisers' parameter groups
    trainer.json + trainer.safetensors     as above
    rng-00000.json + rng-00000.safetensors RNG state of each rank (rng-00001.*, ...)
    manifest.json                          every file above, ``"layout": "sharded"``

It is as safe, atomic and verified as the other: written in ``.tmp-step_...`` by every rank,
then rank 0 writes the manifest and renames the folder. It loads into any number of
processes, one included (``lmlab.distributed.sharded``).

Tensors that share memory (tied embeddings) are stored once and come back as one tensor object
under both names; tensors that only partly overlap are stored as copies (equal values, aliasing
not kept). Non-contiguous tensors are stored contiguous.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import nn

from lmlab import files as atomic_files
from lmlab.distributed.group import Ranks, barrier
from lmlab.distributed.sharded import save_sharded, sharded_state
from lmlab.errors import LmlabError
from lmlab.files import disk_full_is_an_error

CHECKPOINTS_DIR = "checkpoints"
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.safetensors"
TREES = ("optimizer", "trainer", "rng")
CHECKPOINT_FILES = (
    MODEL_FILE,
    *(f"{tree}{ext}" for tree in TREES for ext in (".json", ".safetensors")),
)
TMP_PREFIX = ".tmp-"
FORMAT = "lmlab-checkpoint"
VERSION = 1

SHARDED_DIR = "state"
SHARDED = "sharded"

_STEP_DIR = re.compile(r"step_(\d+)")
_TAGS = ("__tensor__", "__tuple__", "__float__", "__dict__")
_KEYS_METADATA = "lmlab.keys"


@dataclass
class Checkpoint:
    """A verified checkpoint, decoded back into the objects that were saved."""

    step: int
    path: Path
    model: dict[str, torch.Tensor]
    optimizer: dict
    """Optimiser states by name; in a sharded checkpoint only their parameter groups."""
    trainer: dict
    rng: dict
    """Rank 0's RNG state."""
    sharded: Path | None = None
    """The tensors' folder of a sharded checkpoint (``model`` is then empty)."""
    rank_rng: list[dict] = field(default_factory=list)
    """Every rank's RNG state, in a sharded checkpoint."""

    def rng_of(self, rank: int) -> dict:
        """The RNG state rank ``rank`` continues with (a rank the saving job lacked takes rank
        0's)."""
        return self.rank_rng[rank] if rank < len(self.rank_rng) else self.rng


class _Corrupt(Exception):
    """A checkpoint file that is missing, damaged or unparsable (message: ``file: reason``)."""


def print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


# ---------------------------------------------------------------- tensors and nested states


def _tensors_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """safetensors bytes for ``tensors``, which may alias each other (see the module docstring).

    The header metadata maps every name, in the original order, to the stored tensor it reads.
    """
    stored: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    views: dict[tuple, str] = {}
    storages: set[tuple] = set()
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} is a {type(tensor).__name__}, not a tensor")
        tensor = tensor.detach()
        storage = (tensor.device, tensor.untyped_storage().data_ptr())
        view = (
            *storage,
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.stride(),
            tensor.dtype,
        )
        if tensor.numel() and view in views:
            sources[name] = views[view]
            continue
        overlaps = tensor.numel() > 0 and storage in storages
        views[view] = sources[name] = name
        storages.add(storage)
        tensor = tensor.cpu()
        stored[name] = (
            tensor.clone(memory_format=torch.contiguous_format) if overlaps else tensor.contiguous()
        )
    return safetensors.torch.save(stored, metadata={_KEYS_METADATA: json.dumps(sources)})


def _tensors_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    stored = safetensors.torch.load(data)
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    sources = json.loads(header["__metadata__"][_KEYS_METADATA])
    return {name: stored[source] for name, source in sources.items()}


def _join(path: str, key: object) -> str:
    return f"{path}/{key}" if path else str(key)


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON for ``obj`` with its tensors moved to ``tensors`` under their path in the structure.

    Plain JSON is kept where it is exact (str-keyed dicts, lists, finite floats, ...); the rest is
    tagged with a one-key object: ``{"__tensor__": key}``, ``{"__tuple__": [...]}``,
    ``{"__float__": "NaN"}`` and ``{"__dict__": [[key, value], ...]}`` for dicts with non-str
    keys (the optimiser's int parameter ids) or a key that looks like a tag.
    """
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": atomic_files.float_name(obj)}
    if isinstance(obj, torch.Tensor):
        key = path or "."
        while key in tensors:
            key += "~"
        tensors[key] = obj
        return {"__tensor__": key}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, _join(path, i), tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, _join(path, i), tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        for key in obj:
            if key is not None and not isinstance(key, bool | int | float | str):
                raise TypeError(f"cannot store dict key {key!r} at {path or 'the top'}")
        if all(isinstance(key, str) and key not in _TAGS for key in obj):
            return {key: _encode(v, _join(path, key), tensors) for key, v in obj.items()}
        pairs = [
            [_encode(k, path, tensors), _encode(v, _join(path, k), tensors)] for k, v in obj.items()
        ]
        return {"__dict__": pairs}
    raise TypeError(
        f"cannot store {type(obj).__name__} at {path or 'the top'} in a checkpoint; convert it "
        "to tensors, numbers, str, None, lists, tuples and dicts"
    )


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if len(node) == 1:
        [(tag, value)] = node.items()
        if tag == "__tensor__":
            return tensors[value]
        if tag == "__tuple__":
            return tuple(_decode(v, tensors) for v in value)
        if tag == "__float__":
            return float(value)
        if tag == "__dict__":
            return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
    return {key: _decode(v, tensors) for key, v in node.items()}


def _tree_files(name: str, obj: Any) -> dict[str, bytes]:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _encode(obj, "", tensors)
    # Unsorted: the order of the saved dicts is part of what comes back.
    return {
        f"{name}.json": atomic_files.json_bytes(skeleton, sort_keys=False),
        f"{name}.safetensors": _tensors_to_bytes(tensors),
    }


# ---------------------------------------------------------------- RNG


def capture_rng_state() -> dict:
    """Python ``random``, numpy's global generator, torch CPU and, when present, CUDA and MPS."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if torch.backends.mps.is_available():
        state["mps"] = torch.mps.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    """Undo :func:`capture_rng_state`; states of devices this machine lacks are skipped."""
    random.setstate(state["python"])
    saved = state["numpy"]
    np.random.set_state(
        (
            saved["kind"],
            saved["keys"].numpy().astype(np.uint32),
            saved["pos"],
            saved["has_gauss"],
            saved["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for index, device_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)
    if "mps" in state and torch.backends.mps.is_available():
        torch.mps.set_rng_state(state["mps"])


# ---------------------------------------------------------------- saving


def _step_name(step: int) -> str:
    return f"step_{step:08d}"


def _step_of(folder: Path) -> int:
    return int(folder.name.removeprefix("step_"))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders by step, newest last (not yet verified)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [
        (int(match[1]), path)
        for path in root.iterdir()
        if (match := _STEP_DIR.fullmatch(path.name)) and path.is_dir()
    ]
    return [path for _, path in sorted(found)]


def _discard(path: Path) -> None:
    """Delete a checkpoint; the rename first means a crash mid-delete leaves only a leftover."""
    doomed = path.with_name(f"{TMP_PREFIX}discard-{path.name}")
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def _remove_leftovers(root: Path) -> None:
    for path in root.iterdir():
        if path.name.startswith(TMP_PREFIX):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def save_checkpoint(
    run_dir: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict,
    trainer_state: dict,
    keep_last: int = 3,
    rng: dict | None = None,
) -> Path:
    """Write ``checkpoints/step_<step>`` atomically and return its path.

    ``rng`` defaults to the RNG state at this moment. Afterwards only the ``keep_last`` newest
    checkpoints up to ``step`` are kept; any newer ones belong to the timeline a resumed run
    abandoned and are removed too. A checkpoint already at ``step`` is replaced.
    """
    if keep_last < 1 or step < 0:
        raise ValueError(f"need step >= 0 and keep_last >= 1, got {step} and {keep_last}")
    files = {MODEL_FILE: _tensors_to_bytes(model_state)}
    trees = {
        "optimizer": optimizer_state,
        "trainer": trainer_state,
        "rng": capture_rng_state() if rng is None else rng,
    }
    for name in TREES:
        files.update(_tree_files(name, trees[name]))
    tmp = _new_tmp_folder(run_dir, step)
    try:
        _write_files(tmp, files)
        _write_manifest(tmp, step, {name: _entry(data) for name, data in files.items()}, {})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _commit(run_dir, tmp, step, keep_last)


def _entry(data: bytes) -> dict:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _new_tmp_folder(run_dir: Path, step: int) -> Path:
    """An empty ``.tmp-step_...`` folder (other leftovers removed) to write a checkpoint in."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        root.mkdir(parents=True)
        atomic_files.fsync_dir(root.parent)
    _remove_leftovers(root)
    tmp = root / f"{TMP_PREFIX}{_step_name(step)}"
    tmp.mkdir()
    return tmp


def _write_files(folder: Path, files: dict[str, bytes]) -> None:
    with disk_full_is_an_error(folder):
        for name, data in files.items():
            with open(folder / name, "xb") as file:
                atomic_files.write_synced(file, data)
        atomic_files.fsync_dir(folder)


def _write_manifest(folder: Path, step: int, files: dict[str, dict], extra: dict) -> None:
    """The manifest, last: its presence says every file it lists is complete."""
    manifest = {"format": FORMAT, "version": VERSION, "step": step, "files": files, **extra}
    _write_files(folder, {MANIFEST_FILE: atomic_files.json_bytes(manifest, sort_keys=True)})


def _commit(run_dir: Path, tmp: Path, step: int, keep_last: int) -> Path:
    """Rename the finished ``tmp`` into place, then prune (see :func:`save_checkpoint`)."""
    root = tmp.parent
    final = root / _step_name(step)
    if final.exists():
        _discard(final)
    os.replace(tmp, final)
    atomic_files.fsync_dir(root)

    others = [path for path in list_checkpoints(run_dir) if path != final]
    older = [path for path in others if _step_of(path) < step]
    newer = [path for path in others if _step_of(path) > step]
    for path in newer + older[: max(0, len(older) - (keep_last - 1))]:
        _discard(path)
    return final


def _rng_tree(rank: int) -> str:
    return f"rng-{rank:05d}"


def _hashed_files(folder: Path) -> dict[str, dict]:
    """Size and sha256 of every file under ``folder``, by relative path."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            entries[path.relative_to(folder).as_posix()] = _entry(path.read_bytes())
    return entries


def save_sharded_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    trainer_state: dict,
    ranks: Ranks,
    keep_last: int = 3,
) -> Path:
    """Write ``checkpoints/step_<step>`` of a job of several processes: a collective that every
    rank calls. Each rank writes its shards and its RNG state into the temporary folder, rank 0
    the small trees, the manifest (after every rank finished) and the rename."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    tmp = _new_tmp_folder(run_dir, step) if ranks.main else root / f"{TMP_PREFIX}{_step_name(step)}"
    barrier()
    tensors, param_groups = sharded_state(model, optimizers)
    try:
        with disk_full_is_an_error(tmp):
            save_sharded(tmp / SHARDED_DIR, tensors)
        _write_files(tmp, _tree_files(_rng_tree(ranks.rank), capture_rng_state()))
        if ranks.main:
            _write_files(tmp, _tree_files("optimizer", param_groups))
            _write_files(tmp, _tree_files("trainer", trainer_state))
        barrier()
        if ranks.main:
            extra = {"layout": SHARDED, "world_size": ranks.world_size}
            _write_manifest(tmp, step, _hashed_files(tmp), extra)
    except BaseException:
        if ranks.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = _commit(run_dir, tmp, step, keep_last) if ranks.main else root / _step_name(step)
    barrier()
    return final


# ---------------------------------------------------------------- loading


def _read(folder: Path, name: str) -> bytes:
    try:
        return (folder / name).read_bytes()
    except FileNotFoundError:
        raise _Corrupt(f"{name}: missing") from None
    except OSError as exc:
        raise _Corrupt(f"{name}: cannot be read ({exc.strerror})") from None


def _parse(name: str, parse: Callable[..., Any], *args: Any) -> Any:
    try:
        return parse(*args)
    except Exception as exc:  # any failure to decode bytes from disk means a damaged file
        raise _Corrupt(f"{name}: unreadable ({type(exc).__name__})") from None


def _manifest_fields(raw: bytes) -> tuple[tuple, dict[str, tuple[int, str]]]:
    manifest = json.loads(raw)
    files = {
        name: (int(entry["bytes"]), str(entry["sha256"]))
        for name, entry in manifest["files"].items()
    }
    return (manifest["format"], manifest["version"], manifest["step"]), files


def _read_manifest(folder: Path) -> tuple[int, dict[str, tuple[int, str]], dict]:
    """The step, the ``name -> (size, sha256)`` table and the layout (``world_size`` of a
    sharded checkpoint) of a checkpoint's manifest."""
    raw = _read(folder, MANIFEST_FILE)
    (kind, version, step), files = _parse(MANIFEST_FILE, _manifest_fields, raw)
    layout = _parse(MANIFEST_FILE, _layout, raw)
    if (kind, version) != (FORMAT, VERSION):
        raise _Corrupt(f"{MANIFEST_FILE}: not a {FORMAT} version {VERSION} manifest")
    if step != _step_of(folder):
        raise _Corrupt(f"{MANIFEST_FILE}: it is for step {step}")
    return step, files, layout


def _layout(raw: bytes) -> dict:
    manifest = json.loads(raw)
    if manifest.get("layout") != SHARDED:
        return {}
    return {"world_size": int(manifest["world_size"])}


def _verified(folder: Path, name: str, files: dict[str, tuple[int, str]]) -> bytes:
    if name not in files:
        raise _Corrupt(f"{name}: not in the manifest")
    size, sha256 = files[name]
    data = _read(folder, name)
    if len(data) < size:
        raise _Corrupt(f"{name}: truncated ({len(data)} of {size} bytes)")
    if len(data) != size:
        raise _Corrupt(f"{name}: {len(data)} bytes, the manifest says {size}")
    if hashlib.sha256(data).hexdigest() != sha256:
        raise _Corrupt(f"{name}: checksum mismatch")
    return data


def _decode_json(raw: bytes, tensors: dict[str, torch.Tensor]) -> Any:
    return _decode(json.loads(raw), tensors)


def _read_tree(data: dict[str, bytes], tree: str) -> Any:
    tensors = _parse(f"{tree}.safetensors", _tensors_from_bytes, data[f"{tree}.safetensors"])
    return _parse(f"{tree}.json", _decode_json, data[f"{tree}.json"], tensors)


def _read_checkpoint(folder: Path) -> Checkpoint:
    """Verify every file against the manifest, then parse them (a sharded checkpoint's tensors
    are verified here and read by whoever loads them)."""
    step, files, layout = _read_manifest(folder)
    if layout:
        world_size = layout["world_size"]
        rank_trees = [_rng_tree(rank) for rank in range(world_size)]
        needed = [
            f"{tree}{ext}"
            for tree in TREES[:2] + tuple(rank_trees)
            for ext in (".json", ".safetensors")
        ]
        missing = [name for name in needed if name not in files]
        if missing or not any(name.startswith(f"{SHARDED_DIR}/") for name in files):
            raise _Corrupt(f"{(missing or [SHARDED_DIR])[0]}: not in the manifest")
        data = {name: _verified(folder, name, files) for name in files}
        rank_rng = [_read_tree(data, tree) for tree in rank_trees]
        return Checkpoint(
            step=step,
            path=folder,
            model={},
            optimizer=_read_tree(data, "optimizer"),
            trainer=_read_tree(data, "trainer"),
            rng=rank_rng[0],
            sharded=folder / SHARDED_DIR,
            rank_rng=rank_rng,
        )
    data = {name: _verified(folder, name, files) for name in CHECKPOINT_FILES}
    trees = {tree: _read_tree(data, tree) for tree in TREES}
    model = _parse(MODEL_FILE, _tensors_from_bytes, data[MODEL_FILE])
    return Checkpoint(step=step, path=folder, model=model, **trees)


def load_latest_checkpoint(
    run_dir: Path, warn: Callable[[str], None] = print_to_stderr
) -> Checkpoint | None:
    """The newest checkpoint that verifies, or None; each damaged newer one is one ``warn`` line."""
    problems = []
    found = None
    for folder in reversed(list_checkpoints(run_dir)):
        try:
            found = _read_checkpoint(folder)
            break
        except _Corrupt as exc:
            problems.append(f"checkpoint {folder.name} is corrupt ({exc})")
    outcome = f"using {found.path.name}" if found else "no valid checkpoint left"
    for problem in problems:
        warn(f"{problem}; {outcome}")
    return found


def load_checkpoint_at(run_dir: Path, step: int) -> Checkpoint:
    """The checkpoint of ``step``, verified, or a one-line error listing the steps there are."""
    folders = {_step_of(folder): folder for folder in list_checkpoints(run_dir)}
    if step not in folders:
        kept = ", ".join(map(str, folders)) or "none"
        raise LmlabError(f"{run_dir} has no checkpoint of step {step}; it keeps steps: {kept}")
    try:
        return _read_checkpoint(folders[step])
    except _Corrupt as exc:
        raise LmlabError(
            f"checkpoint {folders[step]} is corrupt ({exc}); use another step"
        ) from None
