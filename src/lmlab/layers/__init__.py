"""The nn.Module building blocks; importing this package registers every built-in mixer."""

from lmlab.layers import attention, mlp
from lmlab.layers.registry import (
    CHANNEL_MIXERS,
    TOKEN_MIXERS,
    build_channel_mixer,
    build_token_mixer,
    register_channel_mixer,
    register_token_mixer,
)

__all__ = [
    "CHANNEL_MIXERS",
    "TOKEN_MIXERS",
    "attention",
    "build_channel_mixer",
    "build_token_mixer",
    "mlp",
    "register_channel_mixer",
    "register_token_mixer",
]
