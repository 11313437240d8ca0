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
