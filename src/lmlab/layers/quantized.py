"""Weight-only quantised linear layers that run on PyTorch's own quantised CPU kernels.

- int8, per output channel (symmetric): ``w[n, k] ~ q[n, k] * scale[n]`` with ``q`` in
  [-127, 127]; the matmul is ``torch.ops.aten._weight_int8pack_mm``.
- int4, group-wise (asymmetric, ``group_size`` consecutive inputs per group, as GPTQ/AWQ and
  torchao's ``int4_weight_only`` lay them out): ``w ~ (q - 8) * scale + offset`` with ``q`` in
  [0, 15] and one bfloat16 ``scale`` and ``offset`` per group; the matmul is
  ``torch.ops.aten._weight_int4pack_mm_for_cpu`` on the layout that
  ``_convert_weight_to_int4pack_for_cpu`` builds from the codes.

The stored form (safetensors, no pickle) is lmlab's own and independent of the kernels'
internal layouts: int8 codes and float32 scales, or two 4-bit codes per byte (low nibble first)
and bfloat16 scales and offsets; the int4 kernel layout is built once, at the first forward
after loading. The kernels run on bfloat16 activations, their fast path: with float32
activations they took 5-70x longer on this machine (``docs/serving.md``); the output returns in
the caller's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

INT4_KERNEL_ROWS = 16
"""The int4 CPU kernel takes a multiple of 16 output rows: other layers are padded with zero
rows when the kernel layout is built, and the extra outputs dropped."""
GROUP_SIZES = (32, 64, 128)
ACTIVATIONS = torch.bfloat16
"""The dtype the kernels compute in (see the module docstring)."""


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``int8 [N, K]`` and scales ``float32 [N]``: symmetric, per output channel."""
    scale = weight.abs().amax(1).float().clamp_min(1e-12) / 127
    codes = torch.round(weight.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scale


def quantize_int4(
    weight: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed codes ``uint8 [N, K / 2]`` and bfloat16 scales and offsets ``[N, K / group]``:
    asymmetric over each group's [min, max], ``w ~ (q - 8) * scale + offset``. The scale and
    offset are rounded to bfloat16 before the codes are chosen, so the codes fit them."""
    rows, cols = weight.shape
    groups = weight.float().view(rows, cols // group_size, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    scale = ((high - low) / 15).clamp_min(1e-8).to(torch.bfloat16)
    offset = (low + 8 * scale.float()).to(torch.bfloat16)
    codes = torch.round((groups - offset.float()[..., None]) / scale.float()[..., None] + 8)
    codes = codes.clamp(0, 15).to(torch.uint8).view(rows, cols)
    return codes[:, 0::2] | (codes[:, 1::2] << 4), scale, offset


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Codes ``[N, K]`` (0..15, uint8) from two per byte, low nibble first."""
    return torch.stack([packed & 15, packed >> 4], -1).flatten(-2)


class QuantizedLinear(nn.Module):
    """A bias-optional ``nn.Linear`` whose weight is stored as int8 or int4 codes.

    ``weight`` gives the dequantised float32 weight for the rare code that reads it directly
    (Hyena's filter network, FLOP counts); the forward never builds it."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int = 0
    ) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits={bits} must be 4 or 8")
        if bits == 4 and (group_size not in GROUP_SIZES or in_features % group_size):
            raise ValueError(f"int4 needs a group size in {GROUP_SIZES} dividing {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size if bits == 4 else 0
        if bits == 8:
            self.register_buffer("codes", torch.zeros(out_features, in_features, dtype=torch.int8))
            self.register_buffer("scale", torch.ones(out_features))
        else:
            groups = in_features // group_size
            packed = torch.zeros(out_features, in_features // 2, dtype=torch.uint8)
            self.register_buffer("codes", packed)
            self.register_buffer("scale", torch.ones(out_features, groups, dtype=torch.bfloat16))
            self.register_buffer("offset", torch.zeros(out_features, groups, dtype=torch.bfloat16))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._kernel: dict[torch.dtype, tuple[torch.Tensor, ...]] = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 0) -> QuantizedLinear:
        out_features, in_features = linear.weight.shape
        layer = cls(in_features, out_features, linear.bias is not None, bits, group_size)
        with torch.no_grad():
            if bits == 8:
                layer.codes, layer.scale = quantize_int8(linear.weight)
            else:
                layer.codes, layer.scale, layer.offset = quantize_int4(linear.weight, group_size)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._kernel = {}  # new codes: rebuild the kernel's layout

    @property
    def weight(self) -> torch.Tensor:
        if self.bits == 8:
            return self.codes.float() * self.scale[:, None]
        codes = unpack_int4(self.codes).float().view(self.out_features, -1, self.group_size)
        weight = (codes - 8) * self.scale.float()[..., None] + self.offset.float()[..., None]
        return weight.view(self.out_features, self.in_features)

    def _kernel_inputs(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """The kernel's operands for activations of ``dtype``, built once per dtype."""
        if dtype not in self._kernel:
            if self.bits == 8:
                self._kernel[dtype] = (self.codes, self.scale.to(dtype))
            else:
                rows = -self.out_features % INT4_KERNEL_ROWS
                codes = nn.functional.pad(unpack_int4(self.codes).to(torch.int32), (0, 0, 0, rows))
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
                scales = torch.stack([self.scale, self.offset], -1).transpose(0, 1).to(dtype)
                scales = nn.functional.pad(scales, (0, 0, 0, rows)).contiguous()
                self._kernel[dtype] = (packed, scales)
        return self._kernel[dtype]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(ACTIVATIONS).contiguous()
        if self.bits == 8:
            codes, scale = self._kernel_inputs(ACTIVATIONS)
            y = torch.ops.aten._weight_int8pack_mm(flat, codes, scale)
        else:
            packed, scales = self._kernel_inputs(ACTIVATIONS)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, self.group_size, scales)
            y = y[:, : self.out_features]
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"{self.in_features}, {self.out_features}, int{self.bits}{group}"


def quantizable(linear: nn.Module, bits: int, group_size: int) -> bool:
    """A plain ``nn.Linear`` (not a router, not BitLinear) that the kernel can take."""
    if type(linear) is not nn.Linear:
        return False
    return bits == 8 or linear.in_features % group_size == 0


def convert_to_quantized(module: nn.Module, bits: int, group_size: int = 0) -> list[str]:
    """Replace every quantizable linear layer under ``module`` (in place); returns the names
    of the plain linear layers left in float because the group size does not divide their
    input width."""
    kept = []
    for name, child in list(module.named_modules()):
        for child_name, linear in list(child.named_children()):
            if type(linear) is not nn.Linear:
                continue
            full = f"{name}.{child_name}" if name else child_name
            if quantizable(linear, bits, group_size):
                setattr(child, child_name, QuantizedLinear.from_linear(linear, bits, group_size))
            else:
                kept.append(full)
    return kept
