"""Name -> class registries for token mixers and channel mixers.

A mixer registers itself with a decorator, derives from :class:`~lmlab.layers.base.TokenMixer`
or :class:`~lmlab.layers.base.ChannelMixer` (whose hooks the model calls) and declares its
settings as a dataclass ``Options``; ``model.mixer_options.<name>`` in the config is checked
against it, so a typo in a mixer setting fails loudly before training starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import pkgutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from lmlab.config.schema import ModelConfig
from lmlab.errors import LmlabError
from lmlab.layers.base import ChannelMixer, Mixer, TokenMixer

TOKEN_MIXERS: dict[str, type[TokenMixer]] = {}
CHANNEL_MIXERS: dict[str, type[ChannelMixer]] = {}

M = TypeVar("M", bound=Mixer)


def _register(table: dict[str, type[M]], base: type[M], name: str) -> Callable[[type[M]], type[M]]:
    def decorate(cls: type[M]) -> type[M]:
        if name in table:
            raise ValueError(f"mixer name {name!r} is registered twice")
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise TypeError(
                f"mixer {name!r} ({cls.__name__}) must derive from lmlab.layers.base."
                f"{base.__name__}, which declares the hooks the model calls"
            )
        if inspect.isabstract(cls):
            missing = ", ".join(sorted(cls.__abstractmethods__))
            raise TypeError(
                f"mixer {name!r} ({cls.__name__}) does not define {missing}; every mixer "
                "declares its FLOPs correction (0.0 if it has none, see lmlab.layers.base)"
            )
        cls.name = name
        table[name] = cls
        return cls

    return decorate


def register_token_mixer(name: str) -> Callable[[type[TokenMixer]], type[TokenMixer]]:
    """Register a :class:`TokenMixer`: ``forward(x [B,T,D], state=None) -> (y, new_state)``."""
    return _register(TOKEN_MIXERS, TokenMixer, name)


def register_channel_mixer(name: str) -> Callable[[type[ChannelMixer]], type[ChannelMixer]]:
    """Register a :class:`ChannelMixer`: ``forward(x [B,T,D]) -> y [B,T,D]``."""
    return _register(CHANNEL_MIXERS, ChannelMixer, name)


def _lookup(table: dict[str, type[M]], name: str, what: str) -> type[M]:
    import_builtin_layers()
    if name not in table:
        close = difflib.get_close_matches(name, list(table), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise LmlabError(f"unknown {what} {name!r}; {hint}available: {', '.join(sorted(table))}")
    return table[name]


def mixer_options(cls: type[Mixer], name: str, settings: dict[str, Any]) -> Any:
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


def build_token_mixer(name: str, cfg: ModelConfig, layer_idx: int) -> TokenMixer:
    cls = _lookup(TOKEN_MIXERS, name, "token mixer")
    return cls(cfg, layer_idx, mixer_options(cls, name, cfg.mixer_options.get(name, {})))


def build_channel_mixer(name: str, cfg: ModelConfig, layer_idx: int) -> ChannelMixer:
    cls = _lookup(CHANNEL_MIXERS, name, "channel mixer")
    return cls(cfg, layer_idx, mixer_options(cls, name, cfg.mixer_options.get(name, {})))


def token_mixer_names() -> list[str]:
    import_builtin_layers()
    return sorted(TOKEN_MIXERS)


def import_builtin_layers() -> None:
    """Import every module of this package, which runs each built-in mixer's registration
    decorator: adding a mixer is adding one file here. ``lmlab.layers`` calls it when imported;
    lookups call it too, so a registry used alone still knows every mixer."""
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        importlib.import_module(f"{__package__}.{module.name}")
