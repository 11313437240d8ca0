"""Weight-only quantised linear layers that run on PyTorch's own quantised CPU kernels, and a
quantised embedding that shares their stored form (so a tied embedding and head keep one copy).

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
STORED = ("codes", "scale", "offset")
"""The buffers of a quantised matrix (int8 has no offset)."""


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
    """Codes ``[..., K]`` (0..15, uint8) from two per byte, low nibble first."""
    return torch.stack([packed & 15, packed >> 4], -1).flatten(-2)


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    """The float32 rows ``[..., K]`` that int8 codes ``[..., K]`` with scales ``[...]``
    (``offset`` None) or packed int4 codes ``[..., K / 2]`` with scales and offsets
    ``[..., K / group_size]`` stand for; any leading shape, so a whole table and a gather of
    its rows go through the same arithmetic."""
    if offset is None:
        return codes.float() * scale[..., None]
    codes = unpack_int4(codes).float().unflatten(-1, (-1, group_size))
    return ((codes - 8) * scale.float()[..., None] + offset.float()[..., None]).flatten(-2)


def group_for(width: int, group_size: int) -> int | None:
    """The int4 group a matrix of ``width`` inputs uses when ``group_size`` is asked for:
    that group if it divides the width, else the largest smaller one of ``GROUP_SIZES`` that
    does (finer groups: a little larger, never less accurate), None if none does (the
    matrix stays float). Deterministic, so loading a run rebuilds the same layers."""
    fits = [g for g in GROUP_SIZES if g <= group_size and width % g == 0]
    return max(fits) if fits else None


class QuantizedWeight(nn.Module):
    """A float matrix ``[rows, cols]`` stored as int8 codes (one scale per row) or int4 codes
    (a scale and offset per group of ``group_size`` columns): the one storage that the
    linear layers' kernels and the embedding's gather both read, so a tied embedding and head
    hold one set of codes (:meth:`share_codes_with`).

    ``weight`` gives the dequantised float32 matrix for the rare code that reads it directly
    (Hyena's filter network, parameter counts); no forward builds it."""

    def __init__(self, rows: int, cols: int, bits: int, group_size: int = 0) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits={bits} must be 4 or 8")
        if bits == 4 and (group_size not in GROUP_SIZES or cols % group_size):
            raise ValueError(f"int4 needs a group size in {GROUP_SIZES} dividing {cols}")
        self.rows, self.cols = rows, cols
        self.bits, self.group_size = bits, group_size if bits == 4 else 0
        if bits == 8:
            self.register_buffer("codes", torch.zeros(rows, cols, dtype=torch.int8))
            self.register_buffer("scale", torch.ones(rows))
            self.register_buffer("offset", None)
        else:
            groups = cols // group_size
            self.register_buffer("codes", torch.zeros(rows, cols // 2, dtype=torch.uint8))
            self.register_buffer("scale", torch.ones(rows, groups, dtype=torch.bfloat16))
            self.register_buffer("offset", torch.zeros(rows, groups, dtype=torch.bfloat16))

    def quantize_(self, weight: torch.Tensor) -> None:
        """Store ``weight`` (``[rows, cols]``), in place: tensors shared with another module
        stay shared."""
        with torch.no_grad():
            if self.bits == 8:
                quantized = quantize_int8(weight)
            else:
                quantized = quantize_int4(weight, self.group_size)
            for buffer, value in zip(self._stored(), quantized, strict=True):
                buffer.copy_(value)

    def share_codes_with(self, other: QuantizedWeight) -> None:
        """Read ``other``'s codes, scales and offsets (the same tensors, so a checkpoint
        stores them once and loading fills both)."""
        if other._layout() != self._layout():
            raise ValueError(f"cannot share codes of {other._layout()} with {self._layout()}")
        for name in STORED:
            setattr(self, name, getattr(other, name))

    def _layout(self) -> tuple[int, int, int, int]:
        return self.rows, self.cols, self.bits, self.group_size

    def _stored(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in STORED if getattr(self, name) is not None]

    @property
    def weight(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.offset, self.group_size)

    def method(self) -> str:
        """``int8`` or ``int4 g<group>``, for people."""
        return "int8" if self.bits == 8 else f"int4 g{self.group_size}"


class QuantizedLinear(QuantizedWeight):
    """A bias-optional ``nn.Linear`` whose weight is stored as int8 or int4 codes; the matmul
    runs on PyTorch's quantised CPU kernels (module docstring)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int = 0
    ) -> None:
        super().__init__(out_features, in_features, bits, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._kernel: dict[torch.dtype, tuple[torch.Tensor, ...]] = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int = 0) -> QuantizedLinear:
        out_features, in_features = linear.weight.shape
        layer = cls(in_features, out_features, linear.bias is not None, bits, group_size)
        layer.quantize_(linear.weight)
        if linear.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(linear.bias)
        return layer

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._kernel = {}  # new codes: rebuild the kernel's layout

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
        return f"{self.in_features}, {self.out_features}, {self.method()}"


class QuantizedEmbedding(QuantizedWeight):
    """An ``nn.Embedding`` whose table is stored as int8 or int4 codes: a lookup dequantises
    only the rows it gathers (``dequantize`` of the gathered codes, scales and offsets), never
    the table.

    Hand-written because no library op reads this layout: PyTorch's ``quantized::embedding_byte``
    / ``embedding_4bit`` (and torchao's embedding quantisers built on them) take their own
    prepacked row-wise format, one scale and zero point per row rather than per group of
    columns, so using them would mean a second copy of a tied table (one for them, one for
    the head's int8/int4 matmul kernels) and a coarser int4. The gather is an index and the
    same dequantisation as :attr:`weight`, so its rows equal the dequantised table's exactly."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int, group_size: int = 0):
        super().__init__(num_embeddings, embedding_dim, bits, group_size)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim

    @classmethod
    def from_embedding(
        cls, embedding: nn.Embedding, bits: int, group_size: int = 0
    ) -> QuantizedEmbedding:
        table = cls(embedding.num_embeddings, embedding.embedding_dim, bits, group_size)
        table.quantize_(embedding.weight)
        return table

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        offset = None if self.offset is None else self.offset[idx]
        return dequantize(self.codes[idx], self.scale[idx], offset, self.group_size)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.method()}"


def convert_to_quantized(
    module: nn.Module, bits: int, group_size: int = 0
) -> tuple[list[str], dict[str, int]]:
    """Replace every plain ``nn.Linear`` under ``module`` (not routers, not BitLinear) by a
    :class:`QuantizedLinear`, in place. Returns the names of those left in float (int4: no
    group of ``GROUP_SIZES`` up to ``group_size`` divides their input width) and, by name,
    the smaller int4 group of those that could not take ``group_size`` (:func:`group_for`)."""
    kept, smaller = [], {}
    for name, child in list(module.named_modules()):
        for child_name, linear in list(child.named_children()):
            if type(linear) is not nn.Linear:
                continue
            full = f"{name}.{child_name}" if name else child_name
            group = group_for(linear.in_features, group_size) if bits == 4 else 0
            if group is None:
                kept.append(full)
                continue
            if group != (group_size if bits == 4 else 0):
                smaller[full] = group
            setattr(child, child_name, QuantizedLinear.from_linear(linear, bits, group))
    return kept, smaller
