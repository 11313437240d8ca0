"""The run registry: one SQLite file listing runs and comparisons with their results.

The run folders stay the source of truth; the registry is an index over them, so writing to it
must never stop training: every write is one transaction with a busy timeout (several
processes may record at once), and a failure is a warning line, not an exception.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmlab.config.load import config_to_dict
from lmlab.config.schema import Config
from lmlab.errors import LmlabError, ParamError

DEFAULT_REGISTRY = Path("runs") / "registry.sqlite"
REGISTRY_ENV = "LMLAB_REGISTRY"
BUSY_TIMEOUT_S = 30.0

RUN_COLUMNS = (
    "path",
    "config_hash",
    "arm",
    "seed",
    "preset",
    "status",
    "final_bpb",
    "tokens",
    "seconds",
    "compare",
    "parent",
    "created",
    "updated",
)
COMPARE_COLUMNS = (
    "name",
    "path",
    "baseline",
    "arms",
    "budget",
    "seeds",
    "verdicts",
    "status",
    "created",
    "updated",
)
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    path TEXT PRIMARY KEY,
    config_hash TEXT,
    arm TEXT,
    seed INTEGER,
    preset TEXT,
    status TEXT,
    final_bpb REAL,
    tokens INTEGER,
    seconds REAL,
    compare TEXT,
    parent TEXT,
    created TEXT,
    updated TEXT
);
CREATE INDEX IF NOT EXISTS runs_compare ON runs (compare);
CREATE TABLE IF NOT EXISTS evals (
    path TEXT,
    task TEXT,
    metric TEXT,
    value REAL,
    step INTEGER,
    created TEXT,
    PRIMARY KEY (path, task, metric)
);
CREATE TABLE IF NOT EXISTS compares (
    name TEXT,
    path TEXT PRIMARY KEY,
    baseline TEXT,
    arms TEXT,
    budget TEXT,
    seeds INTEGER,
    verdicts TEXT,
    status TEXT,
    created TEXT,
    updated TEXT
);
"""

HASH_IGNORED = {
    "name",
    "out_dir",
    "train.seed",
    "train.threads",
    "train.device",
    "train.compile",
    "train.tensorboard",
    "train.checkpoint_interval",
    "train.keep_checkpoints",
}
"""Settings that do not change what a run computes (or, for the seed, that the registry keeps
in its own column), left out of the config hash so runs of one recipe share it."""


def config_hash(config: Config) -> str:
    """A short stable hash of what a run computes, identical for every seed of one recipe."""
    kept = {}
    for section, values in config_to_dict(config).items():
        items = values.items() if isinstance(values, dict) else [("", values)]
        for key, value in items:
            name = f"{section}.{key}" if key else section
            if name not in HASH_IGNORED:
                kept[name] = value
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def registry_path(location: str | Path | None = None) -> Path:
    """The database file: ``location`` (a file, or a folder holding ``registry.sqlite``), else
    ``$LMLAB_REGISTRY``, else ``runs/registry.sqlite``."""
    chosen = Path(location or os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY)
    return chosen / DEFAULT_REGISTRY.name if chosen.is_dir() else chosen


def run_registry(out_dir: str | Path) -> Path:
    """Where a run in ``out_dir`` records itself: ``$LMLAB_REGISTRY`` when set (how compare,
    scale and search share theirs with the runs they start), else ``out_dir/registry.sqlite``,
    which ``lmlab runs`` reads for the default ``out_dir``."""
    return registry_path(os.environ.get(REGISTRY_ENV) or Path(out_dir) / DEFAULT_REGISTRY.name)


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


@contextlib.contextmanager
def _connect(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection whose ``with`` block is one transaction, waiting for other writers."""
    connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S)
    try:
        connection.row_factory = sqlite3.Row
        connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        if not _has_tables(connection):
            connection.executescript(SCHEMA)
        _add_new_columns(connection)
        with connection:
            yield connection
    finally:
        connection.close()


def _has_tables(connection: sqlite3.Connection) -> bool:
    names = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    return {"runs", "compares", "evals"} <= names


def _add_new_columns(connection: sqlite3.Connection) -> None:
    """Give a registry written by an older lmlab the run columns added since (empty there)."""
    have = {row[1] for row in connection.execute("PRAGMA table_info(runs)")}
    for column in RUN_COLUMNS:
        if column not in have:
            try:
                connection.execute(f"ALTER TABLE runs ADD COLUMN {column} TEXT")
            except sqlite3.OperationalError as exc:
                if "duplicate column" not in str(exc):  # another process added it meanwhile
                    raise


def parent_label(config: Config) -> str | None:
    """``folder@step`` of the run a run started from, None for one trained from scratch."""
    return f"{config.parent.run}@{config.parent.step}" if config.parent.run else None


def _upsert(connection: sqlite3.Connection, table: str, row: dict[str, Any]) -> None:
    """Insert ``row`` or update the columns it gives (None leaves a column as it was)."""
    columns = list(row)
    updates = ", ".join(
        f"{c} = COALESCE({table}.{c}, excluded.{c})"
        if c == "created"
        else f"{c} = COALESCE(excluded.{c}, {table}.{c})"
        for c in columns
    )
    connection.execute(
        f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
        f"ON CONFLICT(path) DO UPDATE SET {updates}",
        [row[c] for c in columns],
    )


def _write(path: Path, table: str, rows: list[dict[str, Any]]) -> bool:
    """Upsert ``rows`` in one transaction; on any failure print a warning and return False."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _connect(path) as connection:
            for row in rows:
                _upsert(connection, table, {**row, "updated": _now()})
        return True
    except (sqlite3.Error, OSError) as exc:
        print(f"warning: run registry {path} not updated ({exc})", file=sys.stderr)
        return False


def run_row(
    run_dir: str | Path,
    *,
    status: str,
    config: Config | None = None,
    summary: dict | None = None,
    arm: str | None = None,
    seed: int | None = None,
    preset: str | None = None,
    compare: str | None = None,
) -> dict[str, Any]:
    """A registry row for one run folder; fields left None keep what the registry holds."""
    summary = summary or {}
    return {
        "path": str(Path(run_dir).resolve()),
        "config_hash": config_hash(config) if config is not None else None,
        "arm": arm,
        "seed": seed if seed is not None else (config.train.seed if config else None),
        "preset": preset,
        "status": status,
        "final_bpb": summary.get("val_bits_per_byte"),
        "tokens": summary.get("tokens"),
        "seconds": summary.get("train_seconds"),
        "compare": compare,
        "parent": parent_label(config) if config is not None else None,
        "created": _now(),
    }


def record_runs(rows: list[dict[str, Any]], location: str | Path | None = None) -> bool:
    """Record runs (rows from :func:`run_row`); never raises, warns instead."""
    return _write(registry_path(location), "runs", rows)


@contextlib.contextmanager
def recording(
    run_dir: str | Path, location: str | Path | None, config: Config, **fields: Any
) -> Iterator[dict]:
    """Record a run as ``running`` while the block runs, then as ``finished``, ``interrupted``
    (KeyboardInterrupt) or ``failed`` however it ends, with the summary the block puts in the
    yielded dict under ``summary``; ``fields`` as :func:`run_row`."""
    result: dict = {}
    record_runs([run_row(run_dir, status="running", config=config, **fields)], location)
    status = "failed"
    try:
        yield result
        status = "finished"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        row = run_row(
            run_dir, status=status, config=config, summary=result.get("summary"), **fields
        )
        record_runs([row], location)


def record_evals(
    run_dir: str | Path,
    scores: dict[str, dict[str, float]],
    step: int,
    location: str | Path | None = None,
) -> bool:
    """Record a run's benchmark scores (task -> metric -> value, e.g. from lm-eval), replacing
    earlier values of the same task and metric; never raises, warns instead."""
    path = registry_path(location)
    run = str(Path(run_dir).resolve())
    rows = [
        (run, task, metric, value, step, _now())
        for task, metrics in scores.items()
        for metric, value in metrics.items()
    ]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _connect(path) as connection:
            connection.executemany(
                "INSERT INTO evals (path, task, metric, value, step, created) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(path, task, metric) DO UPDATE SET "
                "value = excluded.value, step = excluded.step, created = excluded.created",
                rows,
            )
        return True
    except (sqlite3.Error, OSError) as exc:
        print(f"warning: run registry {path} not updated ({exc})", file=sys.stderr)
        return False


def read_evals(location: str | Path | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """Every recorded benchmark score: run path -> task -> metric -> value."""
    path = _open_for_reading(location)
    found: dict[str, dict[str, dict[str, float]]] = {}
    try:
        with _connect(path) as connection:
            for row in connection.execute("SELECT path, task, metric, value FROM evals"):
                found.setdefault(row[0], {}).setdefault(row[1], {})[row[2]] = row[3]
    except sqlite3.Error as exc:
        raise LmlabError(f"cannot read the run registry {path} ({exc})") from None
    return found


def record_compare(
    name: str,
    path: str | Path,
    *,
    baseline: str,
    arms: list[str],
    budget: str,
    seeds: int,
    verdicts: dict[str, str],
    status: str,
    location: str | Path | None = None,
) -> bool:
    """Record a comparison and its verdicts (candidate -> decision); never raises."""
    row = {
        "name": name,
        "path": str(Path(path).resolve()),
        "baseline": baseline,
        "arms": json.dumps(arms),
        "budget": budget,
        "seeds": seeds,
        "verdicts": json.dumps(verdicts),
        "status": status,
        "created": _now(),
    }
    return _write(registry_path(location), "compares", [row])


def _open_for_reading(location: str | Path | None) -> Path:
    if location is not None and not Path(location).exists():
        raise LmlabError(
            f"run folder {location} does not exist; give a runs folder holding registry.sqlite "
            "or the database file"
        )
    path = registry_path(location)
    if not path.is_file():
        raise LmlabError(
            f"no run registry at {path}; lmlab compare records runs there (or set ${REGISTRY_ENV})"
        )
    return path


def _parse_filter(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ParamError(
            f"<filters> {text!r} must look like key=value, e.g. arm=baseline", "filters"
        )
    key, value = (part.strip() for part in text.split("=", 1))
    if key not in RUN_COLUMNS:
        raise ParamError(
            f"<filters> key {key!r} is unknown; use one of {', '.join(RUN_COLUMNS)}", "filters"
        )
    return key, value


def list_runs(
    location: str | Path | None = None,
    filters: list[str] | tuple[str, ...] = (),
    compare: str | None = None,
) -> tuple[list[dict], dict | None]:
    """Runs matching every ``key=value`` filter (``*`` and ``?`` are wildcards), newest first,
    and the comparison named ``compare`` (by name or folder) when one is asked for."""
    path = _open_for_reading(location)
    where, values = [], []
    for key, value in map(_parse_filter, filters):
        where.append(f"CAST({key} AS TEXT) {'GLOB' if any(c in value for c in '*?') else '='} ?")
        values.append(value)
    try:
        with _connect(path) as connection:
            found = None
            if compare is not None:
                match = connection.execute(
                    "SELECT * FROM compares WHERE name = ? OR path = ? ORDER BY updated DESC",
                    (compare, str(Path(compare).resolve())),
                ).fetchone()
                if match is None:
                    names = [r[0] for r in connection.execute("SELECT name FROM compares")]
                    raise LmlabError(
                        f"no comparison named {compare!r} in {path}; known: "
                        f"{', '.join(names) or 'none'}"
                    )
                found = dict(match)
                found["arms"] = json.loads(found["arms"])
                found["verdicts"] = json.loads(found["verdicts"])
                where.append("compare = ?")
                values.append(found["path"])
            clause = f" WHERE {' AND '.join(where)}" if where else ""
            rows = connection.execute(
                f"SELECT * FROM runs{clause} ORDER BY created DESC, arm, seed", values
            ).fetchall()
    except sqlite3.Error as exc:
        raise LmlabError(f"cannot read the run registry {path} ({exc})") from None
    return [dict(row) for row in rows], found


def _short_parent(parent: str | None) -> str:
    """A parent as ``name@step`` (its full folder is in ``--json``)."""
    return Path(parent).name if parent else ""


def format_runs(rows: list[dict], compare: dict | None = None) -> str:
    """A plain-text table of registry rows (a comparison's verdicts first when given); a run
    whose folder has since been deleted is marked so."""
    lines = []
    if compare is not None:
        verdicts = ", ".join(f"{arm}: {decision}" for arm, decision in compare["verdicts"].items())
        lines.append(
            f"compare {compare['name']} ({compare['path']}): baseline {compare['baseline']}, "
            f"budget {compare['budget']}, {compare['seeds']} seeds, {compare['status']}; "
            f"{verdicts or 'no verdicts'}"
        )
    header = (
        "created",
        "compare",
        "arm",
        "seed",
        "status",
        "final bpb",
        "tokens",
        "s",
        "path",
        "parent",
    )
    table = [header]
    for row in rows:
        status = row["status"] or ""
        if not Path(row["path"]).exists():
            status += " (folder missing)"
        table.append(
            (
                row["created"] or "",
                Path(row["compare"]).name if row["compare"] else "",
                row["arm"] or "",
                "" if row["seed"] is None else str(row["seed"]),
                status,
                "" if row["final_bpb"] is None else f"{row['final_bpb']:.4f}",
                "" if row["tokens"] is None else str(row["tokens"]),
                "" if row["seconds"] is None else f"{row['seconds']:.1f}",
                row["path"],
                _short_parent(row["parent"]),
            )
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        lines.append("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    if not rows:
        lines.append("(no runs match)")
    return "\n".join(lines)
