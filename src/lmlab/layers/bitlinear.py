"""BitLinear: ternary weights and 8-bit activations (Ma et al. 2024, "The Era of 1-bit LLMs:
All Large Language Models are in 1.58 Bits"; Microsoft's "BitNet b1.58 training tips" FAQ).

Forward, with latent float weights ``W`` that the optimiser trains:

- weights: ``s = mean|W|``, ``W_q = clamp(round(W / s), -1, 1) * s`` (absmean, one scale per
  matrix);
- activations: per token ``a = 127 / max|x|``, ``x_q = clamp(round(x * a), -128, 127) / a``
  (absmax to the int8 grid);
- ``y = x_q @ W_q^T + b``; both quantisers pass the gradient straight through
  (the FAQ's ``x + (q(x) - x).detach()``): identity, unclipped, as in the FAQ.

Deliberate deviation: no RMSNorm inside BitLinear. The paper's BitLinear normalises its input
before quantising; here every block is pre-norm, so the projections that read the residual
stream already get an RMSNorm-ed input, and since the absmax quantiser is scale-invariant per
token (``q(c x) = c q(x)``) an extra norm would only rescale each token's output, not change
the quantisation error. BitLinear therefore stays a drop-in ``nn.Linear`` with the same
parameters, state dict, initialisation and FLOPs count.

Packed form (``pack_ternary``): the codes ``W_q / s + 1`` in {0, 1, 2}, 2 bits each, 4 per byte,
the first weight in the lowest bits, row-major; plus the float32 scale and the shape. 2 bits
(not 5 trits per byte, 1.6 bits) because unpacking is then a shift and a mask.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.layers.features import FeatureCounter

EPS = 1e-5
"""Floor of the weight scale and the activation absmax, so all-zero inputs stay finite."""
SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
"""Bit offsets of the four 2-bit codes in a packed byte."""


def ternary_codes(
    weight: torch.Tensor, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes in {-1, 0, 1} (weight's dtype), scale)`` with ``scale = mean|weight|`` unless
    given; the quantised weight is ``codes * scale``."""
    if scale is None:
        scale = weight.abs().mean().clamp(min=EPS)
    return (weight / scale).round().clamp(-1, 1), scale


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Per-token (last dimension) absmax quantisation to the int8 grid, returned dequantised."""
    a = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    return (x * a).round().clamp(-128, 127) / a


def straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """``quantized`` in the forward pass, the identity gradient to ``x`` in the backward.

    Written ``q + (x - x.detach())`` rather than the FAQ's ``x + (q - x).detach()``: the same
    gradient, but the forward value is exactly ``q`` (the FAQ form rounds twice), so a model
    rebuilt from the exported ternary weights gives bit-identical logits."""
    return quantized.detach() + (x - x.detach())


class BitLinear(FeatureCounter, nn.Linear):
    """``nn.Linear`` whose forward uses ternary weights and int8 activations (see module doc)."""

    feature = "bitlinear"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kwargs) -> None:
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        # Set by the ternary export's loader: the weight then holds ``codes * scale`` and must
        # be quantised with that scale (its mean|W| is smaller when some codes are 0).
        self.register_buffer("fixed_scale", None, persistent=False)

    def quantized_weight(self) -> torch.Tensor:
        codes, scale = ternary_codes(self.weight, self.fixed_scale)
        return codes * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count_call()
        with torch.no_grad():  # the quantisers are outside the graph: no saved tensors
            weight, x_q = self.quantized_weight(), quantize_activations(x)
        weight = straight_through(self.weight, weight)
        return F.linear(straight_through(x, x_q), weight, self.bias)


def convert_to_bitlinear(module: nn.Module) -> int:
    """Replace every plain ``nn.Linear`` inside ``module`` (not ``module`` itself) by a
    ``BitLinear`` holding the same parameters, in place; returns how many were replaced.
    Subclasses are left alone: a ``lmlab.layers.base.Router`` stays in full precision."""
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            bit = BitLinear(
                child.in_features, child.out_features, bias=child.bias is not None, device="meta"
            )
            bit.weight, bit.bias = child.weight, child.bias
            setattr(parent, name, bit)
            swapped += 1
    return swapped


def pack_ternary(
    weight: torch.Tensor, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """``(packed uint8 [ceil(n / 4)], float32 scale [], shape)`` of ``weight`` quantised as
    ``BitLinear`` does (``scale``: a module's ``fixed_scale``, else mean|weight|)."""
    codes, scale = ternary_codes(weight.detach().float(), scale)
    flat = (codes.flatten() + 1).to(torch.uint8)
    flat = F.pad(flat, (0, -flat.numel() % 4)).view(-1, 4)
    packed = (flat << SHIFTS).sum(dim=1, dtype=torch.uint8)
    return packed, scale.detach().float().reshape(()), tuple(weight.shape)


def unpack_ternary(
    packed: torch.Tensor, scale: torch.Tensor, shape: tuple[int, ...] | torch.Size
) -> torch.Tensor:
    """The float32 weight ``codes * scale`` that ``pack_ternary`` stored: exactly the quantised
    weight ``BitLinear`` used in its forward pass."""
    n = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.numel() != -(-n // 4):
        raise ValueError(f"{packed.numel()} packed bytes do not hold a weight of shape {shape}")
    codes = (packed.reshape(-1, 1) >> SHIFTS) & 3
    if codes.numel() and codes.max() > 2:
        raise ValueError("packed ternary data holds the code 3; the file is damaged")
    codes = codes.flatten()[:n].float() - 1
    return (codes * scale.float()).reshape(shape)
