"""``lmlab prepare``: tokenise a corpus into a shard folder, streaming, in several processes,
resumably.

The source is planned as segments (:mod:`lmlab.data.sources`), packed into units of about
``shard_mb`` of source each. A worker process reads one unit in bounded pieces, encodes them and
streams the ids of each split into the unit's own shard file (``train-00012.bin``,
``val-00012.bin``), then records the unit as done in ``parts/00012.json``. The shards become
visible (renamed from temporary files) before that record, so a run killed at any moment
(Ctrl-C, ``kill -9``) leaves at most temporary files and shards without a record, which the next
run deletes or redoes. A rerun of the same command skips every unit whose record and shards
verify (sizes and SHA-256) and finishes the rest; ``manifest.json``, the only file training
reads, is written last.

The train/validation split is decided while streaming, document by document, without knowing
the corpus: a document goes to validation when a 64-bit BLAKE2b hash of ``seed`` and its name
(``file``, ``file:line``, ``file:row``) falls below ``val_fraction`` of the hash range. The
choice depends on nothing else (not on the order, the other documents or the number of workers),
so every machine and every rerun agrees, and about ``val_fraction`` of the documents go to
validation. A source that is a single text file is one document; it is split by its tail
instead (the last ``val_fraction`` of its bytes, cut at a line start), as ``data.split=tail``.

The tokenizer (``char`` or ``bpe``) is trained on a bounded sample: the first ``sample_mb`` of
training-side text in source order. Characters a char tokenizer did not see in the sample become
its unknown id; their number is reported.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from lmlab.data.corpus import SEPARATOR
from lmlab.data.shards import (
    MANIFEST_FILE,
    SETTINGS_FILE,
    ShardWriter,
    manifest,
    save_tokenizer_atomic,
    shard_problem,
)
from lmlab.data.sources import (
    Segment,
    plan_segments,
    read_segment,
    resolve_source,
    source_files,
)
from lmlab.data.tokenizers import (
    KINDS,
    Tokenizer,
    load_tokenizer,
    tokenizer_checksum,
    tokenizer_from_state,
    tokenizer_state,
    train_tokenizer,
)
from lmlab.errors import LmlabError, ParamError
from lmlab.files import atomic_write_json, fsync_dir

PARTS_DIR = "parts"
LOCK_FILE = ".lock"
ENCODE_CHARS = 1 << 20
"""Text a worker gathers per split before encoding it: bounds a worker's memory."""
READ_BYTES = 1 << 20


def _megabytes(value: float) -> int:
    return max(int(value * (1 << 20)), 1)


def document_side(name: str, val_fraction: float, seed: int) -> str:
    """``val`` or ``train`` for the document called ``name``: a pure function of the name, the
    seed and the fraction, so the split is the same on every machine, rerun and worker count."""
    digest = hashlib.blake2b(f"{seed}\0{name}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "big") < val_fraction * 2**64 else "train"


def _side(segment: Segment, doc: str, val_fraction: float, seed: int) -> str:
    return segment.side or document_side(doc, val_fraction, seed)


@functools.lru_cache(maxsize=2)
def _worker_tokenizer(kind: str, state: str) -> Tokenizer:
    return tokenizer_from_state(kind, state)


@dataclasses.dataclass(frozen=True)
class Job:
    """What a worker needs to encode one unit (plain data: it crosses a process boundary)."""

    index: int
    segments: tuple[Segment, ...]
    out: str
    text_field: str
    tokenizer: tuple[str, str]
    val_fraction: float
    seed: int


def _part_name(index: int) -> str:
    return f"{index:05d}"


def encode_unit(job: Job) -> dict:
    """Encode one unit (a few segments) into its shard files and write its record; returns the
    record."""
    tokenizer = _worker_tokenizer(*job.tokenizer)
    checksum = tokenizer_checksum(tokenizer)
    out = Path(job.out)
    writers: dict[str, ShardWriter] = {}
    pending: dict[str, list[str]] = {"train": [], "val": []}
    sizes = dict.fromkeys(pending, 0)
    documents = dict.fromkeys(pending, 0)
    unknown = 0

    def flush(side: str) -> None:
        nonlocal unknown
        if not pending[side]:
            return
        text = "".join(pending[side])
        ids = tokenizer.encode_array(text)
        unknown += tokenizer.unknown_count(ids)
        if side not in writers:
            name = f"{side}-{_part_name(job.index)}.bin"
            writers[side] = ShardWriter(out, name, tokenizer.dtype)
        writers[side].write(ids, len(text.encode("utf-8")))
        pending[side], sizes[side] = [], 0

    try:
        for segment in job.segments:
            for piece in read_segment(segment, job.text_field, READ_BYTES):
                side = _side(segment, piece.doc, job.val_fraction, job.seed)
                text = piece.text + SEPARATOR if piece.ends else piece.text
                pending[side].append(text)
                sizes[side] += len(text)
                documents[side] += piece.ends
                if sizes[side] >= ENCODE_CHARS:
                    flush(side)
        for side in pending:
            flush(side)
        shards = [writers[side].finish(side, checksum) for side in sorted(writers)]
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    record = {
        "index": job.index,
        "segments": [dataclasses.asdict(segment) for segment in job.segments],
        "size": sum(segment.size for segment in job.segments),
        "shards": shards,
        "documents": documents,
        "unknown": unknown,
    }
    atomic_write_json(out / PARTS_DIR / f"{_part_name(job.index)}.json", record)
    return record


def _sample(
    segments: list[Segment], text_field: str, val_fraction: float, seed: int, limit: int
) -> list[str]:
    """The first ``limit`` characters of training-side text, in source order."""
    texts, total = [], 0
    for segment in segments:
        for piece in read_segment(segment, text_field, READ_BYTES):
            if _side(segment, piece.doc, val_fraction, seed) == "train":
                texts.append(piece.text)
                total += len(piece.text)
                if total >= limit:
                    return texts
    return texts


def _tokenizer_source(path: str) -> Path:
    root = Path(path).expanduser()
    folder = root if (root / "tokenizer_meta.json").is_file() else root / "tokenizer"
    if not folder.is_dir():
        raise ParamError(
            f"<tokenizer_from>={path} holds no tokenizer; give a run or shard folder",
            "tokenizer_from",
        )
    return folder


class _Progress:
    """A one-line progress bar over source bytes: redrawn in place on a terminal, a line every
    few seconds otherwise."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = max(total, 1), enabled
        self.live = sys.stderr.isatty()
        self.start, self.last = time.monotonic(), 0.0

    def update(self, done: int, units: str) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not self.live and now - self.last < 5 and done < self.total:
            return
        self.last = now
        fraction = min(done / self.total, 1.0)
        rate = done / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        eta_text = f"{int(eta) // 60}m{int(eta) % 60:02d}s" if eta < 1e7 else "?"
        bar = "#" * int(fraction * 24)
        text = (
            f"prepare [{bar:<24}] {100 * fraction:5.1f}% | shards {units} | "
            f"{rate / 1e6:.1f} MB/s | ETA {eta_text}"
        )
        sys.stderr.write(("\r\033[K" + text) if self.live else text + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.live:
            sys.stderr.write("\n")


def _check_params(
    tokenizer: str,
    vocab_size: int,
    workers: int,
    val_fraction: float,
    shard_mb: int,
    sample_mb: int,
) -> None:
    if tokenizer not in KINDS:
        raise ParamError(
            f"<tokenizer>={tokenizer!r} is unknown; use {', '.join(KINDS)}", "tokenizer"
        )
    if tokenizer == "bpe" and vocab_size <= 256:
        raise ParamError(
            f"<vocab_size>={vocab_size} is too small for BPE: the 256 byte tokens come first, "
            "so use at least 257 (e.g. 1000)",
            "vocab_size",
        )
    if workers < 1:
        raise ParamError(f"<workers>={workers} must be at least 1", "workers")
    for value, name in ((shard_mb, "shard_mb"), (sample_mb, "sample_mb")):
        if not 0 < value < math.inf:
            raise ParamError(f"<{name}>={value} must be a finite number above 0", name)
    if not 0 < val_fraction < 1:
        raise ParamError(f"<val_fraction>={val_fraction} must be between 0 and 1", "val_fraction")


def _open_out(out: Path, settings: dict) -> bool:
    """Create ``out`` (returns True), or check that it holds an unfinished (or finished) prepare
    of the same command (returns False); anything else there is refused rather than mixed in."""
    settings_path = out / SETTINGS_FILE
    if settings_path.is_file():
        try:
            previous = json.loads(settings_path.read_text(encoding="utf-8"))
        except ValueError:
            previous = {}
        if previous.get("tokenizer") != settings["tokenizer"]:
            raise LmlabError(
                f"{out} holds shards of another tokenizer ({previous.get('tokenizer')}); one "
                "shard folder holds one tokenizer's ids: give a new --out"
            )
        changed = [key for key in settings if previous.get(key) != settings[key]]
        if changed:
            raise LmlabError(
                f"{out} was prepared with other settings or from a source that has changed since "
                f"({', '.join(changed)} differ); give a new --out, or rerun the original command"
            )
        return False
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LmlabError(
            f"--out {out} exists and is not a shard folder being prepared; give a new or empty "
            "folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / PARTS_DIR).mkdir(exist_ok=True)
    atomic_write_json(settings_path, settings)
    return True


def _lock(out: Path):
    lock = (out / LOCK_FILE).open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise LmlabError(f"another lmlab prepare is writing {out}; wait for it to finish") from None
    return lock


def pack(segments: list[Segment], limit: int) -> list[tuple[Segment, ...]]:
    """Consecutive segments grouped into units of about ``limit`` source bytes, so a folder of
    many small files makes a few shards rather than one per file."""
    units: list[list[Segment]] = []
    size = limit
    for segment in segments:
        if size + segment.size > limit and size > 0:
            units.append([])
            size = 0
        units[-1].append(segment)
        size += segment.size
    return [tuple(unit) for unit in units]


def _done(
    out: Path, index: int, unit: tuple[Segment, ...], checksum: str, itemsize: int
) -> dict | None:
    """The record of unit ``index`` if it was finished and its shards are intact."""
    path = out / PARTS_DIR / f"{_part_name(index)}.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record["segments"] != [dataclasses.asdict(segment) for segment in unit]:
            return None
        intact = all(
            entry["tokenizer"] == checksum and shard_problem(out, entry, itemsize) is None
            for entry in record["shards"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if intact else None


def _remove_leftovers(out: Path) -> None:
    """Temporary files of a killed run (never counted: only renamed files are shards)."""
    for path in out.glob(".*.tmp"):
        if path.is_dir():
            for child in path.iterdir():
                child.unlink()
            path.rmdir()
        else:
            path.unlink()


def _source_record(root: Path) -> dict:
    files = [
        {
            "path": "." if f == root else f.relative_to(root).as_posix(),
            "bytes": f.stat().st_size,
            "mtime_ns": f.stat().st_mtime_ns,
        }
        for f in source_files(root)
    ]
    return {"path": str(root.resolve()), "files": files}


@contextlib.contextmanager
def _single_threaded_tokenizers() -> Iterator[None]:
    """``TOKENIZERS_PARALLELISM=false`` while workers are forked, unless the user set it: each
    worker is one process of the parallelism, and ``tokenizers`` otherwise warns on every fork
    after its thread pool was used (BPE training) and turns it off anyway."""
    if "TOKENIZERS_PARALLELISM" in os.environ:
        yield
        return
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        os.environ.pop("TOKENIZERS_PARALLELISM", None)


def _run_jobs(jobs: list[Job], workers: int, on_done: Callable[[dict], None]) -> None:
    """Encode ``jobs`` here (one worker) or in a pool of forked processes. Forked, not spawned:
    a spawned worker imports the caller's main module again (the ``lmlab`` script imports
    torch: seconds and hundreds of MB per worker), while a forked one shares the parent's
    memory; the workers use only numpy and ``tokenizers``, never torch's threads."""
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            on_done(encode_unit(job))
        return
    context = multiprocessing.get_context("fork")
    with _single_threaded_tokenizers():
        pool = concurrent.futures.ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context)
        futures = [pool.submit(encode_unit, job) for job in jobs]
    with pool:
        try:
            for future in concurrent.futures.as_completed(futures):
                on_done(future.result())
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def prepare_shards(
    source: str,
    out: str,
    tokenizer: str = "byte",
    vocab_size: int = 1000,
    tokenizer_from: str | None = None,
    workers: int = 2,
    text_field: str = "text",
    val_fraction: float = 0.1,
    seed: int = 0,
    shard_mb: float = 16.0,
    sample_mb: float = 32.0,
    show_progress: bool = True,
) -> dict:
    """Tokenise ``source`` (anything ``data.path`` reads) into the shard folder ``out``; a rerun
    of the same call resumes. Returns a summary: tokens and bytes per split, shards, segments
    encoded now and skipped as already done, seconds."""
    _check_params(tokenizer, vocab_size, workers, val_fraction, shard_mb, sample_mb)
    root = resolve_source(source)
    segments = plan_segments(root, text_field, _megabytes(shard_mb), tail=val_fraction)
    requested = (
        {"from": str(_tokenizer_source(tokenizer_from).resolve())}
        if tokenizer_from
        else {"kind": tokenizer, **({"vocab_size": vocab_size} if tokenizer == "bpe" else {})}
    )
    settings = {
        "source": _source_record(root),
        "text_field": text_field,
        "val_fraction": val_fraction,
        "seed": seed,
        "shard_mb": shard_mb,
        "sample_mb": sample_mb,
        "tokenizer": requested,
    }
    out_dir = Path(out).expanduser()
    created = _open_out(out_dir, settings)
    try:
        with _lock(out_dir):
            return _prepare(out_dir, segments, settings, tokenizer_from, workers, show_progress)
    except LmlabError:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _prepare(
    out: Path,
    segments: list[Segment],
    settings: dict,
    tokenizer_from: str | None,
    workers: int,
    show_progress: bool,
) -> dict:
    started = time.perf_counter()
    _remove_leftovers(out)
    encoder = _tokenizer(out, segments, settings, tokenizer_from)
    checksum, itemsize = tokenizer_checksum(encoder), encoder.dtype.itemsize
    units = pack(segments, _megabytes(settings["shard_mb"]))
    records: dict[int, dict] = {}
    jobs = []
    for index, unit in enumerate(units):
        record = _done(out, index, unit, checksum, itemsize)
        if record is not None:
            records[index] = record
            continue
        job = Job(index, unit, str(out), settings["text_field"], tokenizer_state(encoder),
                  settings["val_fraction"], settings["seed"])  # fmt: skip
        jobs.append(job)
    skipped = len(records)
    progress = _Progress(sum(s.size for s in segments), show_progress)
    done_bytes = sum(r["size"] for r in records.values())

    def on_done(record: dict) -> None:
        nonlocal done_bytes
        records[record["index"]] = record
        done_bytes += record["size"]
        progress.update(done_bytes, f"{len(records)}/{len(units)}")

    progress.update(done_bytes, f"{len(records)}/{len(units)}")
    try:
        _run_jobs(jobs, workers, on_done)
    finally:
        progress.close()
    summary = _finish(out, encoder, segments, [records[i] for i in range(len(units))], settings)
    return {**summary, "skipped": skipped, "seconds": time.perf_counter() - started}


def _tokenizer(
    out: Path, segments: list[Segment], settings: dict, tokenizer_from: str | None
) -> Tokenizer:
    """The folder's tokenizer: the one saved by an earlier run of this prepare, else the one
    of ``tokenizer_from``, else one trained on the sample (saved before any shard is written)."""
    folder = out / "tokenizer"
    if folder.is_dir():
        return load_tokenizer(folder)
    requested = settings["tokenizer"]
    if tokenizer_from:
        tokenizer = load_tokenizer(_tokenizer_source(tokenizer_from))
    elif requested["kind"] == "byte":
        tokenizer = train_tokenizer("byte", [])
    else:
        limit = _megabytes(settings["sample_mb"])
        texts = _sample(
            segments, settings["text_field"], settings["val_fraction"], settings["seed"], limit
        )
        if not texts:
            raise LmlabError(
                f"{settings['source']['path']} holds no training text to fit a tokenizer on"
            )
        tokenizer = train_tokenizer(requested["kind"], texts, requested.get("vocab_size", 0))
    save_tokenizer_atomic(tokenizer, folder)
    return tokenizer


def _finish(
    out: Path,
    tokenizer: Tokenizer,
    segments: list[Segment],
    ordered: list[dict],
    settings: dict,
) -> dict:
    """Write the manifest from the units' records (in order); the shard folder is then usable."""
    shards = [entry for record in ordered for entry in record["shards"]]
    documents = {
        side: sum(record["documents"][side] for record in ordered) for side in ("train", "val")
    }
    unknown = sum(record["unknown"] for record in ordered)
    info = manifest(
        tokenizer,
        shards,
        source=settings["source"],
        text_field=settings["text_field"],
        split={
            "method": "tail" if any(s.side for s in segments) else "hash",
            "val_fraction": settings["val_fraction"],
            "seed": settings["seed"],
        },
        documents=documents,
        unknown_tokens=unknown,
    )
    for split in ("train", "val"):
        if not info[f"{split}_tokens"]:
            raise LmlabError(
                f"no text of {settings['source']['path']} went to the {split} split "
                f"({sum(documents.values())} documents, val_fraction {settings['val_fraction']}); "
                "give more documents or another --val-fraction"
            )
    atomic_write_json(out / MANIFEST_FILE, info)
    fsync_dir(out)
    return {
        "out": str(out),
        "shards": len(shards),
        "units": len(ordered),
        "train_tokens": info["train_tokens"],
        "val_tokens": info["val_tokens"],
        "train_bytes": info["train_bytes"],
        "val_bytes": info["val_bytes"],
        "documents": documents,
        "unknown_tokens": unknown,
        "tokenizer": f"{tokenizer.kind} ({tokenizer.vocab_size})",
    }
