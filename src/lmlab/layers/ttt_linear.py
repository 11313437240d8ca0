"""TTT-Linear (Sun et al. 2024, "Learning to (Learn at Test Time): RNNs with Expressive Hidden
States"), after the TTT layer of the official test-time-training/ttt-lm-pytorch.

Each head's hidden state is a linear model ``W, b`` trained on the fly by mini-batch gradient
descent on ``0.5 ||LN(k W + b) - (v - k)||^2`` (see :mod:`lmlab.ops.ttt_linear`); the output
reads it with the query, ``q + LN(q W + b)``. What is followed from the official layer:

- ``q, k, v = x W_Q, x W_K, x W_V`` split into heads; RoPE on ``q, k`` with positions taken
  modulo the mini-batch size (the official code's ``position_ids % mini_batch_size``);
- the inner learning rate ``lr = base_lr * sigmoid(x W_lr) / head_dim`` per head and token;
- the learnable initial inner weights ``W_0 ~ N(0, 0.02)``, ``b_0 = 0`` per head, and the inner
  LN's ``ln_weight = 1, ln_bias = 0`` per head (eps 1e-6);
- the output ``LayerNorm`` over all heads (``post_norm``), then (``gate``, as in the paper's
  Mamba backbone, on by default) ``* gelu_tanh(x W_g)``, then the output projection.

Deviations: one matmul makes q, k, v, the gate and the learning rate (same weights as the
official separate projections); the learning-rate gate has no bias (``sigmoid(x W_lr)`` as the
issue asks); the official learnable offset of the ``1/(i+1)`` step factor and the Mamba
backbone's causal convolution before q and k are not carried over. The decode state is the
core's :class:`~lmlab.ops.ttt_linear.TTTLinearState` (the open mini-batch's initial weights,
accumulated gradients and position), so prefill, decode and segments cut mid-mini-batch all
continue the same stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config.schema import ModelConfig
from lmlab.errors import LmlabError
from lmlab.layers.base import TokenMixer
from lmlab.layers.common import at_least_float32
from lmlab.layers.registry import register_token_mixer
from lmlab.ops.rope import apply_rope, rope_tables
from lmlab.ops.ttt_linear import ttt_linear


@register_token_mixer("ttt_linear")
class TTTLinear(TokenMixer):
    """A linear inner model per head, trained by gradient descent as the sequence is read."""

    @dataclass
    class Options:
        head_dim: int = 0
        """Per-head size D (the inner model is D x D); 0 takes the model's head size."""
        mini_batch_size: int = 16
        """Tokens per inner gradient step (the paper's b; 16 as in the paper)."""
        base_lr: float = 1.0
        """The inner learning rate's scale (the official ``ttt_base_lr``)."""
        gate: bool = True
        """Multiply the normalised output by ``gelu_tanh(x W_g)`` (the paper's Mamba backbone)."""
        rope: bool = True
        """RoPE on q and k at positions modulo the mini-batch size (the official layer)."""
        mode: str = "chunk"
        """``chunk`` (the dual form) or ``recurrent`` (the token-by-token oracle)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, options: Options) -> None:
        super().__init__()
        if options.mode not in ("chunk", "recurrent"):
            raise LmlabError(
                f"ttt_linear: mode={options.mode!r} is unknown; set "
                "model.mixer_options.ttt_linear.mode to chunk or recurrent"
            )
        if options.mini_batch_size < 1 or options.head_dim < 0 or options.base_lr <= 0:
            raise LmlabError(
                "ttt_linear: need mini_batch_size >= 1, head_dim >= 0 and base_lr > 0 (got "
                f"{options.mini_batch_size}, {options.head_dim}, {options.base_lr}); fix "
                "model.mixer_options.ttt_linear"
            )
        self.n_heads = cfg.n_heads
        self.head_dim = options.head_dim or cfg.resolved_head_dim
        if options.rope and self.head_dim % 2:
            raise LmlabError(
                f"ttt_linear: RoPE needs an even head_dim, got {self.head_dim}; change "
                "model.mixer_options.ttt_linear.head_dim or set rope=false"
            )
        self.options = options
        self.mode = options.mode
        self.width = self.n_heads * self.head_dim
        self.widths = [3 * self.width, self.width if options.gate else 0, self.n_heads]
        self.proj = nn.Linear(cfg.d_model, sum(self.widths), bias=False)
        self.weight0 = nn.Parameter(torch.empty(self.n_heads, self.head_dim, self.head_dim))
        self.bias0 = nn.Parameter(torch.empty(self.n_heads, 1, self.head_dim))
        self.ln_weight = nn.Parameter(torch.empty(self.n_heads, self.head_dim))
        self.ln_bias = nn.Parameter(torch.empty(self.n_heads, self.head_dim))
        self.post_norm = nn.LayerNorm(self.width, eps=1e-6)
        self.rope_theta = cfg.rope_theta
        self.out = nn.Linear(self.width, cfg.d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation of the inner model and its LN."""
        with torch.no_grad():
            self.weight0.normal_(0.0, 0.02)
            self.bias0.zero_()
            self.ln_weight.fill_(1.0)
            self.ln_bias.zero_()

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        batch, time, _ = x.shape
        qkv, gate, lr = self.proj(x).split(self.widths, dim=-1)
        heads = (batch, time, self.n_heads, self.head_dim)
        q, k, v = (t.reshape(heads) for t in qkv.split(self.width, dim=-1))
        mini_batch = self.options.mini_batch_size
        inner = None if state is None else state["ttt"]
        if self.options.rope:
            seen = 0 if inner is None else inner.seen
            positions = torch.arange(seen, seen + time, device=x.device) % mini_batch
            cos, sin = rope_tables(positions, self.head_dim, self.rope_theta)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        lr = torch.sigmoid(at_least_float32(lr)) * (self.options.base_lr / self.head_dim)
        if inner is None:
            start = {
                "initial_state": self.weight0.expand(batch, -1, -1, -1),
                "initial_state_bias": self.bias0.expand(batch, -1, -1, -1),
            }
        else:
            start = {"initial_state": inner}
        o, inner = ttt_linear(
            q,
            k,
            v,
            self.ln_weight,
            self.ln_bias,
            lr,
            mini_batch_size=mini_batch,
            output_final_state=True,
            mode=self.mode,
            **start,
        )
        y = self.post_norm(o.reshape(batch, time, self.width).to(self.post_norm.weight.dtype))
        if self.options.gate:
            y = y * F.gelu(gate, approximate="tanh").to(y.dtype)
        return self.out(y), {"ttt": inner}

    def extra_flops_per_token(self, context: int) -> float:
        """Per head and token: ``k W_0``, ``q W_0`` and the gradient ``K^T dZ`` (three ``D x D``
        products), plus ``Q K^T`` and the within-mini-batch steps over ``b`` tokens."""
        d, b = self.head_dim, self.options.mini_batch_size
        return float(self.n_heads * (6 * d * d + 4 * b * d))
