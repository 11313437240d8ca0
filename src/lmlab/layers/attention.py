"""Causal softmax self-attention (Vaswani et al. 2017) with GQA/MQA and RoPE.

Training runs through ``F.scaled_dot_product_attention`` (a fused flash kernel on CPU and CUDA).
The decode state is a key/value cache that grows by doubling, so appending one token is O(1)
amortised instead of re-copying the whole cache every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config.schema import ModelConfig
from lmlab.layers.position import Rotary
from lmlab.layers.registry import register_token_mixer

KVState = dict


def append_kv(state: KVState | None, k: torch.Tensor, v: torch.Tensor) -> KVState:
    """The cache after appending ``k, v [B, T, H, D]``; without a state, the new keys alone."""
    if state is None:
        return {"k": k, "v": v, "length": k.shape[1]}
    length, new = state["length"], k.shape[1]
    buf_k, buf_v = state["k"], state["v"]
    if torch.is_grad_enabled() or length + new > buf_k.shape[1]:
        capacity = max(length + new, 2 * buf_k.shape[1])
        grown_k = k.new_empty(k.shape[0], capacity, *k.shape[2:])
        grown_v = v.new_empty(v.shape[0], capacity, *v.shape[2:])
        grown_k[:, :length] = buf_k[:, :length]
        grown_v[:, :length] = buf_v[:, :length]
        buf_k, buf_v = grown_k, grown_v
    buf_k[:, length : length + new] = k
    buf_v[:, length : length + new] = v
    return {"k": buf_k, "v": buf_v, "length": length + new}


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int
) -> torch.Tensor:
    """Attention of queries ``[B, Tq, H, D]`` at positions ``offset..`` over keys ``[B, Tk, Hkv, D]``.

    Keys start at position 0, so query i may see keys ``j <= offset + i``.
    """
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    tq, tk = q.shape[2], k.shape[2]
    if offset == 0 and tq == tk:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    elif tq == 1:
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    else:
        rows = torch.arange(tq, device=q.device)[:, None] + offset
        mask = torch.arange(tk, device=q.device)[None, :] <= rows
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return out.transpose(1, 2)


@register_token_mixer("attention")
class Attention(nn.Module):
    """Multi-head attention; ``n_kv_heads < n_heads`` gives GQA, ``n_kv_heads = 1`` MQA."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, options: object) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.resolved_kv_heads
        self.head_dim = cfg.resolved_head_dim
        q_width = self.n_heads * self.head_dim
        kv_width = self.n_kv_heads * self.head_dim
        self.qkv = nn.Linear(cfg.d_model, q_width + 2 * kv_width, bias=False)
        self.out = nn.Linear(q_width, cfg.d_model, bias=False)
        self.rotary = Rotary(self.head_dim, cfg.rope_theta) if cfg.position == "rope" else None

    def forward(
        self, x: torch.Tensor, state: KVState | None = None
    ) -> tuple[torch.Tensor, KVState]:
        batch, time, _ = x.shape
        q_width = self.n_heads * self.head_dim
        kv_width = self.n_kv_heads * self.head_dim
        q, k, v = self.qkv(x).split([q_width, kv_width, kv_width], dim=-1)
        q = q.view(batch, time, self.n_heads, self.head_dim)
        k = k.view(batch, time, self.n_kv_heads, self.head_dim)
        v = v.view(batch, time, self.n_kv_heads, self.head_dim)
        offset = 0 if state is None else state["length"]
        if self.rotary is not None:
            q, k = self.rotary(q, offset), self.rotary(k, offset)
        state = append_kv(state, k, v)
        length = state["length"]
        y = causal_attention(q, state["k"][:, :length], state["v"][:, :length], offset)
        return self.out(y.reshape(batch, time, q_width)), state

    def extra_flops_per_token(self, context: int) -> float:
        """Forward FLOPs of the score and value matmuls per token at this context length
        (full, not causal-halved, context: the PaLM / nanoGPT convention used for MFU)."""
        return 4.0 * self.n_heads * self.head_dim * context
