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

from lmlab.catalog import Catalog
from lmlab.config.schema import ModelConfig
from lmlab.errors import LmlabError
from lmlab.layers.base import ChannelMixer, Mixer, TokenMixer

M = TypeVar("M", bound=Mixer)


def _admit(base: type[M]) -> Callable[[str, type[M]], None]:
    """The check a mixer class passes to be registered: it derives from ``base`` and defines
    every abstract hook; it is then given its registered ``name``."""

    def check(name: str, cls: type[M]) -> None:
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

    return check


_HOW_TO_ADD = "`lmlab info --mixers` lists them; lmlab.layers.registry registers new ones"
TOKEN_MIXERS: Catalog[type[TokenMixer]] = Catalog("token mixer", _HOW_TO_ADD, _admit(TokenMixer))
CHANNEL_MIXERS: Catalog[type[ChannelMixer]] = Catalog(
    "channel mixer", _HOW_TO_ADD, _admit(ChannelMixer)
)


def register_token_mixer(name: str) -> Callable[[type[TokenMixer]], type[TokenMixer]]:
    """Register a :class:`TokenMixer`: ``forward(x [B,T,D], state=None) -> (y, new_state)``."""
    return TOKEN_MIXERS.register(name)


def register_channel_mixer(name: str) -> Callable[[type[ChannelMixer]], type[ChannelMixer]]:
    """Register a :class:`ChannelMixer`: ``forward(x [B,T,D]) -> y [B,T,D]``."""
    return CHANNEL_MIXERS.register(name)


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
    import_builtin_layers()
    cls = TOKEN_MIXERS.lookup(name)
    return cls(cfg, layer_idx, mixer_options(cls, name, cfg.mixer_options.get(name, {})))


def build_channel_mixer(name: str, cfg: ModelConfig, layer_idx: int) -> ChannelMixer:
    import_builtin_layers()
    cls = CHANNEL_MIXERS.lookup(name)
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
