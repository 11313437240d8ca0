"""The nn.Module building blocks.

Importing this package imports every module in it, which runs each mixer's registration
decorator: adding a mixer is adding one file here.
"""

import importlib
import pkgutil

from lmlab.layers.registry import (
    CHANNEL_MIXERS,
    TOKEN_MIXERS,
    build_channel_mixer,
    build_token_mixer,
    register_channel_mixer,
    register_token_mixer,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "CHANNEL_MIXERS",
    "TOKEN_MIXERS",
    "build_channel_mixer",
    "build_token_mixer",
    "register_channel_mixer",
    "register_token_mixer",
]
