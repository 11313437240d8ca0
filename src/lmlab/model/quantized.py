"""Weight-only quantisation of a whole language model, in place: the one rule that
``lmlab quantize`` applies and that loading a quantised run repeats before reading its codes.

Every plain ``nn.Linear`` of the blocks becomes a :class:`~lmlab.layers.quantized.QuantizedLinear`;
unless ``embeddings=False`` the output head does too (its matmul on the same PyTorch CPU
kernels) and the token embedding becomes a
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
    """``quantized`` (embedding and head), ``float`` (kept, or none fits), for people."""
    tied: bool = False
    """Whether the embedding and head share one weight (then one set of codes)."""


def quantize_model(
    model: LanguageModel, bits: int, group_size: int = 0, embeddings: bool = True
) -> Quantized:
    """Quantise ``model`` in place (``bits`` 8 or 4; int4 in groups of ``group_size`` inputs,
    or the largest smaller group that divides a layer); ``embeddings=False`` keeps the
    embedding and head float (as llama.cpp can keep its output tensor at higher precision)."""
    kept, smaller = convert_to_quantized(model.blocks, bits, group_size)
    done = Quantized([f"blocks.{name}" for name in kept])
    done.smaller_groups = {f"blocks.{name}": group for name, group in smaller.items()}
    done.tied = model.head.weight is model.embed.weight
    if not embeddings:
        return done
    group = group_for(model.cfg.d_model, group_size) if bits == 4 else 0
    if group is None:
        done.float_layers += ["embed", "head"]
        return done
    if bits == 4 and group != group_size:
        done.smaller_groups.update(embed=group, head=group)
    head = QuantizedLinear.from_linear(model.head, bits, group)
    if done.tied:
        embed = QuantizedEmbedding(model.cfg.vocab_size, model.cfg.d_model, bits, group)
        embed.share_codes_with(head)
    else:
        embed = QuantizedEmbedding.from_embedding(model.embed, bits, group)
    model.head, model.embed = head, embed
    done.embeddings = "quantized"
    return done
