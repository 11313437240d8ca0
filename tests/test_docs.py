"""The documentation stays true to the code: every ``lmlab`` command in a fenced block of
README.md and docs/ parses, names existing presets and valid config keys, and every parameter
count quoted for a preset is the one its model has."""

from __future__ import annotations

import functools
import re
import shlex
from pathlib import Path

import pytest

from lmlab.cli import build_parser, parse_args
from lmlab.cli.options import DEFAULT_PRESET
from lmlab.config.load import build_config, preset_names
from lmlab.data.dataset import fit_vocab, prepare_data
from lmlab.model.lm import LanguageModel

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
FIGURE = r"\d{1,3}(?:,\d{3}){2,}"


def doc_commands() -> list[tuple[str, str]]:
    """(file, command) for every ``lmlab`` command of a fenced block, continuations joined,
    comments dropped and ``a && b`` split."""
    found = []
    for path in DOCS:
        for block in FENCE.findall(path.read_text(encoding="utf-8")):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#.*$", "", line.strip())
                for command in re.split(r"\s*(?:&&|;|\|\|)\s*", line):
                    if command.startswith("lmlab "):
                        found.append((path.relative_to(ROOT).as_posix(), command))
    return found


def synopsis_free(words: list[str]) -> list[str]:
    """A synopsis line as a command: ``[--vocab 8192]`` and ``[C.yaml ...]`` lose their
    brackets, ellipses and the key=value placeholder (upper-case ones such as RUN stay)."""
    return [w.strip("[]") for w in words if w.strip("[]") not in ("...", "", "key=value")]


def test_the_docs_hold_commands():
    assert len(doc_commands()) > 20


@pytest.mark.parametrize(("doc", "command"), doc_commands(), ids=lambda v: str(v)[:60])
def test_every_documented_command_parses(doc, command):
    argv = synopsis_free(shlex.split(command)[1:])
    args = parse_args(build_parser(), argv)
    presets = set(preset_names())
    configs = [c for c in getattr(args, "configs", []) if not c.isupper()]
    preset = getattr(args, "preset", None)
    for config in [*configs, *([preset] if preset else [])]:
        stem = Path(config).stem
        assert (
            config in presets or config.endswith((".yaml", ".yml")) or config.startswith("runs/")
        ), f"{doc}: {config!r} is neither a preset nor a YAML file"
        assert stem not in presets or config in presets or Path(config).exists(), (
            f"{doc}: {config} does not exist; use the preset name {stem}"
        )
    if args.command in ("train", "info", "compare", "scale", "probe") and not getattr(
        args, "resume", None
    ):
        base = next((c for c in [preset, *configs] if c in presets), DEFAULT_PRESET)
        if args.command != "probe" or args.task != "loss_by_position":
            build_config(base, [*args.overrides, *getattr(args, "variants", [])])


@functools.cache
def preset_parameters(name: str) -> int:
    config = build_config(name, [])
    fit_vocab(config, prepare_data(config.data, None)[1])
    return LanguageModel(config.model).num_parameters()


def quoted_figures(text: str) -> list[int]:
    """Parameter counts in a page: ``N parameters``, the cells of a ``| parameters |`` row and
    the first column of a table headed ``| parameters |``."""
    figures = re.findall(rf"({FIGURE})\s+parameters", text)
    in_table = False
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if "|" in line else []
        if cells and cells[0] == "parameters":
            in_table = len(cells) > 1 and cells[1] == "steps"
            figures += [] if in_table else re.findall(FIGURE, line)
        elif in_table and cells and re.fullmatch(FIGURE, cells[0]):
            figures.append(cells[0])
        elif not cells or not cells[0].startswith("---"):
            in_table = in_table and bool(cells)
    return [int(f.replace(",", "")) for f in figures]


@pytest.mark.parametrize("name", preset_names())
def test_preset_pages_quote_the_real_parameter_count(name):
    text = (ROOT / "docs" / "presets" / f"{name}.md").read_text(encoding="utf-8")
    figures = quoted_figures(text)
    assert figures, f"docs/presets/{name}.md quotes no parameter count"
    assert set(figures) == {preset_parameters(name)}


def test_readme_table_quotes_the_real_parameter_counts():
    rows = re.findall(
        rf"^\s*\| \[`([\w-]+)`\]\(docs/presets/[\w-]+\.md\) \|.*\| ({FIGURE}) \|$",
        (ROOT / "README.md").read_text(encoding="utf-8"),
        re.MULTILINE,
    )
    assert {name for name, _ in rows} == set(preset_names())
    for name, figure in rows:
        assert int(figure.replace(",", "")) == preset_parameters(name), name
