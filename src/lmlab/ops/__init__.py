"""Pure tensor math shared by the mixers (no nn.Module).

Layout ``[batch, time, heads, dim]``, states ``[batch, heads, key_dim, value_dim]``, decays in
log space. Each recurrent core has a ``mode="recurrent"`` oracle, a ``mode="chunk"`` training
form, and a one-token decode step (a ``T = 1`` call with ``initial_state``).
"""

from lmlab.ops.dplr_delta_rule import dplr_delta_rule
from lmlab.ops.gated_delta_rule import gated_delta_rule
from lmlab.ops.gated_linear_attention import gated_linear_attention
from lmlab.ops.long_conv import causal_long_conv, causal_long_conv_step
from lmlab.ops.neural_memory import MemoryState, neural_memory
from lmlab.ops.rope import apply_rope, rope_tables
from lmlab.ops.short_conv import short_conv
from lmlab.ops.ttt_linear import TTTLinearState, ttt_linear

__all__ = [
    "MemoryState",
    "TTTLinearState",
    "apply_rope",
    "causal_long_conv",
    "causal_long_conv_step",
    "dplr_delta_rule",
    "gated_delta_rule",
    "gated_linear_attention",
    "neural_memory",
    "rope_tables",
    "short_conv",
    "ttt_linear",
]
