"""DeltaNet (Schlag, Irie & Schmidhuber 2021, "Linear Transformers Are Secretly Fast Weight
Programmers"; parallelised over the sequence by Yang et al. 2024, "Parallelizing Linear
Transformers with the Delta Rule over Sequence Length"), in the form of fla's ``DeltaNet`` layer.

Each head keeps a fast-weight matrix ``S [K, V]`` and, instead of adding ``k v^T`` like linear
attention, writes with the delta rule: it first reads what ``S`` predicts for the key, then moves
that prediction towards ``v`` by a learned step ``beta``:

    S_t = S_{t-1} + beta_t k_t (v_t - S_{t-1}^T k_t)^T,    o_t = (K^-1/2) S_t^T q_t

i.e. ``S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``, a rank-one Householder-like
transition that can overwrite an association instead of piling up. ``k`` and ``q`` are
L2-normalised per head so ``||k|| = 1`` and the transition is a contraction for ``beta in (0, 1)``;
``beta_t = sigmoid(W_b x_t)`` per head (``allow_neg_eigval``: ``2 * sigmoid``, eigenvalues of the
transition in ``(-1, 1]``, Grazzi et al. 2024). q, k and v go through a causal depthwise short
convolution with silu first (fla's default ``use_short_conv``, ``qk_activation = silu``), and every
head's output is RMS-normalised (fla's ``use_output_norm``) before the output projection.

This module also holds the machinery shared with Gated DeltaNet and KDA (``gated_deltanet.py``,
``kda.py``), which only add a decay and an output gate through :meth:`DeltaNet._log_decay` and
:meth:`DeltaNet._readout`. Deviations from fla, all shape-preserving: the q/k/v/beta (and the
subclasses' gate) projections share one matmul, and the three short convolutions are one depthwise
convolution over the concatenated channels (the same weights as fla's three, only faster).
The per-head key size is the model's head size (``model.head_dim``, else ``d_model // n_heads``,
which equals fla's ``expand_k = 1``) unless ``head_dim`` is set here; values are ``expand_v``
times as wide. The decode state is ``{"conv": short-conv tail, "recurrent": S [B, H, K, V]}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config.schema import ModelConfig
from lmlab.errors import LmlabError
from lmlab.layers.base import TokenMixer
from lmlab.layers.common import at_least_float32
from lmlab.layers.registry import register_token_mixer
from lmlab.ops.gated_delta_rule import gated_delta_rule
from lmlab.ops.short_conv import short_conv


@register_token_mixer("deltanet")
class DeltaNet(TokenMixer):
    """Linear attention whose state is written with the delta rule (no decay)."""

    @dataclass
    class Options:
        head_dim: int = 0
        """Per-head key size; 0 takes the model's head size."""
        expand_v: float = 1.0
        """Per-head value size as a multiple of the key size (fla DeltaNet: 1)."""
        conv_size: int = 4
        """Kernel width of the causal short convolution on q, k, v (fla: 4)."""
        allow_neg_eigval: bool = False
        """``beta = 2 * sigmoid(.)`` so the transition can have negative eigenvalues."""
        chunk_size: int = 64
        mode: str = "chunk"
        """``chunk`` (training) or ``recurrent`` (the core's step-by-step oracle)."""

    mixer_name = "deltanet"

    def __init__(self, cfg: ModelConfig, layer_idx: int, options: Options) -> None:
        super().__init__()
        name = self.mixer_name
        if options.mode not in ("chunk", "recurrent"):
            raise LmlabError(
                f"{name}: mode={options.mode!r} is unknown; set model.mixer_options.{name}.mode "
                "to chunk or recurrent"
            )
        if options.chunk_size < 1 or options.conv_size < 1 or options.head_dim < 0:
            raise LmlabError(
                f"{name}: chunk_size and conv_size must be >= 1 and head_dim >= 0 (got "
                f"{options.chunk_size}, {options.conv_size}, {options.head_dim}); fix "
                f"model.mixer_options.{name}"
            )
        self.n_heads = cfg.n_heads
        self.key_dim = options.head_dim or cfg.resolved_head_dim
        value_dim = self.key_dim * options.expand_v
        if value_dim < 1 or not math.isclose(value_dim, round(value_dim)):
            raise LmlabError(
                f"{name}: head_dim * expand_v = {self.key_dim} * {options.expand_v} is not a "
                f"positive whole number; change model.mixer_options.{name}.expand_v"
            )
        self.value_dim = round(value_dim)
        self.beta_scale = 2.0 if options.allow_neg_eigval else 1.0
        self.chunk_size = options.chunk_size
        self.mode = options.mode
        key_width, value_width = self.n_heads * self.key_dim, self.n_heads * self.value_dim
        self.conv_width = 2 * key_width + value_width
        widths = {"qkv": self.conv_width, "beta": self.n_heads, **self._gate_widths(options)}
        self.names, self.widths = list(widths), list(widths.values())
        self.proj = nn.Linear(cfg.d_model, sum(self.widths), bias=False)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_width, options.conv_size))
        self._build_gates(cfg, options)
        self.out = nn.Linear(value_width, cfg.d_model, bias=False)
        self.reset_parameters()

    def _gate_widths(self, options: Options) -> dict[str, int]:
        """Widths of the further slices of the shared input projection that the decay and the
        output gate read."""
        return {}

    def _build_gates(self, cfg: ModelConfig, options: Options) -> None:
        """Create the output norm and any decay or gate parameters."""
        self.norm = nn.RMSNorm(self.value_dim, eps=cfg.norm_eps)

    def reset_parameters(self) -> None:
        """The short convolution as ``nn.Conv1d`` initialises it (uniform in ``+-1/sqrt(width)``,
        its fan-in); the model's generic init only covers Linear and Embedding weights."""
        bound = 1.0 / math.sqrt(self.conv_weight.shape[1])
        nn.init.uniform_(self.conv_weight, -bound, bound)

    def _log_decay(self, parts: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """``log alpha_t``, ``[B, T, H]`` or ``[B, T, H, K]``; None for no decay."""
        return None

    def _readout(self, o: torch.Tensor, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The per-head output ``[B, T, H, V]`` before the output projection, normalised in the
        norm weight's dtype (float32 under autocast)."""
        return self.norm(o.to(self.norm.weight.dtype))

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        batch, time, _ = x.shape
        parts = dict(zip(self.names, self.proj(x).split(self.widths, dim=-1), strict=True))
        qkv, conv = short_conv(
            parts["qkv"],
            self.conv_weight,
            state=None if state is None else state["conv"],
            activation="silu",
        )
        key_width = self.n_heads * self.key_dim
        q, k, v = qkv.split([key_width, key_width, self.conv_width - 2 * key_width], dim=-1)
        heads = (batch, time, self.n_heads, -1)
        q = F.normalize(q.reshape(heads), dim=-1, eps=1e-6)
        k = F.normalize(k.reshape(heads), dim=-1, eps=1e-6)
        beta = torch.sigmoid(at_least_float32(parts["beta"])) * self.beta_scale
        o, recurrent = gated_delta_rule(
            q,
            k,
            v.reshape(heads),
            beta,
            self._log_decay(parts),
            initial_state=None if state is None else state["recurrent"],
            output_final_state=True,
            mode=self.mode,
            chunk_size=self.chunk_size,
        )
        y = self._readout(o, parts).reshape(batch, time, -1)
        return self.out(y), {"conv": conv, "recurrent": recurrent}

    def extra_flops_per_token(self, context: int) -> float:
        """Forward FLOPs outside nn.Linear: per head and token the delta rule reads the state
        twice (``S^T k`` and ``S^T q``) and writes it once, three ``K x V`` products (the chunked
        form spends about as much); plus the depthwise short convolution."""
        state = 6.0 * self.n_heads * self.key_dim * self.value_dim
        return state + 2.0 * self.conv_weight.numel()
