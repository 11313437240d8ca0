"""One entry point for every export format: ``ternary`` (``train/export.py``) and ``hf``."""

from __future__ import annotations

from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.interop.hf import export_hf
from lmlab.train.export import FORMATS as TRAIN_FORMATS
from lmlab.train.export import export_run as export_ternary

FORMATS = (*TRAIN_FORMATS, "hf")


def export_run(run: str | Path, out: str | Path, fmt: str = "ternary") -> dict:
    """Export a run's newest valid checkpoint to ``out`` in format ``fmt`` (a file for
    ``ternary``, a folder for ``hf``); returns what was written, with ``format`` added."""
    if fmt not in FORMATS:
        raise LmlabError(f"unknown export format {fmt!r}; use {' or '.join(FORMATS)}")
    result = export_hf(run, out) if fmt == "hf" else export_ternary(run, out, fmt)
    return {"format": fmt, **result}
