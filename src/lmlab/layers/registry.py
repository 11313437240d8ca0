"""Name -> module registries for token mixers and channel mixers.

A mixer registers itself with a decorator and declares its settings as a dataclass
``Options``; ``model.mixer_options.<name>`` in the config is checked against it, so a typo in a
mixer setting fails loudly before training starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import pkgutil
from pathlib import Path
from typing import Any

from torch import nn

from lmlab.config.schema import ModelConfig
from lmlab.errors import LmlabError

TOKEN_MIXERS: dict[str, type[nn.Module]] = {}
CHANNEL_MIXERS: dict[str, type[nn.Module]] = {}


@dataclasses.dataclass
class NoOptions:
    """For mixers without settings of their own."""


def _register(table: dict[str, type[nn.Module]], name: str):
    def decorate(cls: type[nn.Module]) -> type[nn.Module]:
        if name in table:
            raise ValueError(f"mixer name {name!r} is registered twice")
        if not hasattr(cls, "Options"):
            cls.Options = NoOptions
        table[name] = cls
        return cls

    return decorate


def register_token_mixer(name: str):
    """Register a token mixer: ``forward(x [B,T,D], state=None) -> (y [B,T,D], new_state)``."""
    return _register(TOKEN_MIXERS, name)


def register_channel_mixer(name: str):
    """Register a channel mixer: ``forward(x [B,T,D]) -> y [B,T,D]``."""
    return _register(CHANNEL_MIXERS, name)


def _lookup(table: dict[str, type[nn.Module]], name: str, what: str) -> type[nn.Module]:
    import_builtin_layers()
    if name not in table:
        close = difflib.get_close_matches(name, list(table), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise LmlabError(f"unknown {what} {name!r}; {hint}available: {', '.join(sorted(table))}")
    return table[name]


def mixer_options(cls: type[nn.Module], name: str, settings: dict[str, Any]) -> Any:
    """The mixer's ``Options`` filled from ``settings``, rejecting unknown keys."""
    fields = {f.name for f in dataclasses.fields(cls.Options)}
    for key in settings:
        if key not in fields:
            close = difflib.get_close_matches(str(key), sorted(fields), n=1)
            hint = (
                f"did you mean model.mixer_options.{name}.{close[0]}?"
                if close
                else (f"valid: {', '.join(sorted(fields)) or 'none'}")
            )
            raise LmlabError(f"unknown setting model.mixer_options.{name}.{key}; {hint}")
    return cls.Options(**settings)


def build_token_mixer(name: str, cfg: ModelConfig, layer_idx: int) -> nn.Module:
    cls = _lookup(TOKEN_MIXERS, name, "token mixer")
    return cls(cfg, layer_idx, mixer_options(cls, name, cfg.mixer_options.get(name, {})))


def build_channel_mixer(name: str, cfg: ModelConfig, layer_idx: int) -> nn.Module:
    cls = _lookup(CHANNEL_MIXERS, name, "channel mixer")
    return cls(cfg, layer_idx, mixer_options(cls, name, cfg.mixer_options.get(name, {})))


def prefer_adamw(module: nn.Module) -> nn.Module:
    """Mark ``module`` (e.g. a router whose rows are per-class logits) so the Muon recipe
    optimises all its parameters with AdamW; returns it, for ``self.router = prefer_adamw(...)``.
    A class can declare ``optimizer_hint = "adamw"`` instead."""
    module.optimizer_hint = "adamw"
    return module


def token_mixer_names() -> list[str]:
    import_builtin_layers()
    return sorted(TOKEN_MIXERS)


def import_builtin_layers() -> None:
    """Import every module of this package, which runs each built-in mixer's registration
    decorator: adding a mixer is adding one file here. ``lmlab.layers`` calls it when imported;
    lookups call it too, so a registry used alone still knows every mixer."""
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        importlib.import_module(f"{__package__}.{module.name}")
