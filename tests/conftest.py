"""Test-session settings, and what many tests share: the tiny-run settings, the corpus fixture
and the metrics reader (import them with ``from conftest import ...``).

The suite's models are tiny: one thread per process is faster for them than two (thread
start-up and synchronisation dominate), and it keeps subprocess tests from oversubscribing the
cores. Set before torch is imported so child processes inherit it.
"""

import contextlib
import os
import signal

os.environ.setdefault("OMP_NUM_THREADS", "1")

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from lmlab.train.metrics import read_metrics

TINY_RUN = [
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "data.seq_len=32",
    "train.batch_size=4",
    "train.max_time=0",
    "train.eval_batches=2",
    "train.warmup_steps=2",
    "train.threads=1",
    "train.precision=fp32",
]
"""Overrides that make any preset a tiny run of a few milliseconds a step, the same on every
CPU (float32, one thread); a test adds the settings it is about."""


TINY_GRID = [*TINY_RUN, "model.n_layers=1", "train.batch_size=8", "train.optimizer=adamw"]
"""The tiny run for experiments that train many runs (scale, search): one layer, batches of 8
(their token budgets are counted in these steps)."""


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Normwise relative error of ``actual`` against the reference ``expected``, in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest elementwise error over the reference's largest magnitude, in float64."""
    expected = expected.double()
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def tiny_run_args(corpus: Path, out: Path, name: str, *extra: str) -> list[str]:
    """``lmlab train`` arguments for a tiny run on ``corpus`` in ``out/name``."""
    return [
        "train",
        "--quiet",
        *TINY_RUN,
        f"data.path={corpus}",
        f"out_dir={out}",
        f"name={name}",
        *extra,
    ]


def metrics_rows(run: Path, kind: str | None = "train") -> list[dict]:
    """The rows of ``run``'s metrics.jsonl of one ``kind`` (train, eval), or all with None."""
    return [row for row in read_metrics(run / "metrics.jsonl") if kind in (None, row["kind"])]


def train_losses(run: Path) -> dict[int, float]:
    """Training loss by step: two runs that match here took the same steps."""
    return {row["step"]: row["loss"] for row in metrics_rows(run)}


@contextlib.contextmanager
def ctrl_c_in_step(step: int) -> Iterator[None]:
    """Meanwhile, a Ctrl-C (SIGINT to this process) arrives while a trainer runs step ``step``:
    as for a user's, the trainer finishes and saves that step, then stops (exit code 130)."""
    from lmlab.train.trainer import Trainer

    original = Trainer._step

    def interrupted(trainer: Trainer) -> None:
        if trainer.state.step + 1 == step:
            os.kill(os.getpid(), signal.SIGINT)
        original(trainer)

    Trainer._step = interrupted
    try:
        yield
    finally:
        Trainer._step = original


def expect_one_error(capsys: pytest.CaptureFixture, argv: list[str], fragment: str) -> str:
    """``lmlab argv`` fails as a user error: exit 2, and stderr ends with one ``error:`` line
    naming ``fragment``, with no traceback (what a command printed while it worked, such as a
    run's header or a warning, may come before it); returns that line."""
    from lmlab.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and fragment in lines[-1], lines
    assert not any(line.startswith(("error: ", "Traceback")) for line in lines[:-1]), lines
    return lines[-1]


def write_corpus(folder: Path, extra: str = "") -> Path:
    """Three small works in ``folder`` (``extra`` ends every line: another character set),
    enough for a by-work split and a few training steps."""
    folder.mkdir(parents=True)
    for i in range(3):
        lines = [
            f"Line {j} of work {i}: to be or not to be, that is the question{extra}."
            for j in range(300)
        ]
        (folder / f"work{i}.txt").write_text("\n".join(lines), encoding="utf-8")
    return folder


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return write_corpus(tmp_path / "corpus")


@pytest.fixture(scope="session")
def arithmetic_base(tmp_path_factory) -> Path:
    """A tiny model pretrained on the shipped arithmetic text, to fine-tune (post-training
    tests)."""
    from lmlab.cli import main
    from lmlab.posttrain.datasets import pretraining_text

    folder = tmp_path_factory.mktemp("arithmetic")
    text = folder / "arith.txt"
    text.write_text(pretraining_text(), encoding="utf-8")
    settings = [
        *TINY_GRID,
        "model.d_model=32",
        "data.seq_len=24",
        "train.eval_interval=1000",
        f"data.path={text}",
        f"out_dir={folder}",
        "train.max_steps=30",
    ]
    assert main(["train", "--quiet", *settings, "name=base"]) == 0
    return folder / "base"
