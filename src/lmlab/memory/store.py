"""A kNN-LM datastore on disk (Khandelwal et al. 2020, "Generalization through Memorization").

Every position of a text becomes one entry: its key is the model's final hidden state there
(``LanguageModel.features``: after the last block and the final RMSNorm, just before the head),
its value the token that follows. Keys are stored in a FAISS index (``faiss-cpu``), values in
``values.npy`` (int32, in the index's id order).

Index choice (``index="auto"``): exact search (``IndexFlatL2``) below :data:`FLAT_LIMIT` entries,
where a brute-force scan of a few hundred MB is still fast; IVF-PQ above it (``IndexIVFPQ``:
``nlist`` ~ sqrt(N) coarse cells, each key compressed to ``d / 8`` bytes, ``nprobe`` cells
searched), which keeps a 10M-entry store of 192-wide keys at ~0.3 GB instead of 7.7 GB. The
quantisers are trained on a seeded random sample of the keys. FAISS returns squared L2
distances; with IVF-PQ they are the compressed keys' (the paper's default too).

Building is resumable. Keys are computed in chunks of whole context windows; each chunk is
written as ``chunks/keys-NNNNN.npy`` and ``chunks/values-NNNNN.npy`` and then recorded in
``manifest.json`` (all atomically), so an interrupted build continues at the first unrecorded
chunk. When every chunk is there, the index is trained (IVF-PQ), filled chunk by chunk, written
atomically, and the chunk files are removed. The manifest names the run, its step, the hidden
size, the tokenizer's digest, the data source, the split and the counts; loading a store checks
them against the model that queries it.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np
import torch

from lmlab.data.dataset import prepare_data, with_source
from lmlab.data.tokenizers import Tokenizer, tokenizer_checksum
from lmlab.errors import LmlabError, ParamError
from lmlab.files import atomic_write_bytes, atomic_write_json
from lmlab.model.lm import LanguageModel
from lmlab.train.run import LOCK_FILE, RunHold, load_run_checkpoint

if TYPE_CHECKING:
    import faiss

FORMAT = 1
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
VALUES_FILE = "values.npy"
CHUNKS_DIR = "chunks"
INDEX_KINDS = ("auto", "flat", "ivfpq")
FLAT_LIMIT = 1_000_000
"""``auto`` uses exact search below this many entries and IVF-PQ from it on."""
IVFPQ_MIN_ENTRIES = 10_000
"""IVF-PQ trains 256 centroids per sub-quantiser; FAISS wants ~39 points per centroid."""
MAX_TRAINING_SAMPLE = 500_000
MAX_NLIST = 1024
"""Adding a key to an inverted file costs ``nlist * d`` (its nearest cell); with 4096 cells a
10M-entry build took several times longer on 2 cores, for a small gain in query time."""
SAMPLE_SEED = 0


def require_faiss() -> ModuleType:
    """FAISS, imported when first needed: it is the optional ``memory`` extra, and the rest of
    lmlab (the CLI included) must work without it."""
    try:
        import faiss
    except ImportError:
        raise LmlabError(
            "the retrieval memory needs FAISS; install it with pip install 'lmlab[memory]'"
        ) from None
    return faiss


@dataclass(frozen=True)
class IvfPqParams:
    """IVF-PQ settings for ``count`` keys of width ``dim`` (see :func:`ivfpq_params`)."""

    nlist: int
    m: int
    nprobe: int
    nbits: int = 8

    def training_size(self, count: int) -> int:
        """Keys to train the quantisers on: 64 per coarse cell, at least 256 * 39 for PQ."""
        return min(count, max(64 * self.nlist, 256 * 39), MAX_TRAINING_SAMPLE)


def ivfpq_params(count: int, dim: int) -> IvfPqParams:
    """``nlist``: the power of two nearest sqrt(count), at most :data:`MAX_NLIST` and
    ``count / 39`` (FAISS wants 39 training keys per cell);
    ``m``: the largest divisor of ``dim`` up to ``dim / 8`` (bytes per key); ``nprobe`` 32."""
    nlist = 2 ** round(math.log2(max(1.0, math.sqrt(count))))
    nlist = max(1, min(nlist, MAX_NLIST, count // 39))
    m = max(d for d in range(1, max(1, dim // 8) + 1) if dim % d == 0)
    return IvfPqParams(nlist=nlist, m=m, nprobe=min(32, nlist))


def resolve_index_kind(kind: str, count: int) -> str:
    """``flat`` or ``ivfpq`` for a store of ``count`` entries (``auto``: see :data:`FLAT_LIMIT`)."""
    if kind not in INDEX_KINDS:
        raise ParamError(f"<index>={kind!r} is unknown; use auto, flat or ivfpq", "index")
    if kind == "auto":
        return "flat" if count < FLAT_LIMIT else "ivfpq"
    if kind == "ivfpq" and count < IVFPQ_MIN_ENTRIES:
        raise ParamError(
            f"<index>=ivfpq needs at least {IVFPQ_MIN_ENTRIES} entries to train its quantisers "
            f"but the store has {count}; use flat",
            "index",
        )
    return kind


def new_index(dim: int, count: int, kind: str) -> faiss.Index:
    """An empty FAISS index for ``count`` keys of width ``dim`` (``flat`` or ``ivfpq``)."""
    faiss = require_faiss()
    if kind == "flat":
        return faiss.IndexFlatL2(dim)
    params = ivfpq_params(count, dim)
    index = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, params.nlist, params.m, params.nbits)
    index.nprobe = params.nprobe
    return index


def write_index(index: faiss.Index, path: Path) -> None:
    """Write ``index`` so that readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        require_faiss().write_index(index, str(tmp))
        with open(tmp, "rb") as file:
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_array(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write_bytes(path, buffer.getvalue())


@torch.no_grad()
def hidden_states(
    model: LanguageModel,
    tokens: np.ndarray,
    start: int,
    stop: int,
    seq_len: int,
    batch_size: int,
    device: torch.device | str,
) -> tuple[np.ndarray, np.ndarray]:
    """Keys ``[stop - start, d]`` (float32) and values (int32) of positions ``start..stop - 1``:
    the hidden state after reading each position, in windows of ``seq_len`` starting at
    ``start`` (a multiple of ``seq_len``, so windows are the same whatever the chunking), and
    the next token. ``stop`` must leave one token after it."""
    starts = list(range(start, stop, seq_len))
    full = [s for s in starts if s + seq_len <= stop]
    groups = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
    groups += [[s] for s in starts[len(full) :]]  # the shorter last window
    keys, values = [], []
    for group in groups:
        width = min(seq_len, stop - group[0])
        window = np.stack([tokens[s : s + width + 1] for s in group]).astype(np.int64)
        hidden, _ = model.features(torch.from_numpy(window[:, :-1]).to(device))
        keys.append(hidden.float().reshape(-1, hidden.shape[-1]).cpu().numpy())
        values.append(window[:, 1:].reshape(-1).astype(np.int32))
    return np.concatenate(keys), np.concatenate(values)


def _chunk_paths(out: Path, number: int) -> tuple[Path, Path]:
    folder = out / CHUNKS_DIR
    return folder / f"keys-{number:05d}.npy", folder / f"values-{number:05d}.npy"


SETTINGS = ("run", "step", "hidden_size", "tokenizer", "data", "split", "entries", "index")
"""Manifest fields that a resumed build must share with the build it continues."""


def _refuse_foreign(out: Path) -> None:
    """``out`` must be new, empty, or a store (lmlab never writes into anything else)."""
    if (out / MANIFEST).is_file():
        return
    if out.exists() and (not out.is_dir() or any(p.name != LOCK_FILE for p in out.iterdir())):
        raise LmlabError(
            f"{out} exists and is not a retrieval store (no {MANIFEST}); lmlab will not write "
            "into it: give a new or empty folder as --out"
        )


def _existing(out: Path, settings: dict) -> dict | None:
    """The manifest in ``out`` if there is one, refused unless built with ``settings``."""
    if not (out / MANIFEST).is_file():
        return None
    manifest = read_manifest(out)
    differing = [key for key in SETTINGS if manifest.get(key) != settings[key]]
    if differing:
        key = differing[0]
        raise LmlabError(
            f"{out} holds a store built with {key}={manifest.get(key)!r}, not "
            f"{settings[key]!r}; give another --out, or the same options to continue it"
        )
    return manifest


def _start_or_resume(out: Path, settings: dict) -> dict:
    """The manifest to continue (its settings must match), or a new one."""
    manifest = _existing(out, settings)
    if manifest is not None:
        return manifest
    (out / CHUNKS_DIR).mkdir(exist_ok=True)
    manifest = {"format": FORMAT, **settings, "chunks": [], "complete": False}
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def build_store(
    run: str | Path,
    out: str | Path,
    *,
    data: str = "run",
    split: str = "train",
    max_tokens: int = 0,
    index: str = "auto",
    chunk_tokens: int = 65_536,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
) -> dict:
    """Build (or continue building) the datastore of ``run`` over ``split`` of ``data`` (see
    :func:`lmlab.data.dataset.with_source`) in ``out``; ``max_tokens`` > 0 keeps the first
    that many entries. Returns the finished manifest."""
    if split not in ("train", "val"):
        raise ParamError(f"<split>={split!r} is unknown; use train or val", "split")
    if max_tokens < 0:
        raise ParamError(
            f"<max_tokens>={max_tokens} must be >= 0 (0: the whole split)", "max_tokens"
        )
    if chunk_tokens < 1 or batch_size < 1:
        raise ParamError(
            "<chunk_tokens> and <batch_size> must be at least 1", "chunk_tokens", "batch_size"
        )
    require_faiss()
    config, model, tokenizer, checkpoint = load_run_checkpoint(run, device)
    tokens = getattr(prepare_data(with_source(config.data, data), tokenizer)[0], split)
    entries = len(tokens) - 1 if max_tokens == 0 else min(max_tokens, len(tokens) - 1)
    out = Path(out)
    settings = {
        "run": str(Path(run).resolve()),
        "step": checkpoint.step,
        "hidden_size": config.model.d_model,
        "tokenizer": tokenizer_checksum(tokenizer),
        "vocab_size": config.model.vocab_size,
        "data": data,
        "split": split,
        "entries": entries,
        "index": resolve_index_kind(index, entries),
        "seq_len": config.data.seq_len,
    }
    _refuse_foreign(out)
    finished = _existing(out, settings)  # checked before locking too: a refusal touches nothing
    if finished is not None and finished["complete"]:
        return finished
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LmlabError(f"cannot create {out} ({exc.strerror}); give a writable --out") from None
    hold = RunHold(out)  # one build per folder: a second one is refused with the holder's pid
    try:
        manifest = _start_or_resume(out, settings)
        if not manifest["complete"]:
            _add_chunks(
                model, tokens, out, manifest, chunk_tokens, batch_size, device, show_progress
            )
            _finish(out, manifest, show_progress)
    finally:
        hold.release()
    return manifest


def _add_chunks(
    model: LanguageModel,
    tokens: np.ndarray,
    out: Path,
    manifest: dict,
    chunk_tokens: int,
    batch_size: int,
    device: torch.device | str,
    show_progress: bool,
) -> None:
    """Compute and record the chunks that ``manifest`` does not list yet."""
    from tqdm import tqdm  # with FAISS in the memory extra

    seq_len, entries = manifest["seq_len"], manifest["entries"]
    chunk = max(seq_len, chunk_tokens // seq_len * seq_len)
    done = sum(c["entries"] for c in manifest["chunks"])
    started = time.perf_counter()
    with tqdm(
        total=entries,
        initial=done,
        unit="tok",
        unit_scale=True,
        disable=not show_progress,
        desc="keys",
        file=sys.stderr,
    ) as bar:
        while done < entries:
            stop = min(done + chunk, entries)
            keys, values = hidden_states(model, tokens, done, stop, seq_len, batch_size, device)
            keys_path, values_path = _chunk_paths(out, len(manifest["chunks"]))
            save_array(keys_path, keys)
            save_array(values_path, values)
            manifest["chunks"].append({"entries": stop - done})
            elapsed = time.perf_counter() - started
            manifest["key_seconds"] = manifest.get("key_seconds", 0.0) + elapsed
            started = time.perf_counter()
            atomic_write_json(out / MANIFEST, manifest)
            bar.update(stop - done)
            done = stop


def _finish(out: Path, manifest: dict, show_progress: bool) -> None:
    """Train and fill the index from the chunk files, write it and the values, drop the chunks."""
    from tqdm import tqdm

    started = time.perf_counter()
    count, dim = manifest["entries"], manifest["hidden_size"]
    index = new_index(dim, count, manifest["index"])
    chunk_files = [_chunk_paths(out, i) for i in range(len(manifest["chunks"]))]
    if manifest["index"] == "ivfpq":
        index.train(_training_sample(chunk_files, count, ivfpq_params(count, dim)))
    values = []
    for keys_path, values_path in tqdm(
        chunk_files, desc="index", unit="chunk", disable=not show_progress, file=sys.stderr
    ):
        index.add(np.load(keys_path))
        values.append(np.load(values_path))
    save_array(out / VALUES_FILE, np.concatenate(values))
    write_index(index, out / INDEX_FILE)
    manifest.update(
        complete=True,
        index_bytes=(out / INDEX_FILE).stat().st_size,
        index_seconds=time.perf_counter() - started,
        **({"ivfpq": vars(ivfpq_params(count, dim))} if manifest["index"] == "ivfpq" else {}),
    )
    atomic_write_json(out / MANIFEST, manifest)
    shutil.rmtree(out / CHUNKS_DIR, ignore_errors=True)


def _training_sample(chunk_files: list[tuple[Path, Path]], count: int, params: IvfPqParams):
    """A seeded random sample of the keys, read chunk by chunk (memory-mapped)."""
    rng = np.random.default_rng(SAMPLE_SEED)
    chosen = np.sort(rng.choice(count, params.training_size(count), replace=False))
    sample, offset = [], 0
    for keys_path, _ in chunk_files:
        keys = np.load(keys_path, mmap_mode="r")
        inside = chosen[(chosen >= offset) & (chosen < offset + len(keys))] - offset
        sample.append(np.asarray(keys[inside]))
        offset += len(keys)
    return np.concatenate(sample)


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmlabError(
            f"{folder} is not a retrieval store (no {MANIFEST}); build one with lmlab memory build"
        ) from None
    except (ValueError, UnicodeDecodeError):
        raise LmlabError(f"{path} is damaged (not JSON); rebuild the store") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LmlabError(f"{path} is not a format-{FORMAT} retrieval store manifest; rebuild it")
    return manifest


@dataclass
class KnnStore:
    """A finished datastore: the FAISS index of the keys, the values and the manifest."""

    folder: Path
    index: faiss.Index
    values: np.ndarray
    manifest: dict

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def check_model(self, hidden_size: int, tokenizer: Tokenizer, run: str | Path) -> None:
        """Refuse a store whose keys or values cannot belong to this model; warn when it comes
        from another run or step of the same shape (its keys may have drifted)."""
        manifest = self.manifest
        if manifest["hidden_size"] != hidden_size:
            raise LmlabError(
                f"store {self.folder} holds keys of hidden size {manifest['hidden_size']} (run "
                f"{manifest['run']}) but this model's is {hidden_size}; build a store from this "
                "run with lmlab memory build"
            )
        if manifest["tokenizer"] != tokenizer_checksum(tokenizer):
            raise LmlabError(
                f"store {self.folder} was built with another tokenizer (run {manifest['run']}); "
                "its values are other tokens: build a store from this run with lmlab memory build"
            )
        if manifest["run"] != str(Path(run).resolve()):
            print(
                f"warning: store {self.folder} was built from {manifest['run']} "
                f"(step {manifest['step']}), not {run}",
                file=sys.stderr,
            )

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared L2 distances and next-token values ``[N, k]`` of the ``k`` nearest keys of each
        query ``[N, d]``; value -1 (distance inf) where IVF-PQ found fewer than ``k``."""
        if not 1 <= k <= self.size:
            raise ParamError(
                f"<knn_k>={k} must be between 1 and the store's {self.size} entries", "knn_k"
            )
        query = np.ascontiguousarray(queries.detach().float().cpu().numpy())
        distances, ids = self.index.search(query, k)
        found = ids >= 0
        values = np.where(found, self.values[np.where(found, ids, 0)], -1)
        distances = np.where(found, distances, np.inf)
        return torch.from_numpy(distances), torch.from_numpy(values.astype(np.int64))


def open_store(folder: str | Path) -> KnnStore:
    """Load a finished store, refusing a missing, unfinished or damaged one in one line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LmlabError(
            f"retrieval store {folder} does not exist; build it with lmlab memory build"
        )
    manifest = read_manifest(folder)
    if not manifest.get("complete"):
        raise LmlabError(
            f"store {folder} is unfinished; run the same lmlab memory build command to complete it"
        )
    index_path, values_path = folder / INDEX_FILE, folder / VALUES_FILE
    for path in (index_path, values_path):
        if not path.is_file():
            raise LmlabError(f"{path} is missing; rebuild the store with lmlab memory build")
    if index_path.stat().st_size != manifest["index_bytes"]:
        raise LmlabError(
            f"{index_path} has {index_path.stat().st_size} bytes, not the "
            f"{manifest['index_bytes']} written (truncated?); rebuild the store"
        )
    try:
        index = require_faiss().read_index(str(index_path))
    except RuntimeError:
        raise LmlabError(
            f"{index_path} is damaged (FAISS cannot read it); rebuild the store"
        ) from None
    try:
        values = np.load(values_path)
    except (ValueError, OSError, EOFError):
        raise LmlabError(
            f"{values_path} is damaged (not a .npy array); rebuild the store"
        ) from None
    if index.ntotal != manifest["entries"] or values.shape != (manifest["entries"],):
        raise LmlabError(
            f"store {folder} holds {index.ntotal} keys and {values.shape[0]} values, not the "
            f"{manifest['entries']} of its manifest; rebuild it"
        )
    return KnnStore(folder, index, values, manifest)
