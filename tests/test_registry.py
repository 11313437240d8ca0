"""The SQLite run registry: upserts, filters, concurrent writers, never-fatal writes, and the
``lmlab runs`` command."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import pytest
from conftest import TINY_RUN

from lmlab.cli import main
from lmlab.config.load import build_config
from lmlab.errors import LmlabError
from lmlab.train import registry
from lmlab.train.run import open_run


def make_row(tmp_path: Path, name: str, **fields) -> dict:
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    config = build_config("gpt-tiny", [f"train.seed={fields.pop('seed', 0)}"])
    return registry.run_row(folder, config=config, **{"status": "finished", **fields})


@pytest.fixture
def db(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "reg" / "registry.sqlite"
    monkeypatch.setenv(registry.REGISTRY_ENV, str(path))
    return path


def test_config_hash_ignores_seed_and_bookkeeping_only():
    base = build_config("gpt-tiny")
    same = build_config("gpt-tiny", ["train.seed=3", "train.threads=1", "name=x", "out_dir=y"])
    other = build_config("gpt-tiny", ["train.lr=1e-3"])
    assert registry.config_hash(base) == registry.config_hash(same)
    assert registry.config_hash(base) != registry.config_hash(other)


def test_record_list_and_filter(tmp_path, db):
    summary = {"val_bits_per_byte": 2.5, "tokens": 1000, "train_seconds": 3.0}
    rows = [
        make_row(tmp_path, "a0", arm="a", seed=0, summary=summary, compare=str(tmp_path / "c")),
        make_row(tmp_path, "a1", arm="a", seed=1, status="failed"),
        make_row(tmp_path, "b0", arm="b-wide", seed=0, summary=summary),
    ]
    assert registry.record_runs(rows)
    assert db.is_file()
    listed, compare = registry.list_runs()
    assert compare is None and len(listed) == 3
    first = next(r for r in listed if r["path"].endswith("a0"))
    assert first["final_bpb"] == 2.5 and first["tokens"] == 1000 and first["seconds"] == 3.0
    assert first["config_hash"] == rows[0]["config_hash"] and first["seed"] == 0
    assert {r["arm"] for r in registry.list_runs(filters=["status=finished"])[0]} == {"a", "b-wide"}
    assert [r["seed"] for r in registry.list_runs(filters=["arm=a", "seed=1"])[0]] == [1]
    assert [r["arm"] for r in registry.list_runs(filters=["arm=b*"])[0]] == ["b-wide"]
    with pytest.raises(LmlabError, match=r"^filters key 'colour' is unknown"):
        registry.list_runs(filters=["colour=red"])
    with pytest.raises(LmlabError, match="must look like key=value"):
        registry.list_runs(filters=["arm"])


def test_upsert_keeps_created_and_fields_not_given(tmp_path, db):
    row = make_row(tmp_path, "r", arm="a", preset="gpt-tiny", status="running")
    row["created"] = "2020-01-01 00:00:00"
    registry.record_runs([row])
    update = registry.run_row(tmp_path / "r", status="finished", summary={"val_bits_per_byte": 1.5})
    registry.record_runs([update])
    (listed,) = registry.list_runs()[0]
    assert listed["status"] == "finished" and listed["final_bpb"] == 1.5
    assert listed["arm"] == "a" and listed["preset"] == "gpt-tiny"
    assert listed["created"] == "2020-01-01 00:00:00"


def test_compare_record_and_lookup(tmp_path, db):
    compare_dir = tmp_path / "cmp"
    compare_dir.mkdir()
    registry.record_runs(
        [
            make_row(tmp_path, "x", arm="a", compare=str(compare_dir.resolve())),
            make_row(tmp_path, "y", arm="a"),
        ]
    )
    registry.record_compare(
        "cmp",
        compare_dir,
        baseline="a",
        arms=["a", "b"],
        budget="tokens=1M",
        seeds=3,
        verdicts={"b": "PROMOTE"},
        status="finished",
    )
    rows, compare = registry.list_runs(compare="cmp")
    assert [Path(r["path"]).name for r in rows] == ["x"]
    assert compare["verdicts"] == {"b": "PROMOTE"} and compare["arms"] == ["a", "b"]
    with pytest.raises(LmlabError, match=r"no comparison named 'other'.*known: cmp"):
        registry.list_runs(compare="other")


def test_concurrent_writers_all_land(tmp_path, db):
    rows = [make_row(tmp_path, f"r{i}", arm="a", seed=i) for i in range(24)]
    threads = [threading.Thread(target=registry.record_runs, args=([row],)) for row in rows]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(registry.list_runs()[0]) == 24


def test_write_failures_are_warnings_not_errors(tmp_path, db, capsys, monkeypatch):
    registry.record_runs([make_row(tmp_path, "r")])
    monkeypatch.setattr(registry, "BUSY_TIMEOUT_S", 0.2)
    locker = sqlite3.connect(db)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        assert registry.record_runs([make_row(tmp_path, "s")]) is False
    finally:
        locker.rollback()
        locker.close()
    assert "warning: run registry" in capsys.readouterr().err
    not_a_db = tmp_path / "junk.sqlite"
    not_a_db.write_bytes(b"this is not sqlite" * 100)
    assert registry.record_runs([make_row(tmp_path, "t")], not_a_db) is False
    blocked = tmp_path / "file"
    blocked.write_text("x")
    assert (
        registry.record_compare(
            "c",
            tmp_path,
            baseline="a",
            arms=["a"],
            budget="tokens=1",
            seeds=1,
            verdicts={},
            status="finished",
            location=blocked / "sub" / "registry.sqlite",
        )
        is False
    )
    assert capsys.readouterr().err.count("warning: run registry") == 2


def test_runs_command(tmp_path, db, capsys):
    registry.record_runs(
        [make_row(tmp_path, "kept", arm="a", seed=0), make_row(tmp_path, "gone", arm="b", seed=1)]
    )
    (tmp_path / "gone").rmdir()
    capsys.readouterr()
    assert main(["runs"]) == 0
    out = capsys.readouterr().out
    assert "kept" in out and "finished (folder missing)" in out
    assert main(["runs", str(db.parent), "--filter", "arm=a", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["runs"]
    assert [Path(r["path"]).name for r in listed] == ["kept"]
    for argv, fragment in [
        (["runs", str(tmp_path / "nowhere")], "does not exist"),
        (["runs", str(tmp_path)], "no run registry at"),
        (["runs", "--filter", "nope=1"], "is unknown"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert fragment in err and len(err.splitlines()) == 1 and err.startswith("error: ")


def test_lmlab_train_records_its_run_and_lmlab_runs_lists_it(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.delenv(registry.REGISTRY_ENV, raising=False)
    runs = tmp_path / "runs"
    settings = [*TINY_RUN, f"data.path={corpus}", "train.max_steps=2", "train.max_time=0"]
    assert main(["train", "--quiet", *settings, f"out_dir={runs}", "name=r"]) == 0
    summary = json.loads((runs / "r" / "summary.json").read_text())
    capsys.readouterr()
    assert main(["runs", str(runs), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["runs"]
    assert row["path"] == str((runs / "r").resolve()) and row["status"] == "finished"
    assert row["final_bpb"] == summary["val_bits_per_byte"]
    assert row["tokens"] == 2 * 4 * 32  # steps x rows x length
    _, config = open_run(runs / "r")  # the tokenizer's vocabulary filled in
    assert row["config_hash"] == registry.config_hash(config) and row["seed"] == 0
    assert main(["runs", str(runs)]) == 0
    assert f"finished  {summary['val_bits_per_byte']:.4f}" in capsys.readouterr().out


def test_a_runs_own_record_keeps_what_a_comparison_recorded(tmp_path, db):
    config = build_config("gpt-tiny", ["train.seed=3"])
    registry.record_runs([make_row(tmp_path, "r", arm="a", seed=3, preset="p", compare="c")])
    with pytest.raises(KeyboardInterrupt), registry.recording(tmp_path / "r", None, config):
        (running,) = registry.list_runs()[0]
        assert running["status"] == "running"
        raise KeyboardInterrupt
    (row,) = registry.list_runs()[0]
    kept = (row["arm"], row["seed"], row["preset"], row["compare"])
    assert row["status"] == "interrupted" and kept == ("a", 3, "p", "c")
    with pytest.raises(RuntimeError), registry.recording(tmp_path / "r", None, config):
        raise RuntimeError("boom")
    assert registry.list_runs()[0][0]["status"] == "failed"
    with registry.recording(tmp_path / "r", None, config) as record:
        record["summary"] = {"val_bits_per_byte": 1.25, "tokens": 7}
    (row,) = registry.list_runs()[0]
    assert (row["status"], row["final_bpb"], row["tokens"]) == ("finished", 1.25, 7)
    assert (row["arm"], row["compare"]) == ("a", "c")
