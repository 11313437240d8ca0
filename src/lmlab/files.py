"""Files that are written whole or not at all, for every layer of lmlab.

A reader of a run folder, a shard folder or an index sees either the old content or the new,
never a mix, and a full disk is one line instead of a traceback: each write goes to a hidden
temporary file in the same folder, is fsynced, then renamed over the target (a rename within a
folder is atomic on POSIX), and the folder is fsynced so the rename survives a power cut. It sits
just above ``errors`` so that ``data`` and ``layers`` write files the same way as ``train``.
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from lmlab.errors import LmlabError


def write_synced(file: BinaryIO, data: bytes) -> None:
    file.write(data)
    file.flush()
    os.fsync(file.fileno())


def fsync_dir(path: Path) -> None:
    """Make new entries and renames in ``path`` durable (Windows cannot open a directory)."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def disk_full_is_an_error(path: Path) -> Iterator[None]:
    """Turn a full disk (or quota) while writing ``path`` into one line; the writers undo their
    partial write before this is raised, so what the line promises holds."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise LmlabError(
            f"no space left on the device while writing {path}; the write was undone, so the "
            "files on disk are consistent (as before it): free space, then try again "
            "(lmlab train --resume RUN continues a run from its last checkpoint)"
        ) from None


def new_file_mode() -> int:
    """The mode ``open`` gives a new file under the current umask (mkstemp's is 0600)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` so that readers see the old or the new content, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with disk_full_is_an_error(path), os.fdopen(fd, "wb") as file:
            os.chmod(tmp, new_file_mode())
            write_synced(file, data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Strict JSON (indent 2, sorted keys) that any parser reads: non-finite floats are written as
    the strings ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``, which ``float()`` turns back."""
    atomic_write_bytes(path, json_bytes(finite_json(obj), sort_keys=True))


def json_bytes(obj: Any, sort_keys: bool) -> bytes:
    text = json.dumps(obj, indent=2, sort_keys=sort_keys, allow_nan=False, ensure_ascii=False)
    return (text + "\n").encode("utf-8")


def float_name(value: float) -> str:
    """A non-finite float spelled the way ``float()`` parses it back."""
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def finite_json(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return float_name(obj)
    if isinstance(obj, dict):
        return {key: finite_json(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(value) for value in obj]
    return obj
