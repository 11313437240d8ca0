"""Build a :class:`Config` from a preset or YAML file plus ``key=value`` overrides.

Every key is checked against the dataclasses, so a typo is a one-line error that names the
closest valid key instead of a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lmlab.config.schema import Config, coerce_value
from lmlab.errors import LmlabError


def preset_names() -> list[str]:
    """Names of the YAML presets shipped in the package."""
    folder = resources.files("lmlab.config") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_description(name: str) -> str:
    """The first sentence of a preset's leading comment (what ``lmlab presets`` shows)."""
    text = (resources.files("lmlab.config") / "presets" / f"{name}.yaml").read_text("utf-8")
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").strip())
    comment = " ".join(lines)
    end = comment.find(". ")
    return comment if end < 0 else comment[: end + 1]


def _read_yaml(text: str, where: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        at = f" at line {line + 1}" if line is not None else ""
        raise LmlabError(f"{where} is not valid YAML{at}; fix its syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LmlabError(f"{where} must hold a mapping of settings, not {type(data).__name__}")
    return data


def read_source(source: str) -> dict:
    """The settings of a preset name or a YAML file path, as a nested dict."""
    path = Path(source)
    if source.endswith((".yaml", ".yml")) or path.exists():
        if not path.is_file():
            raise LmlabError(f"config file {source} does not exist; give a YAML path or a preset")
        return _read_yaml(path.read_text(encoding="utf-8"), str(path))
    if source not in preset_names():
        close = difflib.get_close_matches(source, preset_names(), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise LmlabError(f"unknown preset {source!r}; {hint}presets: {', '.join(preset_names())}")
    text = (resources.files("lmlab.config") / "presets" / f"{source}.yaml").read_text("utf-8")
    return _read_yaml(text, f"preset {source}")


def _suggest(key: str, valid: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if close:
        return f"unknown config key {prefix}{key}; did you mean {prefix}{close[0]}?"
    return f"unknown config key {prefix}{key}; valid keys: {', '.join(prefix + v for v in valid)}"


def _merge(target: Any, settings: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(target))
    fields = {f.name: f for f in dataclasses.fields(target)}
    for key, value in settings.items():
        if key not in fields:
            raise LmlabError(_suggest(str(key), list(fields), prefix))
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise LmlabError(f"{prefix}{key} is a section; set its keys, e.g. {prefix}{key}.x=")
            _merge(current, value, f"{prefix}{key}.")
        elif isinstance(current, dict) and isinstance(value, dict):
            _merge_dict(current, value)
        else:
            setattr(target, key, coerce_value(value, hints[key], prefix + key))


def _merge_dict(target: dict, settings: dict) -> None:
    """Nested update, so ``model.mixer_options.gla.a=1`` then ``...gla.b=2`` keeps both."""
    for key, value in settings.items():
        if isinstance(target.get(key), dict) and isinstance(value, dict):
            _merge_dict(target[key], value)
        else:
            target[key] = value


def parse_override(text: str) -> dict:
    """``model.d_model=256`` -> ``{"model": {"d_model": 256}}`` (the value parsed as YAML)."""
    if "=" not in text:
        raise LmlabError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    nested: dict = {}
    node = nested
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return nested


def build_config(
    source: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    base: dict | None = None,
) -> Config:
    """A validated config: defaults, then ``base`` (e.g. a saved run), ``source``, ``overrides``."""
    config = Config()
    if base:
        _merge(config, base)
    if source:
        _merge(config, read_source(source))
    for item in overrides:
        _merge(config, parse_override(item))
    config.validate()
    return config


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
