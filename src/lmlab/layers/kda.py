"""Kimi Delta Attention (Kimi Team / Moonshot AI 2025, "Kimi Linear: An Expressive, Efficient
Attention Architecture"), in the form of fla's ``KimiDeltaAttention`` layer and
``fla/ops/kda/naive.py``.

Gated DeltaNet (see ``gated_deltanet.py``) with a fine-grained decay: every key channel of every
head forgets at its own data-dependent rate, from a low-rank projection. The decay acts on the old
state first; the delta rule then reads and writes the decayed state:

    log alpha_t = -exp(A_log_h) * softplus(W_up W_down x_t + dt_bias)     ([H, K] per token)
    S_t = diag(alpha_t) S_{t-1}
    S_t = S_t + beta_t k_t (v_t - S_t^T k_t)^T,    o_t = (K^-1/2) S_t^T q_t

i.e. ``S_t = (I - beta_t k_t k_t^T) diag(alpha_t) S_{t-1} + beta_t k_t v_t^T``, with
``beta_t = sigmoid(W_b x_t)`` per head, short convolutions with silu on q, k, v and L2-normalised
q, k as in DeltaNet. The output gate is low-rank too and uses a sigmoid (not silu):
``rms_norm(o) * w * sigmoid(W_gu W_gd x + b_g)`` per head, then the output projection.

As fla: both low-rank bottlenecks have the per-head value size as rank (``gate_rank = 0``),
``A_log`` is per head and ``dt_bias`` per head and key channel, ``A ~ U(1, 16)``,
``softplus(dt_bias)`` log-uniform in [1e-3, 0.1], values as wide as keys (``expand_v = 1``); the
key size per head is the model's head size (fla's default 128). Not carried over: grouped value
heads and fla's optional ``lower_bound`` / ``safe_gate`` (a sigmoid-bounded decay for its GPU
kernel's tensor-core path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lmlab.config.schema import ModelConfig
from lmlab.layers.common import mamba_log_decay, reset_mamba_decay
from lmlab.layers.deltanet import DeltaNet
from lmlab.layers.registry import register_token_mixer


@register_token_mixer("kda")
class KimiDeltaAttention(DeltaNet):
    """Gated DeltaNet with a per-key-channel decay and a low-rank sigmoid output gate."""

    @dataclass
    class Options(DeltaNet.Options):
        gate_rank: int = 0
        """Rank of the decay and output-gate bottlenecks; 0 takes the per-head value size."""
        chunk_size: int = 32
        """32, not fla's 64: a per-channel decay of up to 1.6 per step (the initial ``A`` and
        ``dt``) spans more than the core's factorised limit over 64 steps, which sends every
        chunk to the slower sub-chunked form (1.4-1.6x the layer's time at T = 512-2048)."""

    mixer_name = "kda"

    def _gate_widths(self, options: Options) -> dict[str, int]:
        rank = options.gate_rank or self.value_dim
        return {"decay": rank, "gate": rank}

    def _build_gates(self, cfg: ModelConfig, options: Options) -> None:
        rank = options.gate_rank or self.value_dim
        self.decay_up = nn.Linear(rank, self.n_heads * self.key_dim, bias=False)
        self.gate_up = nn.Linear(rank, self.n_heads * self.value_dim, bias=True)
        self.norm = nn.RMSNorm(self.value_dim, eps=cfg.norm_eps)
        self.a_log = nn.Parameter(torch.empty(self.n_heads, 1))
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads, self.key_dim))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        reset_mamba_decay(self.a_log, self.dt_bias, 1.0, 16.0)

    def _log_decay(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        pre = self.decay_up(parts["decay"])
        return mamba_log_decay(pre.unflatten(-1, self.dt_bias.shape), self.a_log, self.dt_bias)

    def _readout(self, o: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        gate = self.gate_up(parts["gate"]).reshape(o.shape)
        return super()._readout(o, parts) * torch.sigmoid(gate)
