"""Device and precision choice: the fast path differs a lot between machines.

bf16 autocast is ~7x faster than float32 on CPUs with AMX, but on CPUs without native bf16
matmuls (AVX2 only) it is ~100x *slower*, so ``precision=auto`` checks the hardware instead of
assuming.
"""

from __future__ import annotations

import contextlib
from functools import cache
from pathlib import Path

import torch

from lmlab.errors import LmlabError


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise LmlabError(
            f"train.device={setting!r} is not a device; use auto, cpu, cuda or mps"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmlabError("train.device=cuda but no CUDA device is available; use train.device=auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise LmlabError("train.device=mps but MPS is not available; use train.device=auto")
    return device


@cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU multiplies bf16 natively (AMX or AVX512-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("amx_bf16", "avx512_bf16"))


def resolve_precision(setting: str, device: torch.device) -> str:
    """``bf16`` or ``fp32`` for this device."""
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision context: weights stay float32, matmuls run in bf16."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: CUDA allocator peak, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
