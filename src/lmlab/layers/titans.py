"""Titans, the MAG arrangement (Behrouz, Zhong & Mirrokni 2025, "Titans: Learning to Memorize at
Test Time", section 4.2, "Memory as a Gate"): a neural long-term memory branch gating a
sliding-window attention branch, with persistent memory tokens.

- Persistent memory: ``persistent_tokens`` learnable vectors ``P`` are prepended to the stream,
  ``x~ = [P; x]``. Both branches read them: the attention keeps their keys and values visible to
  every query (outside the window), and the memory consumes them first, before the first real
  token (so they shape its initial content).
- Attention branch: causal sliding-window softmax attention over ``x~`` (window ``window``,
  RoPE at absolute positions on the real tokens; the persistent keys carry no position).
- Memory branch: ``q, k, v = silu(conv(x W))`` with a causal depthwise convolution (the paper's
  implementation details), ``q, k`` L2-normalised per head, and the data-dependent learning rate
  ``theta = max_lr * sigmoid(.)``, momentum ``eta = sigmoid(.)`` and forgetting gate
  ``alpha = sigmoid(.)`` per head and token, into :func:`lmlab.ops.neural_memory` (linear memory,
  or the 2-layer MLP memory with ``memory: mlp``). The memory's initial weights
  are learnt (the outer loop's parameters).
- Gate: ``o = norm_a(y_attn) * sigmoid(norm_m(y_mem))`` per head with learnable RMS-norm weights
  (the paper normalises both branches with learnable vector-valued weights and combines them
  with a non-linear gate), then the output projection.

Deviations: one matmul makes both branches' projections and the gates; the gates' biases start
at ``eta ~ 0.88`` and ``alpha ~ 0.018`` (the paper does not say). The decode state is the
window's keys and values, the convolution tail, the memory's :class:`MemoryState` and the
position; its size does not grow with the context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config.schema import ModelConfig
from lmlab.errors import LmlabError
from lmlab.layers.base import TokenMixer
from lmlab.layers.common import at_least_float32, check_core_options
from lmlab.layers.registry import register_token_mixer
from lmlab.ops.neural_memory import MEMORIES, neural_memory
from lmlab.ops.rope import apply_rope, rope_tables
from lmlab.ops.short_conv import short_conv

# Initial gate biases: momentum decay sigmoid(2) ~ 0.88, forgetting sigmoid(-4) ~ 0.018.
_GATE_BIAS = (0.0, 2.0, -4.0)


@register_token_mixer("titans")
class Titans(TokenMixer):
    """Sliding-window attention gated by a neural memory trained at test time (MAG)."""

    @dataclass
    class Options:
        head_dim: int = 0
        """Per-head size of both branches; 0 takes the model's head size."""
        memory: str = "linear"
        """``linear`` (``M(k) = k M``) or ``mlp`` (the 2-layer ``silu(k W_1) W_2``)."""
        mlp_expand: int = 2
        """Hidden width of the MLP memory as a multiple of head_dim."""
        window: int = 64
        """Tokens each query attends to (itself included), besides the persistent ones."""
        persistent_tokens: int = 4
        """Learnable tokens prepended to the stream (0: none)."""
        conv_size: int = 4
        """Kernel width of the causal depthwise convolution on the memory's q, k, v."""
        max_lr: float = 0.5
        """Largest inner learning rate theta (0.5 with unit keys: at most an exact write)."""
        chunk_size: int = 16
        """Tokens whose memory gradients are taken at the same memory (the paper's b)."""
        mode: str = "chunk"
        """``chunk`` or ``recurrent`` (the token-by-token oracle)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, options: Options) -> None:
        super().__init__()
        check_core_options("titans", options.mode, options.chunk_size)
        if options.memory not in MEMORIES:
            raise LmlabError(
                f"titans: memory={options.memory!r} is unknown; set "
                "model.mixer_options.titans.memory to linear or mlp"
            )
        small = {"window": 1, "conv_size": 1, "mlp_expand": 1, "persistent_tokens": 0}
        for field, low in small.items():
            if getattr(options, field) < low:
                raise LmlabError(
                    f"titans: {field}={getattr(options, field)} must be at least {low}; fix "
                    f"model.mixer_options.titans.{field}"
                )
        if options.max_lr <= 0 or options.head_dim < 0:
            raise LmlabError("titans: need max_lr > 0 and head_dim >= 0")
        self.options = options
        self.mode = options.mode
        self.n_heads = cfg.n_heads
        self.head_dim = options.head_dim or cfg.resolved_head_dim
        if self.head_dim % 2:
            raise LmlabError(
                f"titans: RoPE needs an even head_dim, got {self.head_dim}; change "
                "model.mixer_options.titans.head_dim"
            )
        self.width = self.n_heads * self.head_dim
        self.widths = [3 * self.width, 3 * self.width, 3 * self.n_heads]
        self.proj = nn.Linear(cfg.d_model, sum(self.widths), bias=False)
        self.conv_weight = nn.Parameter(torch.empty(3 * self.width, options.conv_size))
        self.gate_bias = nn.Parameter(torch.empty(3, self.n_heads))
        self.persistent = (
            nn.Parameter(torch.empty(options.persistent_tokens, cfg.d_model))
            if options.persistent_tokens
            else None
        )
        d = self.head_dim
        shapes = [(d, d)] if options.memory == "linear" else [(d, options.mlp_expand * d)]
        if options.memory == "mlp":
            shapes.append((options.mlp_expand * d, d))
        self.memory_init = nn.ParameterList(
            nn.Parameter(torch.empty(self.n_heads, *shape)) for shape in shapes
        )
        self.attn_norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.memory_norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.rope_theta = cfg.rope_theta
        self.init_std = cfg.init_std
        self.out = nn.Linear(self.width, cfg.d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Convolution as ``nn.Conv1d``; persistent tokens like embeddings; the memory's initial
        weights with fan-in scaling, the last layer small (a memory that starts nearly empty)."""
        with torch.no_grad():
            bound = self.conv_weight.shape[1] ** -0.5
            self.conv_weight.uniform_(-bound, bound)
            self.gate_bias.copy_(torch.tensor(_GATE_BIAS)[:, None].expand_as(self.gate_bias))
            if self.persistent is not None:
                self.persistent.normal_(0.0, self.init_std)
            for i, weight in enumerate(self.memory_init):
                last = i == len(self.memory_init) - 1
                weight.normal_(0.0, 0.02 if last else weight.shape[-2] ** -0.5)

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        batch, time, _ = x.shape
        prefix = self.options.persistent_tokens if state is None else 0
        if prefix:  # the stream starts: the persistent tokens come first
            x = torch.cat((self.persistent.to(x.dtype).expand(batch, -1, -1), x), dim=1)
        attn_qkv, memory_qkv, gates = self.proj(x).split(self.widths, dim=-1)
        memory_qkv, conv = short_conv(
            memory_qkv,
            self.conv_weight,
            state=None if state is None else state["conv"],
            activation="silu",
        )
        heads = (batch, prefix + time, self.n_heads, self.head_dim)
        y_mem, memory = self._memory(memory_qkv.reshape(*heads[:2], 3, -1), gates, state)
        y_attn, window, position = self._attention(attn_qkv, heads, prefix, state)
        y = self.attn_norm(y_attn.to(self.attn_norm.weight.dtype)) * torch.sigmoid(
            self.memory_norm(y_mem[:, prefix:].to(self.memory_norm.weight.dtype))
        )
        new_state = {"conv": conv, "memory": memory, "window": window, "position": position}
        return self.out(y.reshape(batch, time, self.width).to(x.dtype)), new_state

    def _memory(
        self, qkv: torch.Tensor, gates: torch.Tensor, state: dict | None
    ) -> tuple[torch.Tensor, object]:
        batch, time = qkv.shape[:2]
        heads = (batch, time, self.n_heads, self.head_dim)
        q, k, v = (qkv[:, :, i].reshape(heads) for i in range(3))
        q, k = F.normalize(q, dim=-1, eps=1e-6), F.normalize(k, dim=-1, eps=1e-6)
        pre = at_least_float32(gates).unflatten(-1, (3, self.n_heads)) + self.gate_bias
        lr = self.options.max_lr * torch.sigmoid(pre[..., 0, :])
        log_momentum = F.logsigmoid(pre[..., 1, :])
        log_retain = F.logsigmoid(-pre[..., 2, :])  # log(1 - alpha)
        if state is None:
            start = tuple(w.expand(batch, *w.shape) for w in self.memory_init)
        else:
            start = state["memory"]
        return neural_memory(
            q,
            k,
            v,
            lr,
            log_momentum,
            log_retain,
            initial_state=start,
            memory=self.options.memory,
            output_final_state=True,
            mode=self.mode,
            chunk_size=self.options.chunk_size,
        )

    def _attention(
        self, qkv: torch.Tensor, heads: tuple[int, ...], prefix: int, state: dict | None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], int]:
        """Sliding-window attention of the real tokens; the persistent keys are always seen."""
        batch, _, n_heads, dim = heads
        q, k, v = qkv.reshape(*heads[:2], 3, n_heads, dim).unbind(2)
        if prefix or self.persistent is None:
            persistent_k, persistent_v = k[:, :prefix], v[:, :prefix]
        else:  # recomputed from the parameters rather than kept in the state
            pkv = self.proj(self.persistent.to(qkv.dtype)).split(self.widths, dim=-1)[0]
            persistent_k, persistent_v = (
                pkv.reshape(1, -1, 3, n_heads, dim).expand(batch, -1, -1, -1, -1)[:, :, i]
                for i in (1, 2)
            )
        q, k, v = q[:, prefix:], k[:, prefix:], v[:, prefix:]
        time = q.shape[1]
        start = 0 if state is None else state["position"]
        positions = torch.arange(start, start + time, device=q.device)
        cos, sin = rope_tables(positions, dim, self.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if state is not None:
            cached_k, cached_v = state["window"]
            k, v = torch.cat((cached_k, k), dim=1), torch.cat((cached_v, v), dim=1)
        y = _window_attention(q, k, v, persistent_k, persistent_v, self.options.window)
        keep = max(k.shape[1] - (self.options.window - 1), 0)  # the next queries' past
        window = (k[:, keep:], v[:, keep:])
        return y, window, start + time

    def extra_flops_per_token(self, context: int) -> float:
        """Attention scores and values over the window and the persistent tokens, the depthwise
        convolution, and the memory: for the linear memory about eight ``D x D`` products per
        head and token plus the chunk's ``Q K^T`` terms; for the MLP about three MLP passes
        plus two such terms."""
        o, d = self.options, self.head_dim
        seen = min(context, o.window) + o.persistent_tokens
        attention = 4.0 * self.width * seen
        if o.memory == "linear":
            memory = self.n_heads * (8.0 * d * d + 4.0 * o.chunk_size * d)
        else:
            memory = self.n_heads * (12.0 * d * d * o.mlp_expand + 4.0 * o.chunk_size * d)
        return attention + memory + 2.0 * self.conv_weight.numel()


def _window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    persistent_k: torch.Tensor,
    persistent_v: torch.Tensor,
    window: int,
) -> torch.Tensor:
    """Causal sliding-window attention in blocks, linear in the length: the ``T`` queries
    (``[B, T, H, D]``, the last ``T`` of the ``L`` keys ``k, v``) go in blocks of
    ``b = min(window, T)``; each block sees the ``window + b`` keys ending at its last query
    (masked to each query's own window and to real keys) plus every persistent key."""
    time = q.shape[1]
    block = min(window, time)
    n = -(-time // block)
    # Pad the keys by a window in front (before the stream or the cache) and the queries to
    # whole blocks; keys for block i start at padded index (L - T) + i * block.
    first = k.shape[1] - time
    k, v = (F.pad(x, (0, 0, 0, 0, window, n * block - time))[:, first:] for x in (k, v))
    k_blocks, v_blocks = (
        x.unfold(1, window + block, block).permute(0, 1, 2, 4, 3) for x in (k, v)
    )  # [B, n, H, window + block, D]
    q = F.pad(q, (0, 0, 0, 0, 0, n * block - time)).unflatten(1, (n, block)).transpose(2, 3)
    rows = torch.arange(block, device=q.device)[:, None]
    cols = torch.arange(window + block, device=q.device)[None, :]
    in_window = (cols > rows) & (cols <= rows + window)  # lag = rows - cols + window
    # Column c of block i is key (first + i * block - window + c): real when >= 0.
    real = (block * torch.arange(n, device=q.device)[:, None] + cols) >= window - first
    visible = in_window & real[:, None, :]  # [n, block, window + block]
    persistent = persistent_k.shape[1]
    visible = torch.cat((visible.new_ones(n, block, persistent), visible), dim=-1)
    keys = torch.cat((persistent_k.transpose(1, 2)[:, None].expand(-1, n, -1, -1, -1), k_blocks), 3)
    values = torch.cat(
        (persistent_v.transpose(1, 2)[:, None].expand(-1, n, -1, -1, -1), v_blocks), 3
    )
    y = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible[None, :, None])
    return y.transpose(2, 3).flatten(1, 2)[:, :time]
