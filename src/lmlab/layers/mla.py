"""Multi-head latent attention (MLA, DeepSeek-V2, DeepSeek-AI 2024).

Keys and values are rebuilt from one small latent per token, so the decode cache holds only
that latent plus a single RoPE key shared by all heads:

    c_t = RMSNorm(W_DKV x_t)                      [kv_lora_rank]      (cached)
    k^R_t = RoPE(W_KR x_t)                        [rope_head_dim]     (cached, shared by heads)
    k_{t,h} = [W_UK,h c_t ; k^R_t],  v_{t,h} = W_UV,h c_t
    q_{t,h} = [W_UQ,h cq_t ; RoPE(W_QR,h cq_t)],  cq_t = RMSNorm(W_DQ x_t) (x_t if no q_lora_rank)
    o_{t,h} = softmax_s(q_{t,h} . k_{s,h} / sqrt(head_dim + rope_head_dim)) v_{s,h}

RoPE cannot go through the up-projection (it depends on the position), hence the decoupled rope
key. Training and prefill expand the latent into per-head keys and values and use the fused
kernel; with a cache the up-projections are absorbed into the query and the output
(``q W_UK`` scores latents directly, ``W_UV`` applied after the weighted sum), so decode never
materialises per-head keys. Absorbing assumes ``kv_up`` is a plain linear map of the latent;
when it is not (a ternary ``BitLinear``, which also quantises its input), decode expands the
cached latents instead, exact and slower.

``differential=True`` (differential MLA, as in seed 000's SIGMA): each head's query and key
(nope and rope parts alike) split into two halves that give two softmax maps over the same
values, combined by DIFF Transformer's read-out (:mod:`lmlab.layers.differential`):

    A_j = softmax([q^N_j ; q^R_j] . [k^N_j ; k^R_j] / sqrt((head_dim + rope_head_dim) / 2))
    o_h = RMSNorm(A_1 v - lambda A_2 v) * (1 - lambda_init)

The rope halves are rotated separately (as ``diff_attention`` does), so each map stays
relative-position; the cache is unchanged. Deviation: the decoupled key always uses RoPE, whatever
``model.position`` says (it is part of MLA's design); nope/value head widths both equal
``head_dim``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config.schema import ModelConfig
from lmlab.errors import LmlabError
from lmlab.layers.attention import append_kv, attention_mask, causal_attention, truncate_kv
from lmlab.layers.base import TokenMixer
from lmlab.layers.differential import DifferentialReadout
from lmlab.layers.position import Rotary
from lmlab.layers.registry import register_token_mixer


@register_token_mixer("mla")
class MultiHeadLatentAttention(TokenMixer):
    """MLA; the state is ``{"latent", "k_rope", "length"}`` (a cache growing by doubling)."""

    cache_grows_with_context = True
    """Its decode cache keeps every past token (see the trainer's truncated-BPTT check)."""

    @dataclass
    class Options:
        kv_lora_rank: int = 0
        """Width of the cached key/value latent; 0 means 4 * head_dim (DeepSeek-V2's ratio)."""
        q_lora_rank: int = 0
        """Width of the query latent; 0 projects queries directly."""
        rope_head_dim: int = 0
        """Width of the decoupled RoPE query/key; 0 means head_dim // 2 (DeepSeek-V2's ratio)."""
        differential: bool = False
        """Two softmax maps per head, subtracted with a learned lambda (DIFF Transformer)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, options: Options) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.resolved_head_dim
        self.kv_rank = options.kv_lora_rank or 4 * self.head_dim
        self.rope_dim = options.rope_head_dim or self.head_dim // 2
        self.maps = 2 if options.differential else 1
        if (
            self.rope_dim % (2 * self.maps)
            or min(self.kv_rank, self.rope_dim, options.q_lora_rank) < 0
        ):
            raise LmlabError(
                "model.mixer_options.mla: rope_head_dim must be even and positive (a multiple of "
                "4 with differential), kv_lora_rank and q_lora_rank non-negative"
            )
        if self.head_dim % self.maps:
            raise LmlabError(
                f"model.mixer_options.mla.differential needs an even head_dim, got "
                f"{self.head_dim}; change model.d_model, model.n_heads or model.head_dim"
            )
        q_width = self.n_heads * (self.head_dim + self.rope_dim)
        if options.q_lora_rank:
            self.q_down = nn.Linear(cfg.d_model, options.q_lora_rank, bias=False)
            self.q_norm = nn.RMSNorm(options.q_lora_rank, eps=cfg.norm_eps)
            self.q_up = nn.Linear(options.q_lora_rank, q_width, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.d_model, q_width, bias=False)
        self.kv_down = nn.Linear(cfg.d_model, self.kv_rank + self.rope_dim, bias=False)
        self.kv_norm = nn.RMSNorm(self.kv_rank, eps=cfg.norm_eps)
        self.kv_up = nn.Linear(self.kv_rank, self.n_heads * 2 * self.head_dim, bias=False)
        self.out = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)
        self.rotary = Rotary(self.rope_dim // self.maps, cfg.rope_theta)
        self.qk_width = (self.head_dim + self.rope_dim) // self.maps
        if options.differential:
            self.differential = DifferentialReadout(
                self.head_dim, self.qk_width, layer_idx, cfg.norm_eps
            )

    def reset_parameters(self) -> None:
        if self.maps == 2:
            self.differential.reset_parameters()

    def _rotate(self, t: torch.Tensor, offset: int) -> torch.Tensor:
        """RoPE on ``[B, T, H, rope_dim]``, each map's half on its own when differential."""
        rotated = self.rotary(t.reshape(*t.shape[:2], -1, self.rope_dim // self.maps), offset)
        return rotated.reshape(t.shape)

    def _map_slices(self) -> list[tuple[slice, slice]]:
        """The (nope, rope) slices of the query and key that each attention map reads."""
        nope, rope = self.head_dim // self.maps, self.rope_dim // self.maps
        return [
            (slice(i * nope, (i + 1) * nope), slice(i * rope, (i + 1) * rope))
            for i in range(self.maps)
        ]

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x)
        return self.q_up(self.q_norm(self.q_down(x)))

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        batch, time, _ = x.shape
        heads, dim = self.n_heads, self.head_dim
        offset = 0 if state is None else state["length"]
        q = self._queries(x).view(batch, time, heads, dim + self.rope_dim)
        q_nope, q_rope = q.split([dim, self.rope_dim], -1)
        q_rope = self._rotate(q_rope, offset)
        latent, k_rope = self.kv_down(x).split([self.kv_rank, self.rope_dim], -1)
        latent = self.kv_norm(latent)
        k_rope = self._rotate(k_rope[:, :, None], offset)[:, :, 0]
        previous = state and {"k": state["latent"], "v": state["k_rope"], "length": offset}
        cache = append_kv(previous, latent, k_rope)
        length = cache["length"]
        state = {"latent": cache["k"], "k_rope": cache["v"], "length": length}
        latents, rope_keys = cache["k"][:, :length], cache["v"][:, :length]
        if offset == 0 or type(self.kv_up) is not nn.Linear:
            maps = self._expanded(q_nope, q_rope, latents, rope_keys, offset)
        else:
            maps = self._absorbed(q_nope, q_rope, latents, rope_keys, offset)
        y = self.differential(*maps) if self.maps == 2 else maps[0]
        return self.out(y.reshape(batch, time, heads * dim)), state

    def _expanded(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        latents: torch.Tensor,
        rope_keys: torch.Tensor,
        offset: int,
    ) -> list[torch.Tensor]:
        """Per-head keys and values from the latents, then the fused kernel (one call per map;
        its scale is 1/sqrt of the map's query width)."""
        batch, _, heads, dim = q_nope.shape
        k_nope, v = self.kv_up(latents).view(batch, -1, heads, 2 * dim).split([dim, dim], -1)
        k_rope = rope_keys[:, :, None].expand(-1, -1, heads, -1)
        return [
            causal_attention(
                torch.cat([q_nope[..., nope], q_rope[..., rope]], -1),
                torch.cat([k_nope[..., nope], k_rope[..., rope]], -1),
                v,
                offset,
            )
            for nope, rope in self._map_slices()
        ]

    def _absorbed(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        latents: torch.Tensor,
        rope_keys: torch.Tensor,
        offset: int,
    ) -> list[torch.Tensor]:
        """With a cache: scores and the weighted sum stay in latent space (weights absorbed)."""
        heads, dim = self.n_heads, self.head_dim
        up = self.kv_up.weight.view(heads, 2 * dim, self.kv_rank)
        w_k, w_v = up[:, :dim], up[:, dim:]
        mask = attention_mask(q_nope.shape[1], latents.shape[1], offset, device=latents.device)
        outputs = []
        for nope, rope in self._map_slices():
            q_latent = torch.einsum("bthd,hdr->bhtr", q_nope[..., nope], w_k[:, nope])
            scores = q_latent @ latents[:, None].transpose(-1, -2)
            keys = rope_keys[:, None, :, rope].transpose(-1, -2)
            scores = (scores + q_rope[..., rope].transpose(1, 2) @ keys) * self.qk_width**-0.5
            weights = F.softmax(scores.masked_fill(~mask, float("-inf")), -1)
            outputs.append(torch.einsum("bhts,bsr,hdr->bthd", weights, latents, w_v))
        return outputs

    def truncate_state(self, state: dict, drop: int) -> dict:
        """A cache of latents and rope keys counted by ``length``: cut it."""
        return truncate_kv(state, drop)

    def cache_bytes_per_token(self, dtype: torch.dtype = torch.float32) -> int:
        """Decode-cache memory per token: the latent plus the shared rope key."""
        return (self.kv_rank + self.rope_dim) * torch.empty(0, dtype=dtype).element_size()

    def extra_flops_per_token(self, context: int) -> float:
        """Score and value matmuls per token at this context (as attention, expanded form); a
        differential head computes one more value sum."""
        scores = self.head_dim + self.rope_dim
        return 2.0 * self.n_heads * (scores + self.maps * self.head_dim) * context
