"""Gated DeltaNet (Yang, Kautz & Hatamizadeh 2024, "Gated Delta Networks: Improving Mamba2 with
Delta Rule"), in the form of fla's ``GatedDeltaNet`` layer.

DeltaNet (see ``deltanet.py``) plus a data-dependent scalar decay per head in Mamba-2's
parametrisation. The decay acts on the old state first; the delta rule then reads and writes the
decayed state:

    alpha_t = exp(-exp(A_log) * softplus(W_a x_t + dt_bias))              (per head)
    S_t = alpha_t S_{t-1} + beta_t k_t (v_t - alpha_t S_{t-1}^T k_t)^T,    o_t = (K^-1/2) S_t^T q_t

i.e. ``S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``: alpha erases quickly
(whole-memory forgetting), the delta rule edits single associations. Each head's output is
RMS-normalised and gated, ``rms_norm(o) * w * silu(W_g x)``, before the output projection.

Sizes: fla's default ``expand_v = 2`` is kept (values twice as wide as keys, as in the paper, which
doubles the state); the key size per head is the model's head size (``d_model // n_heads`` unless
``model.head_dim`` is set: 64 for the default config; fla's default 256 is sized for d_model 2048).
With ``n_heads * head_dim = d_model`` the layer has about ``8 d_model^2`` weights; fla reaches its
``6 d_model^2`` by choosing ``n_heads * head_dim = 0.75 d_model``, which ``head_dim`` here allows.
Initialisation as fla: ``A ~ U(0, 16)``, ``dt = softplus(dt_bias)`` log-uniform in [1e-3, 0.1].
Not carried over: fla's grouped value heads (``num_v_heads``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmlab.config.schema import ModelConfig
from lmlab.layers.common import mamba_log_decay, reset_mamba_decay
from lmlab.layers.deltanet import DeltaNet
from lmlab.layers.norm import GatedRMSNorm
from lmlab.layers.registry import register_token_mixer


@register_token_mixer("gated_deltanet")
class GatedDeltaNet(DeltaNet):
    """DeltaNet with a Mamba-2 style per-head decay and a silu-gated output norm."""

    @dataclass
    class Options(DeltaNet.Options):
        expand_v: float = 2.0
        """Per-head value size as a multiple of the key size (fla Gated DeltaNet: 2)."""

    mixer_name = "gated_deltanet"

    def _gate_widths(self, options: Options) -> dict[str, int]:
        return {"decay": self.n_heads, "gate": self.n_heads * self.value_dim}

    def _build_gates(self, cfg: ModelConfig, options: Options) -> None:
        self.norm = GatedRMSNorm(self.value_dim, eps=cfg.norm_eps)
        self.a_log = nn.Parameter(torch.empty(self.n_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        reset_mamba_decay(self.a_log, self.dt_bias, 0.0, 16.0)

    def _log_decay(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return mamba_log_decay(parts["decay"], self.a_log, self.dt_bias)

    def _readout(self, o: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.norm(o, parts["gate"].reshape(o.shape))
