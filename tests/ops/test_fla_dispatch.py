"""flash-linear-attention's kernels against lmlab's own cores (the dispatch of lmlab.ops.fla).

The parity tests need a CUDA device and ``lmlab[cuda]``; elsewhere they are skipped with the
reason (``pytest -rs`` prints it). On a CPU the dispatch must never happen.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmlab.ops.fla import fla_installed, use_fla
from lmlab.ops.gated_delta_rule import gated_delta_rule
from lmlab.ops.gated_linear_attention import gated_linear_attention

NO_GPU = "needs a CUDA device (fla's kernels are Triton GPU kernels)"
NO_FLA = "needs flash-linear-attention: pip install 'lmlab[cuda]'"
B, T, H, K, V = 2, 100, 3, 32, 48  # T not a multiple of the chunk size
TOLERANCE = dict(rtol=2e-2, atol=2e-3)
"""Triton runs float32 matmuls in TF32 (10-bit mantissa), lmlab's cores in full float32."""


def test_on_cpu_the_cores_never_dispatch():
    x = torch.zeros(1, 4, 1, 8)
    assert not use_fla(x, "chunk")
    assert not use_fla(x, "recurrent")


def inputs(decay: str, delta: bool, device: str = "cuda") -> dict:
    torch.manual_seed(0)
    q, k = torch.randn(B, T, H, K, device=device), torch.randn(B, T, H, K, device=device)
    if delta:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    args = dict(q=q, k=k, v=torch.randn(B, T, H, V, device=device))
    shape = {"none": None, "head": (B, T, H), "channel": (B, T, H, K)}[decay]
    args["log_decay"] = None if shape is None else -F.softplus(torch.randn(shape, device=device))
    if delta:
        args["beta"] = torch.rand(B, T, H, device=device)
    args["initial_state"] = torch.randn(B, H, K, V, device=device) * 0.1
    for tensor in args.values():
        if tensor is not None:
            tensor.requires_grad_(True)
    return args


def outputs_and_grads(core, args: dict, fla: bool, monkeypatch) -> list[torch.Tensor]:
    monkeypatch.setenv("LMLAB_FLA", "1" if fla else "0")
    o, state = core(**args, output_final_state=True, mode="chunk")
    (o.square().sum() + state.square().sum()).backward()
    grads = [t.grad.clone() for t in args.values() if t is not None]
    for t in args.values():
        if t is not None:
            t.grad = None
    return [o.detach(), state.detach(), *grads]


@pytest.mark.parametrize(
    "core, decay, delta",
    [
        (gated_linear_attention, "none", False),
        (gated_linear_attention, "head", False),
        (gated_linear_attention, "channel", False),
        (gated_delta_rule, "none", True),
        (gated_delta_rule, "head", True),
    ],
)
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
@pytest.mark.skipif(not fla_installed(), reason=NO_FLA)
def test_fla_matches_the_lmlab_core_outputs_state_and_gradients(core, decay, delta, monkeypatch):
    args = inputs(decay, delta)
    ours = outputs_and_grads(core, args, False, monkeypatch)
    theirs = outputs_and_grads(core, args, True, monkeypatch)
    names = ["o", "state", *(name for name, t in args.items() if t is not None)]
    for name, mine, fla in zip(names, ours, theirs, strict=True):
        torch.testing.assert_close(fla, mine, **TOLERANCE, msg=lambda m, name=name: f"{name}: {m}")
