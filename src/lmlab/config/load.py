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

from lmlab.config.schema import Config, TrainConfig, coerce_value
from lmlab.errors import LmlabError

BUDGET_KEYS = ("max_time", "max_tokens", "max_steps")
"""The training budgets of ``train``, in the order they win (``budget_for`` in the trainer)."""


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


class _DuplicateKey(yaml.YAMLError):
    """Raised inside the loader, turned into an error naming the file or override."""

    def __init__(self, key: object, first: int, again: int) -> None:
        super().__init__(f"key {key!r} is given twice (lines {first} and {again}); keep one")


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping: PyYAML would silently keep
    the last, so a setting edited in one place could be undone by a forgotten copy."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # keys from a merge (<<) may be overridden
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: construct_mapping reports it
            if first is not None:
                raise _DuplicateKey(key, first, line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, where: str) -> Any:
    """``text`` parsed as YAML, or a one-line error naming ``where`` and the line."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: constructs plain data only
    except _DuplicateKey as exc:
        raise LmlabError(f"{where}: {exc}") from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        at = f" at line {line + 1}" if line is not None else ""
        raise LmlabError(f"{where} is not valid YAML{at}; fix its syntax") from None


def _read_yaml(text: str, where: str) -> dict:
    data = _parse_yaml(text, where)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LmlabError(f"{where} must hold a mapping of settings, not {type(data).__name__}")
    return data


def read_yaml_file(path: Path) -> dict:
    """The settings of a YAML file (a config or a run's ``config.yaml``), or a one-line error
    when it cannot be read, is not UTF-8 text, is not YAML or is not a mapping."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LmlabError(f"cannot read {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LmlabError(
            f"{path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "save it as UTF-8"
        ) from None
    return _read_yaml(text, str(path))


def read_source(source: str) -> dict:
    """The settings of a preset name or a YAML file path, as a nested dict."""
    path = Path(source)
    if source.endswith((".yaml", ".yml")) or path.exists():
        if not path.is_file():
            raise LmlabError(f"config file {source} does not exist; give a YAML path or a preset")
        return read_yaml_file(path)
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
    dotted, _, raw = text.partition("=")
    parts = dotted.strip().split(".")
    if "=" not in text or not all(parts):
        raise LmlabError(f"override {text!r} must look like section.key=value")
    value = _parse_yaml(raw, f"override {text!r}") if raw.strip() else ""
    nested: dict = {}
    node = nested
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
    """A validated config: defaults, then ``base`` (e.g. a saved run), ``source``, ``overrides``.

    Overrides are what the user typed last, so a training budget among them is the budget: it
    clears any other time or token budget of the base or source (time beats tokens beats steps,
    so a preset's ``max_time`` would win otherwise: ``--preset gpt-tiny train.max_steps=60``
    trains 60 steps, not the preset's 150 seconds). Two budgets in the overrides are an error."""
    config = Config()
    if base is not None:
        if not isinstance(base, dict):
            raise LmlabError(
                f"a saved config must be a mapping of settings, not {type(base).__name__}"
            )
        _merge(config, base)
    if source:
        _merge(config, read_source(source))
    named: set[str] = set()
    for item in overrides:
        settings = parse_override(item)
        _merge(config, settings)
        train = settings.get("train")
        named.update(key for key in BUDGET_KEYS if isinstance(train, dict) and key in train)
    _apply_command_line_budget(config.train, named)
    config.validate()
    return config


def _apply_command_line_budget(train: TrainConfig, named: set[str]) -> None:
    """Make the budget set by the overrides (``named``) the only one in force."""
    given = [key for key in BUDGET_KEYS if key in named and getattr(train, key) > 0]
    if len(given) > 1:
        raise LmlabError(
            f"train.{given[0]} and train.{given[1]} are both given as overrides; give one budget"
        )
    if given:
        train.max_time = train.max_time if given[0] == "max_time" else 0.0
        train.max_tokens = train.max_tokens if given[0] == "max_tokens" else 0


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
