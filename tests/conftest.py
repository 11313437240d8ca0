"""Test-session settings.

The suite's models are tiny: one thread per process is faster for them than two (thread
start-up and synchronisation dominate), and it keeps subprocess tests from oversubscribing the
cores. Set before torch is imported so child processes inherit it.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import pytest


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A folder of three small works, enough for a by-work split and a few training steps."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(3):
        lines = [
            f"Line {j} of work {i}: to be or not to be, that is the question." for j in range(300)
        ]
        (folder / f"work{i}.txt").write_text("\n".join(lines), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def arithmetic_base(tmp_path_factory) -> Path:
    """A tiny model pretrained on the shipped arithmetic text, to fine-tune (post-training
    tests)."""
    from run_settings import TINY_RUN

    from lmlab.cli import main
    from lmlab.posttrain.datasets import pretraining_text

    folder = tmp_path_factory.mktemp("arithmetic")
    text = folder / "arith.txt"
    text.write_text(pretraining_text(), encoding="utf-8")
    settings = [
        *TINY_RUN,
        "model.d_model=32",
        "data.seq_len=24",
        "train.eval_interval=1000",
        f"data.path={text}",
        f"out_dir={folder}",
        "train.max_steps=30",
    ]
    assert main(["train", "--quiet", *settings, "name=base"]) == 0
    return folder / "base"
