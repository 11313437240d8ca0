"""A run folder has one writer and never loses data: the lock, plain run names, clear lines for
unwritable folders and a full disk, refused resumes of damaged or edited runs, clean failed
starts, file modes, Ctrl-C outside training, and tokenizers that do not belong to the run."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_RUN, expect_one_error, tiny_run_args, train_losses, write_corpus

from lmlab import files
from lmlab.cli import main
from lmlab.config.load import build_config
from lmlab.data.dataset import prepare_data
from lmlab.data.tokenizers import CharTokenizer
from lmlab.errors import LmlabError
from lmlab.files import atomic_write_text
from lmlab.train.checkpoint import list_checkpoints
from lmlab.train.metrics import MetricsLog, read_metrics
from lmlab.train.run import LOCK_FILE, RunHold
from lmlab.train.trainer import Trainer

TINY = [*TINY_RUN, "model.d_model=16", "model.n_layers=1", "data.seq_len=16", "train.batch_size=2"]
"""Smaller than the shared tiny run: these tests train many runs of a few steps."""


def train_argv(corpus: Path, out: Path, name: str, *extra: str) -> list[str]:
    return tiny_run_args(corpus, out, name, *TINY[len(TINY_RUN) :], *extra)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (tests work on copies)."""
    root = tmp_path_factory.mktemp("trained")
    corpus = write_corpus(root / "text")
    argv = train_argv(corpus, root / "runs", "base", "train.max_steps=4")
    assert main([*argv, "train.checkpoint_interval=2", "train.eval_interval=2"]) == 0
    return root / "runs" / "base"


@pytest.fixture
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "runs" / "run"
    shutil.copytree(trained, copy)
    return copy


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_a_second_writer_is_refused_with_the_holders_pid(run, capsys):
    before = snapshot(run)
    hold = RunHold(run)
    err = expect_one_error(capsys, ["train", "--resume", str(run)], f"pid {os.getpid()}")
    assert "in use" in err
    hold.release()
    assert snapshot(run) == before
    assert main(["train", "--quiet", "--resume", str(run), "train.max_steps=6"]) == 0
    assert list(train_losses(run)) == [1, 2, 3, 4, 5, 6]
    assert not (run / LOCK_FILE).exists()


def test_the_lock_dies_with_its_process(run):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from lmlab.train.run import RunHold\n"
            "hold = RunHold(Path(sys.argv[1])); print('held', flush=True); time.sleep(120)",
            str(run),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(LmlabError, match=f"pid {holder.pid}\\)"):
            RunHold(run)
    finally:
        holder.kill()  # SIGKILL: no chance to unlock or remove the lock file
        holder.wait()
    assert (run / LOCK_FILE).exists()
    RunHold(run).release()


def test_metrics_are_cut_in_place_so_another_handles_rows_survive(tmp_path):
    path = tmp_path / "metrics.jsonl"
    first = MetricsLog(path)
    for step in (1, 2, 3):
        first.write({"kind": "train", "step": step})
    with path.open("a") as file:
        file.write('{"kind": "train", "st')  # a torn row left by a killed process
    second = MetricsLog(path, keep_through_step=2)
    assert [row["step"] for row in read_metrics(path)] == [1, 2]
    first.write({"kind": "train", "step": 4})
    second.write({"kind": "train", "step": 3})
    first.close()
    second.close()
    assert [row["step"] for row in read_metrics(path)] == [1, 2, 4, 3]


# ---------------------------------------------------------------- 2: runs stay inside out_dir


def test_run_names_are_plain_and_foreign_folders_are_never_written(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "text")
    out = tmp_path / "runs"
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "notes.txt").write_text("mine")
    (victim / "sub" / "data.txt").write_text("also mine")
    before = snapshot(victim)
    for name in ("../victim", str(victim), "a/b", ".", ".."):
        expect_one_error(capsys, train_argv(corpus, out, name), "not a plain run name")
    yaml_config = tmp_path / "evil.yaml"
    yaml_config.write_text(f"name: ../victim\nout_dir: {out}\ndata:\n  path: {corpus}\n")
    expect_one_error(capsys, ["train", str(yaml_config), *TINY], "not a plain run name")
    expect_one_error(capsys, train_argv(corpus, tmp_path, "victim"), "is not an lmlab run")
    assert snapshot(victim) == before and sorted(os.listdir(victim)) == ["notes.txt", "sub"]


# ---------------------------------------------------------------- 3: unwritable folders, full disk


def test_an_unusable_out_dir_is_one_line(tmp_path, capsys, monkeypatch):
    corpus = write_corpus(tmp_path / "text")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    expect_one_error(capsys, train_argv(corpus, a_file, "r"), "must be a writable folder")
    expect_one_error(capsys, train_argv(corpus, a_file / "below", "r"), "must be a writable folder")

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(Path, "mkdir", read_only)
    err = expect_one_error(
        capsys, train_argv(corpus, tmp_path / "ro", "r"), "Read-only file system"
    )
    assert "must be a writable folder" in err


class FullDisk:
    """A metrics file handle that writes half of one row, then finds the disk full."""

    def __init__(self, file) -> None:
        self.file = file

    def write(self, data: bytes) -> int:
        self.file.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name: str):
        return getattr(self.file, name)


def test_a_full_disk_while_logging_metrics_is_one_line_and_undone(run, capsys, monkeypatch):
    original_step = Trainer._step

    def fill_disk_at_step_5(trainer: Trainer) -> None:
        if trainer.state.step == 4:
            trainer.metrics._file = FullDisk(trainer.metrics._file)
        original_step(trainer)

    monkeypatch.setattr(Trainer, "_step", fill_disk_at_step_5)
    err = expect_one_error(
        capsys, ["train", "--resume", str(run), "train.max_steps=6"], "no space left on the device"
    )
    assert "metrics.jsonl" in err and "consistent" in err
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert all(line.endswith("\n") and json.loads(line) for line in lines)
    assert list(train_losses(run)) == [1, 2, 3, 4]
    monkeypatch.setattr(Trainer, "_step", original_step)
    assert main(["train", "--quiet", "--resume", str(run), "train.max_steps=6"]) == 0
    assert list(train_losses(run)) == [1, 2, 3, 4, 5, 6]


def test_a_full_disk_while_checkpointing_is_one_line_and_undone(run, capsys, monkeypatch):
    original = files.write_synced

    def full_on_step_6(file, data: bytes) -> None:
        if "step_00000006" in str(file.name):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        original(file, data)

    monkeypatch.setattr(files, "write_synced", full_on_step_6)
    argv = ["train", "--resume", str(run), "train.max_steps=6", "train.checkpoint_interval=2"]
    expect_one_error(capsys, argv, "no space left on the device")
    assert sorted(os.listdir(run / "checkpoints")) == ["step_00000002", "step_00000004"]
    monkeypatch.setattr(files, "write_synced", original)
    assert main(["train", "--quiet", "--resume", str(run), "train.max_steps=6"]) == 0
    assert list_checkpoints(run)[-1].name == "step_00000006"


def test_a_full_disk_in_an_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    atomic_write_text(path, "old")

    def full(file, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files, "write_synced", full)
    with pytest.raises(LmlabError, match="no space left"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["summary.json"]


# ---------------------------------------------------------------- 4: refused resumes


def test_resume_with_only_corrupt_checkpoints_is_an_error_that_changes_nothing(run, capsys):
    for folder in list_checkpoints(run):
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:50])
    before = snapshot(run)
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: every checkpoint in") and "left as it is" in err[-1]
    assert len([line for line in err if line.startswith("checkpoint step_")]) == 2
    assert snapshot(run) == before


def test_resume_refuses_an_edited_config_but_takes_the_documented_overrides(run, capsys):
    config = run / "config.yaml"
    original = config.read_text()
    edited = original.replace("lr: 0.004", "lr: 0.01")
    assert edited != original
    config.write_text(edited)
    err = expect_one_error(capsys, ["train", "--resume", str(run)], "train.lr is 0.01")
    assert "trained with 0.004" in err
    config.write_text(original.replace("eval_batches: 1", "eval_batches: 2"))
    extend = ["train.max_steps=6", "train.threads=1", "train.checkpoint_interval=3"]
    assert main(["train", "--quiet", "--resume", str(run), *extend]) == 0
    assert list(train_losses(run)) == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------- 5: a failed start leaves nothing


def test_a_run_that_fails_before_its_first_result_can_run_again(tmp_path, capsys, monkeypatch):
    corpus = write_corpus(tmp_path / "text")
    argv = train_argv(corpus, tmp_path / "runs", "early", "train.max_steps=2")
    run = tmp_path / "runs" / "early"
    original_step = Trainer._step

    def fail_at_step_1(trainer: Trainer) -> None:
        if trainer.state.step == 1:
            raise LmlabError("loss became nan at step 1")
        original_step(trainer)

    def fail_with_a_callers_file(trainer: Trainer) -> None:
        (run / "caller.log").write_text("a caller's file")
        raise LmlabError("loss became nan at step 0")

    monkeypatch.setattr(Trainer, "_step", fail_with_a_callers_file)
    expect_one_error(capsys, argv, "loss became nan")
    assert os.listdir(run) == ["caller.log"]
    (run / "caller.log").unlink()
    monkeypatch.setattr(Trainer, "_step", fail_at_step_1)
    expect_one_error(capsys, argv, "loss became nan")
    assert not run.exists()
    monkeypatch.setattr(Trainer, "_step", original_step)
    assert main(argv) == 0
    assert list(train_losses(run)) == [1, 2]
    monkeypatch.setattr(Trainer, "_step", fail_at_step_1)
    evaluated = train_argv(corpus, tmp_path / "runs", "evaluated", "train.eval_interval=1")
    expect_one_error(capsys, evaluated, "loss became nan")  # a result (step 1's evaluation) stays
    rows = read_metrics(tmp_path / "runs" / "evaluated" / "metrics.jsonl")
    assert [(row["kind"], row["step"]) for row in rows] == [("train", 1), ("eval", 1)]


# ---------------------------------------------------------------- 6: file modes


def test_files_keep_the_normal_mode_after_a_resume(run):
    old_umask = os.umask(0o022)
    try:
        assert main(["train", "--quiet", "--resume", str(run), "train.max_steps=5"]) == 0
        for name in ("config.yaml", "summary.json", "metrics.jsonl"):
            assert (run / name).stat().st_mode & 0o777 == 0o644, name
        os.umask(0o027)
        atomic_write_text(run / "summary.json", "{}")
        assert (run / "summary.json").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old_umask)


# ---------------------------------------------------------------- 7: Ctrl-C outside training


@pytest.mark.parametrize(
    ("argv", "target"),
    [
        (["generate", "{run}", "--max-new-tokens", "5"], "lmlab.cli.handlers.stream_tokens"),
        (["eval", "{run}", "--batches", "1"], "lmlab.cli.handlers.evaluate"),
    ],
)
def test_ctrl_c_in_generate_and_eval_is_one_line_exit_130(run, capsys, monkeypatch, argv, target):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(target, interrupted)
    before = snapshot(run)
    capsys.readouterr()
    assert main([item.format(run=run) for item in argv]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
    assert snapshot(run) == before


# ---------------------------------------------------------------- 8: tokenizers


def test_a_tokenizer_from_another_run_is_one_line(run, tmp_path, capsys):
    other = tmp_path / "runs" / "other"
    corpus = write_corpus(tmp_path / "other", extra=" jumps over the lazy dog")
    assert main(train_argv(corpus, tmp_path / "runs", "other", "train.max_steps=1")) == 0
    chars = json.loads((run / "tokenizer" / "tokenizer.json").read_text())["chars"]
    shutil.rmtree(run / "tokenizer")
    CharTokenizer("".join(chr(ord("A") + i) for i in range(len(chars)))).save(run / "tokenizer")
    expect_one_error(capsys, ["eval", str(run)], "is not the one step_00000004 was trained with")
    expect_one_error(capsys, ["train", "--resume", str(run)], "(another run's?)")
    shutil.rmtree(run / "tokenizer")
    shutil.copytree(other / "tokenizer", run / "tokenizer")
    err = expect_one_error(capsys, ["generate", str(run)], "another run's tokenizer")
    assert f"model.vocab_size is {len(chars) + 1}" in err


def test_unknown_characters_are_warned_once_with_their_count(run, capsys):
    assert main(["generate", str(run), "--prompt", "ΩtΩ€", "--max-new-tokens", "1"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "3 character(s) of the prompt" in warnings[0]
    text = write_corpus(run.parent / "x", extra="Ω")
    config = build_config(None, [*TINY, f"data.path={text}"])
    chars = {c for work in text.iterdir() for c in work.read_text()} - {"Ω"}
    prepare_data(config.data, CharTokenizer("".join(chars)))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "900 character(s) of the data" in warnings[0]  # 3 x 300 lines
    assert main(["generate", str(run), "--prompt", "to be", "--max-new-tokens", "1"]) == 0
    assert "warning" not in capsys.readouterr().err
