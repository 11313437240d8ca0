"""Every benchmark script imports: they run by hand (too long for the suite), so a renamed or
moved library name would otherwise break one unseen until someone measures with it."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("script", sorted(p.stem for p in BENCHMARKS.glob("*.py")))
def test_the_benchmark_script_imports(script, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as `python benchmarks/<script>.py` has it
    module = importlib.import_module(script)
    assert module.__file__ == str(BENCHMARKS / f"{script}.py")
