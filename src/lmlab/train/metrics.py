"""Per-step metrics (JSONL) and the live progress line."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from lmlab.errors import LmlabError
from lmlab.files import disk_full_is_an_error


class MetricsLog:
    """Append-only ``metrics.jsonl``; on resume, rows past the checkpoint's step are cut off in
    place so the log reads as one uninterrupted run. The file is never replaced: a rewrite would
    orphan rows that an open handle adds later. With ``tensorboard_dir`` the scalars also go to
    TensorBoard."""

    def __init__(
        self, path: Path, keep_through_step: int = 0, tensorboard_dir: Path | None = None
    ) -> None:
        self.path = path
        self.tensorboard = _tensorboard_writer(tensorboard_dir) if tensorboard_dir else None
        self._file = path.open("ab", buffering=0)
        with disk_full_is_an_error(path):
            self._file.truncate(_end_of_rows_through(path, keep_through_step))

    def write(self, row: dict) -> None:
        data = (json.dumps(row) + "\n").encode("utf-8")
        end = os.fstat(self._file.fileno()).st_size
        try:
            with disk_full_is_an_error(self.path):
                written = 0
                while written < len(data):
                    written += self._file.write(data[written:])
        except BaseException:
            self._file.truncate(end)
            raise
        if self.tensorboard is not None:
            for key, value in _scalars(row):
                self.tensorboard.add_scalar(f"{row['kind']}/{key}", value, row["step"])

    def close(self) -> None:
        self._file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _end_of_rows_through(path: Path, step: int) -> int:
    """Bytes of the leading rows up to ``step``; a torn or foreign line ends them, as it counts
    as infinitely late (rows are in step order, so later ones are past ``step`` too)."""
    end = 0
    for line in path.read_bytes().splitlines(keepends=True):
        if not line.endswith(b"\n") or _row_step(line) > step:
            break
        end += len(line)
    return end


def _tensorboard_writer(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise LmlabError(
            "train.tensorboard=true needs the tensorboard package: "
            "pip install 'lmlab[tensorboard]' (or set train.tensorboard=false)"
        ) from None
    return SummaryWriter(str(directory))


def _scalars(row: dict, prefix: str = ""):
    """Numeric leaves of a metrics row as (dotted name, value) pairs."""
    for key, value in row.items():
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            yield prefix + key, value


def _row_step(line: bytes) -> float:
    """A row's step; a torn or foreign line counts as infinitely late, so it is dropped."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics file, skipping a torn last line left by a killed process."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """One status line (step, loss, tokens/s, ETA), redrawn in place on a terminal and printed
    every few seconds otherwise, so logs of non-interactive runs stay readable."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self._last_print = 0.0
        self._open_line = False

    def update(
        self,
        step: int,
        budget,
        elapsed: float,
        loss: float,
        tokens_per_s: float,
        val_loss: float | None,
    ) -> None:
        if not self.enabled:
            return
        progress = budget.progress(step, elapsed)
        eta = elapsed / progress * (1 - progress) if progress > 0 else math.inf
        total = f"/{budget.steps}" if budget.steps else ""
        val = f" | val {val_loss:.4f}" if val_loss is not None else ""
        text = (
            f"step {step}{total} {100 * min(progress, 1):5.1f}% | loss {loss:.4f}{val} | "
            f"{tokens_per_s / 1000:.1f}k tok/s | ETA {format_duration(eta)}"
        )
        now = time.monotonic()
        if self.live:
            self.stream.write("\r\033[K" + text)
            self._open_line = True
            self.stream.flush()
        elif now - self._last_print >= 5 or progress >= 1:
            self.stream.write(text + "\n")
            self._last_print = now

    def note(self, message: str) -> None:
        """A message on its own line (evaluations), keeping the status line below it."""
        if not self.enabled:
            return
        if self._open_line:
            self.stream.write("\r\033[K")
        self.stream.write(message + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self._open_line:
            self.stream.write("\n")
            self._open_line = False
