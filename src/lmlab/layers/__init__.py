"""The nn.Module building blocks.

Importing this package imports every module in it, which runs each mixer's registration
decorator: adding a mixer is adding one file here.
"""

from lmlab.layers.registry import (
    CHANNEL_MIXERS,
    TOKEN_MIXERS,
    build_channel_mixer,
    build_token_mixer,
    import_builtin_layers,
    register_channel_mixer,
    register_token_mixer,
)

import_builtin_layers()

__all__ = [
    "CHANNEL_MIXERS",
    "TOKEN_MIXERS",
    "build_channel_mixer",
    "build_token_mixer",
    "register_channel_mixer",
    "register_token_mixer",
]
