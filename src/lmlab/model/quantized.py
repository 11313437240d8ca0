"""Weight-only quantisation of a whole language model, in place: the one rule that
``lmlab quantize`` applies and that loading a quantised run repeats before reading its codes.

Every plain ``nn.Linear`` of the blocks becomes a :class:`~lmlab.layers.quantized.QuantizedLinear`;
unless the embedding is kept float, the output head does too (its matmul on the same PyTorch
CPU kernels, possibly with more bits than the blocks) and the token embedding becomes a
:class:`~lmlab.layers.quantized.QuantizedEmbedding`. A tied embedding and head are quantised
once (the table's rows are the head's output channels, its groups the head's input groups)
and share the codes, as the float model shares the weight. Norms, biases, MoE routers and
expert tensors and BitLinear layers keep their trained form.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lmlab.layers.quantized import (
    QuantizedEmbedding,
    QuantizedLinear,
    convert_to_quantized,
    group_for,
)
from lmlab.model.lm import LanguageModel


@dataclass
class Quantized:
    """What :func:`quantize_model` did."""

    float_layers: list[str] = field(default_factory=list)
    """Layers left in float because no int4 group divides their input width."""
    smaller_groups: dict[str, int] = field(default_factory=dict)
    """int4 layers on a smaller group than asked, because the asked one does not divide them."""
    embeddings: str = "float"
    """How the embedding and head are stored (``int8``, ``int4 g64``, ``float``), for people."""
    tied: bool = False
    """Whether the embedding and head share one weight (then one set of codes)."""


def quantize_model(
    model: LanguageModel, bits: int, group_size: int, embedding_bits: int | None
) -> Quantized:
    """Quantise ``model`` in place: the blocks' linear layers with ``bits`` (8, or 4 in groups
    of ``group_size`` inputs, or the largest smaller group that divides a layer), the
    embedding and head with ``embedding_bits`` (None: kept float). llama.cpp likewise
    keeps its output tensor at a higher precision than the blocks by default."""
    kept, smaller = convert_to_quantized(model.blocks, bits, group_size)
    done = Quantized([f"blocks.{name}" for name in kept])
    done.smaller_groups = {f"blocks.{name}": group for name, group in smaller.items()}
    done.tied = model.head.weight is model.embed.weight
    if embedding_bits is None:
        return done
    group = group_for(model.cfg.d_model, group_size) if embedding_bits == 4 else 0
    if group is None:
        done.float_layers += ["embed", "head"]
        return done
    if embedding_bits == 4 and group != group_size:
        done.smaller_groups.update(embed=group, head=group)
    head = QuantizedLinear.from_linear(model.head, embedding_bits, group)
    if done.tied:
        embed = QuantizedEmbedding(model.cfg.vocab_size, model.cfg.d_model, embedding_bits, group)
        embed.share_codes_with(head)
    else:
        embed = QuantizedEmbedding.from_embedding(model.embed, embedding_bits, group)
    model.head, model.embed = head, embed
    done.embeddings = head.method()
    return done
