"""Documents from the formats corpora ship in: text files, JSON Lines, Parquet, a Hugging Face
``datasets`` folder (``save_to_disk``) and the other local files ``datasets.load_dataset`` reads
(CSV, TSV, JSON, Arrow).

A source is planned as a list of :class:`Segment` s: a byte range of a text or JSONL file, a
range of row groups of a Parquet file, a row range of a saved data set, or one whole file for
``load_dataset``. Each segment is read on its own and in bounded pieces, so a worker process can
encode it without the rest of the corpus, and a corpus larger than memory never loads whole.
Nothing is ever fetched from the Hugging Face hub: a hub name is refused with the way to get
the data onto disk.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lmlab.errors import LmlabError

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
LOAD_DATASET_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".arrow": "arrow"}
"""Suffixes read through ``datasets.load_dataset`` (its packaged builders), one file at a time."""
READABLE_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES + tuple(LOAD_DATASET_BUILDERS)

_TEXT_CUT = re.compile(rb"(?<=[!-~])\n(?=[!-~])")
"""Where a text file may be cut: after a newline between two visible ASCII characters. That is
also where a byte-level BPE pre-token starts without changing the others (see
``tokenizers._BPE_BOUNDARY``), so the pieces encode to exactly the ids of the whole file, and
UTF-8 is never cut inside a character."""
_LINE_CUT = re.compile(rb"\n")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
"""``owner/name``: a Hugging Face hub data set, when no folder ``owner`` exists here."""
_SCAN_BYTES = 1 << 20
ROWS_PER_BATCH = 1024


@dataclass(frozen=True)
class Document:
    """One work or file; the unit that the by-document split never cuts in two."""

    name: str
    text: str


@dataclass(frozen=True)
class Segment:
    """A part of a source that one worker reads alone.

    ``kind`` is ``text``, ``jsonl``, ``parquet``, ``saved`` (a ``save_to_disk`` folder) or
    ``load_dataset``. ``start``/``stop`` are byte offsets (text, JSONL), row-group indices
    (Parquet) or rows (saved); ``first`` numbers the segment's first line (JSONL, from 1) or row
    (Parquet, from 0). ``side`` fixes the split side (``train``/``val``) of a single text that
    is split by its tail; empty means the side is decided per document. ``size`` is the
    segment's approximate size in source bytes (packing and progress)."""

    kind: str
    path: str
    name: str
    start: int = 0
    stop: int = 0
    first: int = 0
    part: str = ""
    side: str = ""
    size: int = 0


@dataclass(frozen=True)
class Piece:
    """Consecutive text of document ``doc``; ``ends`` when it is the document's last piece."""

    doc: str
    text: str
    ends: bool = True


def decode_utf8(raw: bytes, path: Path | str, offset: int = 0) -> str:
    """``raw`` (read at byte ``offset`` of ``path``) as text with Unix newlines and no byte-order
    mark; a one-line error naming the first byte that is not UTF-8."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LmlabError(
            f"{path} is not UTF-8 (byte 0x{raw[e.start]:02x} at offset {offset + e.start}); "
            f"re-encode it, e.g. `iconv -f latin1 -t utf-8 {path} > fixed.txt`"
        ) from None
    if offset == 0:
        text = text.removeprefix("\ufeff")
    return text.replace("\r\n", "\n")


def _datasets():
    """The ``datasets`` package in offline mode: lmlab never downloads a data set."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import datasets
    except ImportError:
        raise LmlabError(
            "reading this data needs the datasets package: pip install 'lmlab[data]'"
        ) from None
    return datasets


def _parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LmlabError("reading Parquet needs pyarrow: pip install 'lmlab[data]'") from None
    return pq


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``Dataset(Dict).save_to_disk``."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def resolve_source(path: str | Path) -> Path:
    """``path`` as an existing local path; a one-line refusal for a hub name or a missing path."""
    text = str(path)
    root = Path(text).expanduser()
    if root.exists():
        return root
    if text.startswith("hf:") or (_HUB_NAME.match(text) and not root.parent.is_dir()):
        name = re.sub(r"^hf:(//)?", "", text)
        raise LmlabError(
            f"data.path {text} does not exist here, and lmlab never downloads data sets: save a "
            f"hub data set first (`datasets.load_dataset('{name}').save_to_disk('DIR')` on a "
            "machine with internet), then set data.path=DIR"
        )
    raise LmlabError(
        f"data.path {root} does not exist; give a text, JSONL or Parquet file, a folder of "
        "them, or a saved datasets folder"
    )


def source_files(root: Path) -> list[Path]:
    """The files a source reads: the file itself, the files of a saved data set, or every
    readable file under a folder (recursively, in path order, hidden folders skipped) so the
    document order, and hence the split, is the same on every machine."""
    if root.is_file():
        return [root]
    if is_saved_dataset(root):
        return sorted(p for p in root.rglob("*") if p.is_file())
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in READABLE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def _next_cut(file: BinaryIO, target: int, high: int, pattern: re.Pattern[bytes]) -> int | None:
    """The offset just after the first match of ``pattern`` that starts at or after
    ``target - 1``, if it is below ``high``."""
    offset = target - 1
    while offset < high - 1:
        file.seek(offset)
        block = file.read(min(_SCAN_BYTES, high - offset) + 1)
        match = pattern.search(block)
        if match is not None:
            found = offset + match.start() + 1
            return found if found < high else None
        if len(block) < 2:
            return None
        offset += len(block) - 1
    return None


def _cuts(path: Path, low: int, high: int, every: int, pattern: re.Pattern[bytes]) -> list[int]:
    """``low``, then the offset where ``pattern`` first allows a cut after each ``every`` bytes,
    then ``high``."""
    cuts = [low]
    with path.open("rb") as file:
        target = low + every
        while target < high:
            found = _next_cut(file, target, high, pattern)
            if found is None:
                break
            cuts.append(found)
            target = found + every
    return [*cuts, high]


def _count_lines(path: Path, start: int, stop: int) -> int:
    with path.open("rb") as file:
        file.seek(start)
        count, left = 0, stop - start
        while left > 0:
            block = file.read(min(_SCAN_BYTES * 16, left))
            if not block:
                break
            count += block.count(b"\n")
            left -= len(block)
    return count


def _ranges(cuts: list[int]) -> list[tuple[int, int]]:
    return [(a, b) for a, b in itertools.pairwise(cuts) if b > a]


def _text_segments(path: Path, name: str, every: int | None, tail: float) -> list[Segment]:
    size = path.stat().st_size
    sides = [("", 0, size)]
    if tail:
        with path.open("rb") as file:
            middle = _next_cut(file, max(int(size * (1 - tail)), 1), size, _TEXT_CUT) or size
        sides = [("train", 0, middle), ("val", middle, size)]
    return [
        Segment("text", str(path), name, a, b, side=side, size=b - a)
        for side, low, high in sides
        for a, b in _ranges(_cuts(path, low, high, every or size or 1, _TEXT_CUT))
    ]


def _jsonl_segments(path: Path, name: str, every: int | None) -> list[Segment]:
    size = path.stat().st_size
    ranges = _ranges(_cuts(path, 0, size, every or size or 1, _LINE_CUT))
    segments, line = [], 1
    for i, (a, b) in enumerate(ranges):
        segments.append(Segment("jsonl", str(path), name, a, b, first=line, size=b - a))
        if i < len(ranges) - 1:
            line += _count_lines(path, a, b)
    return segments


def _missing_column(path: Path | str, field: str, columns: list[str]) -> LmlabError:
    return LmlabError(
        f"{path} has no column {field!r} (its columns: {', '.join(columns) or 'none'}); set "
        "data.text_field to the one holding the text"
    )


def _parquet_segments(path: Path, name: str, every: int | None, field: str) -> list[Segment]:
    try:
        meta = _parquet().ParquetFile(path)
    except (OSError, ValueError) as e:
        raise LmlabError(f"{path} is not a readable Parquet file ({e}); write it again") from None
    if field not in meta.schema_arrow.names:
        raise _missing_column(path, field, meta.schema_arrow.names)
    groups = [meta.metadata.row_group(i) for i in range(meta.metadata.num_row_groups)]
    segments, start, first, rows, size = [], 0, 0, 0, 0
    for i, group in enumerate(groups):
        rows, size = rows + group.num_rows, size + group.total_byte_size
        if i == len(groups) - 1 or (every and size >= every):
            segments.append(Segment("parquet", str(path), name, start, i + 1, first, size=size))
            start, first, rows, size = i + 1, first + rows, 0, 0
    return segments


def _saved_segments(root: Path, name: str, every: int | None, field: str) -> list[Segment]:
    loaded = _datasets().load_from_disk(str(root))
    parts = loaded.items() if hasattr(loaded, "keys") else [("", loaded)]
    segments = []
    for part, dataset in parts:
        if field not in dataset.column_names:
            where = f"{root} (split {part})" if part else root
            raise _missing_column(where, field, dataset.column_names)
        rows = dataset.num_rows
        per_row = max(dataset.data.nbytes // max(rows, 1), 1)
        step = max((every // per_row) if every else rows, 1)
        for a in range(0, rows, step):
            b = min(a + step, rows)
            segments.append(
                Segment("saved", str(root), name, a, b, part=part, size=(b - a) * per_row)
            )
    return segments


def plan_segments(
    path: str | Path, text_field: str = "text", every: int | None = None, tail: float = 0.0
) -> list[Segment]:
    """The segments of the source at ``path``, each about ``every`` source bytes (None: one per
    file or split). ``tail`` > 0 splits a source that is one text file by its tail: the last
    ``tail`` of its bytes (cut at a line start) get ``side='val'``, the rest ``side='train'``."""
    root = resolve_source(path)
    if root.is_dir() and is_saved_dataset(root):
        return _saved_segments(root, root.name, every, text_field)
    segments: list[Segment] = []
    for file in source_files(root):
        name = file.name if file == root else file.relative_to(root).as_posix()
        suffix = file.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            segments += _jsonl_segments(file, name, every)
        elif suffix in PARQUET_SUFFIXES:
            segments += _parquet_segments(file, name, every, text_field)
        elif suffix in LOAD_DATASET_BUILDERS:
            segments.append(Segment("load_dataset", str(file), name, size=file.stat().st_size))
        else:
            segments += _text_segments(file, name, every, tail if file == root else 0.0)
    return segments


def _last_cut(data: bytes) -> int:
    """The offset just after the last :data:`_TEXT_CUT` in ``data``, or 0 if there is none."""
    end = len(data) - 1
    while (newline := data.rfind(b"\n", 1, end)) >= 0:
        if 0x21 <= data[newline + 1] <= 0x7E and 0x21 <= data[newline - 1] <= 0x7E:
            return newline + 1
        end = newline
    return 0


def _text_pieces(segment: Segment, block: int | None) -> Iterator[Piece]:
    """The segment in pieces of about ``block`` bytes, each cut where :data:`_TEXT_CUT` allows
    (a piece grows past ``block`` until there is such a place)."""
    path = Path(segment.path)
    whole_file = segment.start == 0 and segment.stop == path.stat().st_size
    ends_file = segment.stop == path.stat().st_size
    with path.open("rb") as file:
        file.seek(segment.start)
        position, pending, left, first = segment.start, b"", segment.stop - segment.start, True
        while True:
            chunk = file.read(min(block or left, left)) if left else b""
            left -= len(chunk)
            pending += chunk
            done = left == 0 or not chunk
            cut = len(pending)
            if not done:
                cut = _last_cut(pending)
                if not cut:
                    continue
            text = decode_utf8(pending[:cut], path, position)
            position, pending = position + cut, pending[cut:]
            blank = whole_file and first and done and not text.strip()
            if text and not blank:
                yield Piece(segment.name, text, done and ends_file)
            first = False
            if done:
                return


def _json_text(record: object, field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise LmlabError(
            f"{where} is a JSON {type(record).__name__}, not an object; each line must be an "
            f"object with a {field!r} field"
        )
    if field not in record:
        raise LmlabError(
            f"{where} has no field {field!r} (it has: {', '.join(map(str, record)) or 'none'}); "
            "set data.text_field to the field holding the text"
        )
    return _checked_text(record[field], field, where)


def _checked_text(value: object, field: str, where: str) -> str:
    if not isinstance(value, str):
        raise LmlabError(
            f"{where}: field {field!r} holds {type(value).__name__}, not text; set "
            "data.text_field to a text field"
        )
    return value.replace("\r\n", "\n")


def _jsonl_pieces(segment: Segment, field: str) -> Iterator[Piece]:
    path = Path(segment.path)
    with path.open("rb") as file:
        file.seek(segment.start)
        line_number, offset = segment.first, segment.start
        while offset < segment.stop:
            raw = file.readline()
            if not raw:
                break
            where = f"{path}:{line_number}"
            offset += len(raw)
            line_number += 1
            if not raw.strip():
                continue
            try:
                record = json.loads(decode_utf8(raw, where))
            except json.JSONDecodeError as e:
                raise LmlabError(
                    f"{where} is not JSON ({e.msg}, column {e.colno}); each line of a JSONL file "
                    "must be one JSON object"
                ) from None
            text = _json_text(record, field, where)
            if text.strip():
                yield Piece(f"{segment.name}:{line_number - 1}", text)


def _rows(texts: list, segment: Segment, first: int, field: str) -> Iterator[Piece]:
    for i, value in enumerate(texts):
        row = first + i
        where = f"{segment.path} (row {row}{f', split {segment.part}' if segment.part else ''})"
        if value is None:
            raise LmlabError(f"{where} has no text (null {field!r}); drop or fill such rows")
        text = _checked_text(value, field, where)
        if text.strip():
            prefix = f"{segment.part}:" if segment.part else ""
            yield Piece(f"{segment.name}:{prefix}{row}", text)


def _parquet_pieces(segment: Segment, field: str) -> Iterator[Piece]:
    meta = _parquet().ParquetFile(segment.path)
    row = segment.first
    batches = meta.iter_batches(
        batch_size=ROWS_PER_BATCH, row_groups=range(segment.start, segment.stop), columns=[field]
    )
    for batch in batches:
        texts = batch.column(0).to_pylist()
        yield from _rows(texts, segment, row, field)
        row += len(texts)


def _saved_pieces(segment: Segment, field: str) -> Iterator[Piece]:
    loaded = _datasets().load_from_disk(segment.path)
    dataset = loaded[segment.part] if segment.part else loaded
    for a in range(segment.start, segment.stop, ROWS_PER_BATCH):
        b = min(a + ROWS_PER_BATCH, segment.stop)
        yield from _rows(dataset[a:b][field], segment, a, field)


def _load_dataset_pieces(segment: Segment, field: str) -> Iterator[Piece]:
    """Rows of one local file through ``datasets.load_dataset`` in streaming mode, with its
    cache in a temporary folder so nothing is written outside the folders the user named."""
    datasets = _datasets()
    suffix = Path(segment.path).suffix.lower()
    options = {"delimiter": "\t"} if suffix == ".tsv" else {}
    with tempfile.TemporaryDirectory(prefix="lmlab-datasets-") as cache:
        try:
            rows = datasets.load_dataset(
                LOAD_DATASET_BUILDERS[suffix],
                data_files=segment.path,
                split="train",
                streaming=True,
                cache_dir=cache,
                **options,
            )
            for i, record in enumerate(rows):
                if i == 0 and field not in record:
                    raise _missing_column(segment.path, field, list(record))
                yield from _rows([record[field]], segment, i, field)
        except (ValueError, OSError, TypeError) as e:
            raise LmlabError(f"{segment.path} cannot be read by datasets ({e})") from None


def read_segment(
    segment: Segment, text_field: str = "text", block: int | None = None
) -> Iterator[Piece]:
    """The pieces of ``segment`` in order; a text file's are at most about ``block`` bytes
    (None: the whole segment at once)."""
    if segment.kind == "text":
        return _text_pieces(segment, block)
    if segment.kind == "jsonl":
        return _jsonl_pieces(segment, text_field)
    if segment.kind == "parquet":
        return _parquet_pieces(segment, text_field)
    if segment.kind == "saved":
        return _saved_pieces(segment, text_field)
    return _load_dataset_pieces(segment, text_field)


def read_documents(path: str | Path, text_field: str = "text") -> Iterator[Document]:
    """Every non-blank document of the source at ``path``, in source order: a text file is one
    document, a JSONL line or a Parquet/data set row is one."""
    for segment in plan_segments(path, text_field):
        for piece in read_segment(segment, text_field):
            yield Document(piece.doc, piece.text)
