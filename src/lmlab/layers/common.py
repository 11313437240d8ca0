"""Helpers that several mixers share (sizes, option checks, precision, Mamba-style decays), so
that no mixer file imports another one for them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmlab.errors import LmlabError


def head_dims(name: str, width: int, expand: float, n_heads: int, what: str) -> int:
    """Per-head size of a projection ``width * expand`` split over ``n_heads``, or a clear error."""
    total = int(width * expand)
    if total <= 0 or total % n_heads:
        raise LmlabError(
            f"{name}: d_model * {what} = {total} is not a positive multiple of n_heads={n_heads}; "
            f"change model.mixer_options.{name}.{what}"
        )
    return total // n_heads


def check_core_options(name: str, mode: str, chunk_size: int) -> None:
    """Reject a bad core setting when the model is built rather than at the first forward."""
    if mode not in ("chunk", "recurrent"):
        raise LmlabError(
            f"{name}: mode={mode!r} is unknown; set model.mixer_options.{name}.mode to chunk "
            "or recurrent"
        )
    if chunk_size < 1:
        raise LmlabError(f"{name}: chunk_size={chunk_size} must be at least 1")


@dataclass
class MambaHeadOptions:
    """The settings Mamba-2 and Mamba-3 share: heads of ``head_dim`` channels over
    ``expand * d_model``, state size ``d_state``, B/C maps shared by ``ngroups`` groups of heads,
    and the core's mode and chunk."""

    d_state: int = 128
    """State size N (the key width of the core); mamba_ssm's default."""
    expand: int = 2
    """d_inner = expand * d_model."""
    head_dim: int = 64
    """P, the value width of each head; heads = d_inner / head_dim."""
    ngroups: int = 1
    """Number of distinct B/C maps, each shared by n_heads / ngroups heads."""
    chunk_size: int = 64
    """Core steps per chunk."""
    mode: str = "chunk"
    """``chunk`` (training) or ``recurrent`` (the core's step-by-step oracle)."""


def mamba_heads(name: str, d_model: int, options: MambaHeadOptions) -> int:
    """The head count of a Mamba-style layer, or one line on what to change; also checks the
    core's mode and chunk."""
    d_inner = options.expand * d_model
    if options.head_dim <= 0 or d_inner % options.head_dim:
        raise LmlabError(
            f"{name}: expand * d_model = {d_inner} is not a multiple of head_dim="
            f"{options.head_dim}; change model.mixer_options.{name}.head_dim"
        )
    n_heads = d_inner // options.head_dim
    if options.ngroups <= 0 or n_heads % options.ngroups:
        raise LmlabError(
            f"{name}: ngroups={options.ngroups} must divide the {n_heads} heads; "
            f"change model.mixer_options.{name}.ngroups"
        )
    check_core_options(name, options.mode, options.chunk_size)
    return n_heads


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """Gates and decays are summed over many steps: keep them in float32 (or float64) even when
    the model runs in bfloat16."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def mamba_log_decay(pre: torch.Tensor, a_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """Mamba-2's ``log alpha = -exp(A_log) * softplus(pre + dt_bias)`` (``<= 0``) in float32 or
    wider; ``a_log`` and ``dt_bias`` broadcast against the trailing dimensions of ``pre``."""
    dt = F.softplus(at_least_float32(pre) + dt_bias)
    return -torch.exp(a_log.to(dt.dtype)) * dt


def reset_mamba_decay(
    a_log: torch.Tensor, dt_bias: torch.Tensor, a_low: float, a_high: float
) -> None:
    """``A ~ U(a_low, a_high)`` and ``softplus(dt_bias)`` log-uniform in [1e-3, 0.1] (floored at
    1e-4): a spread of memory lengths across heads (and channels) from the start (Mamba-2)."""
    with torch.no_grad():
        a_log.copy_(torch.empty_like(a_log).uniform_(a_low, a_high).log())
        low, high = math.log(1e-3), math.log(0.1)
        dt = torch.exp(torch.rand_like(dt_bias) * (high - low) + low).clamp_min(1e-4)
        dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
