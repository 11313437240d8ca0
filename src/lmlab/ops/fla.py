"""The recurrent cores on flash-linear-attention's Triton kernels, on CUDA, when it is installed
(``pip install 'lmlab[cuda]'``). On a CPU, or without the package, nothing changes: lmlab's own
chunked cores run, as they do everywhere.

Only the chunked (training and prefill) form is dispatched, and only where fla computes the same
recurrence with the same conventions. lmlab's cores and fla's kernels share the layout
``[batch, time, heads, dim]`` (fla's default, ``head_first=False``), the state ``[B, H, K, V]``
(keys by values), the query scale applied to ``q`` and outputs that read the state *after* the
step's update. The mapping (``g`` is fla's gate in log space, like lmlab's ``log_decay``):

- ``gated_linear_attention``, no decay or ``log_decay`` ``[B, T, H]`` (per head):
  ``fla.ops.simple_gla.chunk_simple_gla(g=log_decay)``;
- ``gated_linear_attention``, ``log_decay`` ``[B, T, H, K]`` (per key channel):
  ``fla.ops.gla.chunk_gla(g=log_decay)``;
- ``gated_delta_rule``, no decay: ``fla.ops.delta_rule.chunk_delta_rule(beta=beta)``;
- ``gated_delta_rule``, ``log_decay`` ``[B, T, H]``:
  ``fla.ops.gated_delta_rule.chunk_gated_delta_rule(g=log_decay, beta=beta)``.

``beta`` is passed as it is (``[B, T, H]``); keys are L2-normalised by the mixers in both, so
fla's in-kernel normalisation stays off. The per-key-channel delta rule (Kimi Delta Attention)
stays on lmlab's core. Inputs are cast to float32 as lmlab's cores do, so both compute in the
same precision (Triton's matmuls may still use TF32); the output has ``v``'s dtype and the state
is float32. ``LMLAB_FLA=0`` turns the dispatch off (e.g. to compare).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from functools import cache

import torch

Result = tuple[torch.Tensor, torch.Tensor | None]


@cache
def fla_installed() -> bool:
    return importlib.util.find_spec("fla") is not None


def use_fla(x: torch.Tensor, mode: str) -> bool:
    """Whether a core call on ``x`` in ``mode`` goes to fla."""
    return (
        mode == "chunk"
        and x.is_cuda
        and os.environ.get("LMLAB_FLA", "1") != "0"
        and fla_installed()
    )


def _kernel(module: str, name: str):
    return getattr(importlib.import_module(module), name)


def _float32(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.float().contiguous() for t in tensors]


def fla_gated_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> Result:
    """:func:`lmlab.ops.gated_linear_attention.gated_linear_attention` on fla."""
    if log_decay is not None and log_decay.dim() == 4:
        kernel = _kernel("fla.ops.gla", "chunk_gla")
    else:
        kernel = _kernel("fla.ops.simple_gla", "chunk_simple_gla")
    q32, k32, v32, g32, s32 = _float32(q, k, v, log_decay, initial_state)
    with torch.autocast("cuda", enabled=False):
        o, state = kernel(
            q=q32,
            k=k32,
            v=v32,
            g=g32,
            scale=scale,
            initial_state=s32,
            output_final_state=output_final_state,
        )
    return o.to(v.dtype), state if output_final_state else None


def fla_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    log_decay: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> Result | None:
    """:func:`lmlab.ops.gated_delta_rule.gated_delta_rule` on fla; None for a per-channel
    decay, which fla has no kernel for here (the caller runs its own core)."""
    if log_decay is not None and log_decay.dim() == 4:
        return None
    q32, k32, v32, b32, g32, s32 = _float32(q, k, v, beta, log_decay, initial_state)
    common = dict(
        q=q32, k=k32, v=v32, beta=b32, scale=scale, initial_state=s32,
        output_final_state=output_final_state,
    )  # fmt: skip
    with torch.autocast("cuda", enabled=False):
        if g32 is None:
            o, state = _kernel("fla.ops.delta_rule", "chunk_delta_rule")(**common)
        else:
            kernel = _kernel("fla.ops.gated_delta_rule", "chunk_gated_delta_rule")
            o, state = kernel(g=g32, **common)
    return o.to(v.dtype), state if output_final_state else None
