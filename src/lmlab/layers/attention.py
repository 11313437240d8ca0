"""Causal softmax self-attention (Vaswani et al. 2017) with GQA/MQA and a choice of positions.

Training runs through ``F.scaled_dot_product_attention`` (a fused flash kernel on CPU and CUDA).
The decode state is a key/value cache that grows by doubling, so appending one token is O(1)
amortised instead of re-copying the whole cache every step.

Options of the same mixer:

- ``window > 0``: sliding-window attention (Beltagy et al. 2020; Mistral): query ``i`` sees keys
  ``i - window + 1 .. i``. The decode cache is trimmed to the last ``window - 1`` keys, so its
  memory stays flat however long generation runs.
- ``model.position``: ``rope`` (Su et al.), ``none``, ``alibi`` (Press et al. 2022: logit bias
  ``-slope_h * (i - j)``) or ``cope`` (Golovneva et al. 2024, :class:`CoPE`). ALiBi goes through
  the fused kernel as a float mask; CoPE needs the scores themselves, so it computes attention
  explicitly.
- ``decode_top_k > 0``: at one-token decode with a cache, each head attends only to the k
  highest-scoring cached keys (an approximation; :func:`sparse_decode_gap` measures its cost).
- ``qkv_conv > 0``: a causal depthwise convolution of that width over every query, key and value
  channel after the projection (Primer's multi-dconv-head attention, So et al. 2021). A key then
  carries its preceding tokens, so one layer can match "the token after X" (induction, recall)
  instead of needing a previous-token head in an earlier layer. The decode state adds the
  convolution's tail to the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config.schema import ModelConfig
from lmlab.errors import LmlabError
from lmlab.layers.base import TokenMixer
from lmlab.layers.features import FeatureCounter
from lmlab.layers.position import CoPE, Rotary, alibi_slopes
from lmlab.layers.registry import register_token_mixer
from lmlab.ops.short_conv import short_conv

KVState = dict


def append_kv(state: KVState | None, k: torch.Tensor, v: torch.Tensor) -> KVState:
    """The cache after appending ``k, v [B, T, H, D]``; without a state, the new keys alone."""
    if state is None:
        return {"k": k, "v": v, "length": k.shape[1]}
    length, new = state["length"], k.shape[1]
    buf_k, buf_v = state["k"], state["v"]
    if torch.is_grad_enabled() or length + new > buf_k.shape[1]:
        # Without gradients the buffer doubles so decode appends in place (amortised O(1)); with
        # gradients every call needs a fresh tensor anyway, so it takes exactly what it needs.
        grow = 0 if torch.is_grad_enabled() else 2 * buf_k.shape[1]
        capacity = max(length + new, grow)
        grown_k = k.new_empty(k.shape[0], capacity, *k.shape[2:])
        grown_v = v.new_empty(v.shape[0], capacity, *v.shape[2:])
        grown_k[:, :length] = buf_k[:, :length]
        grown_v[:, :length] = buf_v[:, :length]
        buf_k, buf_v = grown_k, grown_v
    buf_k[:, length : length + new] = k
    buf_v[:, length : length + new] = v
    return {"k": buf_k, "v": buf_v, "length": length + new}


def stack_kv(states: list[KVState]) -> KVState:
    """One cache for the rows of ``states`` (caches of any lengths, themselves stacked or not):
    row ``b``'s keys at ``0 .. lengths[b] - 1``, zeros after (masked, and finite so that a zero
    attention weight times them stays zero), and the per-row ``lengths``."""
    lengths = torch.cat(
        [
            state.get("lengths", torch.full((state["k"].shape[0],), state["length"]))
            for state in states
        ]
    ).to(states[0]["k"].device)
    longest = max(state["length"] for state in states)
    # the largest buffer's room, so that the next tokens do not have to grow it at once
    capacity = max(state["k"].shape[1] for state in states)
    stacked = {}
    for name in ("k", "v"):
        first = states[0][name]
        buffer = first.new_zeros(len(lengths), capacity, *first.shape[2:])
        row = 0
        for state in states:
            rows = state[name].shape[0]
            buffer[row : row + rows, : state["length"]] = state[name][:, : state["length"]]
            row += rows
        stacked[name] = buffer
    return stacked | {"length": longest, "lengths": lengths}


def append_kv_rows(state: KVState, k: torch.Tensor, v: torch.Tensor) -> KVState:
    """A :func:`stack_kv` cache after appending one token ``k, v [B, 1, H, D]`` to each row at
    that row's own length; the buffer doubles when the longest row reaches its end."""
    lengths = state["lengths"]
    longest = int(lengths.max()) + 1
    buf_k, buf_v = state["k"], state["v"]
    if longest > buf_k.shape[1]:
        capacity = max(longest, 2 * buf_k.shape[1])
        grown_k = k.new_zeros(k.shape[0], capacity, *k.shape[2:])
        grown_v = v.new_zeros(v.shape[0], capacity, *v.shape[2:])
        grown_k[:, : state["length"]] = buf_k[:, : state["length"]]
        grown_v[:, : state["length"]] = buf_v[:, : state["length"]]
        buf_k, buf_v = grown_k, grown_v
    rows = torch.arange(k.shape[0], device=k.device)
    buf_k[rows, lengths] = k[:, 0]
    buf_v[rows, lengths] = v[:, 0]
    return {"k": buf_k, "v": buf_v, "length": longest, "lengths": lengths + 1}


def truncate_kv(state: dict, drop: int) -> dict:
    """A length-counted cache (``"length"``: valid entries) without its last ``drop`` entries:
    the buffers stay, the next append overwrites the dropped ones in place."""
    return state | {"length": state["length"] - drop}


def append_window(state: KVState | None, k: torch.Tensor, v: torch.Tensor, window: int) -> tuple:
    """Keys and values visible to the new queries, and the trimmed cache that the next call
    needs (its last ``window - 1`` entries): the cache never exceeds the window."""
    if state is None:
        keys, values, length = k, v, k.shape[1]
    else:
        keys, values = torch.cat([state["k"], k], 1), torch.cat([state["v"], v], 1)
        length = state["length"] + k.shape[1]
    keep = keys.shape[1] - min(window - 1, keys.shape[1])
    return keys, values, {"k": keys[:, keep:], "v": values[:, keep:], "length": length}


def attention_mask(
    tq: int, tk: int, offset: int, key_start: int = 0, window: int = 0, device=None
) -> torch.Tensor:
    """Which keys each query may see, ``[Tq, Tk]`` bool: queries sit at ``offset..``, keys at
    ``key_start..``; causal, and within the last ``window`` positions when ``window > 0``."""
    rows = torch.arange(tq, device=device)[:, None] + offset
    cols = torch.arange(tk, device=device)[None, :] + key_start
    allowed = cols <= rows
    if window:
        allowed &= rows - cols < window
    return allowed


def causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    offset: int,
    key_start: int = 0,
    window: int = 0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of queries ``[B, Tq, H, D]`` at positions ``offset..`` over keys
    ``[B, Tk, Hkv, D]`` at positions ``key_start..`` (see :func:`attention_mask`), plus an
    optional additive logit ``bias [H, Tq, Tk]``."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    gqa = q.shape[1] != k.shape[1]
    tq, tk = q.shape[2], k.shape[2]
    if offset == 0 and key_start == 0 and tq == tk and not window and bias is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        mask = attention_mask(tq, tk, offset, key_start, window, q.device)
        if bias is not None:
            mask = bias.to(q.dtype).masked_fill(~mask, float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return out.transpose(1, 2)


@register_token_mixer("attention")
class Attention(FeatureCounter, TokenMixer):
    """Multi-head attention; ``n_kv_heads < n_heads`` gives GQA, ``n_kv_heads = 1`` MQA."""

    @dataclass
    class Options:
        window: int = 0
        """Sliding window: each query sees its last ``window`` keys (itself included); 0 = all."""
        decode_top_k: int = 0
        """At one-token decode, attend only to the k highest-scoring keys; 0 = exact."""
        cope_positions: int = 64
        """Number of learned CoPE position embeddings (positions beyond are clamped)."""
        qkv_conv: int = 0
        """Width of a causal depthwise convolution over q, k and v (Primer); 0 = none."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, options: Options) -> None:
        super().__init__()
        if (
            min(options.window, options.decode_top_k, options.qkv_conv) < 0
            or options.cope_positions < 2
        ):
            raise LmlabError(
                "model.mixer_options.attention: window, decode_top_k and qkv_conv must be >= 0 "
                "and cope_positions >= 2"
            )
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.resolved_kv_heads
        self.head_dim = cfg.resolved_head_dim
        self.window = options.window
        self.decode_top_k = options.decode_top_k
        self.feature = "sliding_window" if self.window else ""
        self.cache_grows_with_context = not self.window
        q_width = self.n_heads * self.head_dim
        kv_width = self.n_kv_heads * self.head_dim
        self.qkv = nn.Linear(cfg.d_model, q_width + 2 * kv_width, bias=False)
        self.qkv_conv = None
        if options.qkv_conv:
            # Mamba's initialisation of its short convolution.
            bound = options.qkv_conv**-0.5
            weight = torch.empty(q_width + 2 * kv_width, options.qkv_conv).uniform_(-bound, bound)
            self.qkv_conv = nn.Parameter(weight)
        self.out = nn.Linear(q_width, cfg.d_model, bias=False)
        self.rotary = Rotary(self.head_dim, cfg.rope_theta) if cfg.position == "rope" else None
        self.cope = CoPE(self.head_dim, options.cope_positions) if cfg.position == "cope" else None
        slopes = alibi_slopes(self.n_heads) if cfg.position == "alibi" else torch.empty(0)
        self.register_buffer("alibi_slopes", slopes, persistent=False)

    def forward(
        self, x: torch.Tensor, state: KVState | None = None
    ) -> tuple[torch.Tensor, KVState]:
        y, state = self.attend(x, state)
        return self.out(y.flatten(2)), state

    def truncate_state(self, state: KVState, drop: int) -> KVState | None:
        """Cut the cache; a windowed cache (its oldest keys are gone) or a ``qkv_conv`` tail
        (the convolution folded the tokens in) cannot be cut: None, the model recomputes."""
        if self.window or self.qkv_conv is not None:
            return None
        return truncate_kv(state, drop)

    def attend(self, x: torch.Tensor, state: KVState | None = None) -> tuple[torch.Tensor, KVState]:
        """Per-head outputs ``[B, T, H, D]`` before the output projection, and the new cache
        (subclasses such as mixture-of-heads weight the heads in between)."""
        batch, time, _ = x.shape
        q_width = self.n_heads * self.head_dim
        kv_width = self.n_kv_heads * self.head_dim
        qkv = self.qkv(x)
        conv_tail = None
        if self.qkv_conv is not None:
            qkv, conv_tail = short_conv(qkv, self.qkv_conv, state=state and state["conv"])
        q, k, v = qkv.split([q_width, kv_width, kv_width], dim=-1)
        q = q.view(batch, time, self.n_heads, self.head_dim)
        k = k.view(batch, time, self.n_kv_heads, self.head_dim)
        v = v.view(batch, time, self.n_kv_heads, self.head_dim)
        if state is not None and "lengths" in state:
            return self._attend_rows(q, k, v, state)
        offset = 0 if state is None else state["length"]
        if self.rotary is not None:
            q, k = self.rotary(q, offset), self.rotary(k, offset)
        if self.window:
            keys, values, state = append_window(state, k, v, self.window)
            if self.training:
                self.count_call()
        else:
            state = append_kv(state, k, v)
            keys, values = state["k"][:, : state["length"]], state["v"][:, : state["length"]]
        key_start = offset + time - keys.shape[1]
        top_k = self.decode_top_k if time == 1 and offset > 0 else 0
        if self.cope is not None or 0 < top_k < keys.shape[1]:
            y = self._scored_attention(q, keys, values, offset, key_start, top_k)
        else:
            bias = self._alibi_bias(time, keys.shape[1], offset, key_start)
            y = causal_attention(q, keys, values, offset, key_start, self.window, bias)
        if conv_tail is not None:
            state = state | {"conv": conv_tail}
        return y, state

    def stack_states(self, states: list[KVState]) -> KVState | None:
        """Caches of any lengths as one (:func:`stack_kv`) for the plain configurations
        (RoPE or no positions, no window, no CoPE, no ALiBi, exact decode, no q/k/v
        convolution); None for the others, whose caches then stack only at equal lengths."""
        plain = not (self.window or self.decode_top_k or self.alibi_slopes.numel())
        if not plain or self.cope is not None or self.qkv_conv is not None:
            return None
        return stack_kv(states)

    def _attend_rows(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: KVState
    ) -> tuple[torch.Tensor, KVState]:
        """One decode step over a :func:`stack_kv` cache: each row's token at its own
        position, attending to its own keys only."""
        if q.shape[1] != 1:
            raise ValueError("a cache of rows with different lengths decodes one token at a time")
        lengths = state["lengths"]
        if self.rotary is not None:
            q, k = self.rotary(q, lengths), self.rotary(k, lengths)
        state = append_kv_rows(state, k, v)
        keys, values = state["k"][:, : state["length"]], state["v"][:, : state["length"]]
        visible = torch.arange(keys.shape[1], device=q.device)[None, :] < state["lengths"][:, None]
        q, keys, values = (t.transpose(1, 2) for t in (q, keys, values))
        y = F.scaled_dot_product_attention(
            q,
            keys,
            values,
            attn_mask=visible[:, None, None, :],
            enable_gqa=q.shape[1] != keys.shape[1],
        )
        return y.transpose(1, 2), state

    def _alibi_bias(self, tq: int, tk: int, offset: int, key_start: int) -> torch.Tensor | None:
        """``-slope_h * (i - j)`` for each head, query ``i`` and key ``j``; None without ALiBi."""
        if not self.alibi_slopes.numel():
            return None
        rows = torch.arange(tq, device=self.alibi_slopes.device)[:, None] + offset
        cols = torch.arange(tk, device=self.alibi_slopes.device)[None, :] + key_start
        return -self.alibi_slopes[:, None, None] * (rows - cols)

    def _scored_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        offset: int,
        key_start: int,
        top_k: int,
    ) -> torch.Tensor:
        """Attention with the logits materialised: CoPE reads them to count positions, top-k
        decode keeps only the largest. Shapes as :func:`causal_attention`."""
        groups = self.n_heads // self.n_kv_heads
        q = q.transpose(1, 2)
        k, v = (t.repeat_interleave(groups, dim=2).transpose(1, 2) for t in (k, v))
        tq, tk = q.shape[2], k.shape[2]
        logits = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5
        bias = self._alibi_bias(tq, tk, offset, key_start)
        if bias is not None:
            logits = logits + bias.to(logits.dtype)
        mask = attention_mask(tq, tk, offset, key_start, self.window, q.device)
        logits = logits.masked_fill(~mask, float("-inf"))
        if self.cope is not None:
            logits = logits + self.cope(q, logits)
        if top_k:
            threshold = logits.topk(top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < threshold, float("-inf"))
        return (logits.softmax(-1) @ v).transpose(1, 2)

    def cache_bytes_per_token(self, dtype: torch.dtype = torch.float32) -> int:
        """Decode-cache memory per token: a key and a value per key/value head."""
        return 2 * self.n_kv_heads * self.head_dim * torch.empty(0, dtype=dtype).element_size()

    def extra_flops_per_token(self, context: int) -> float:
        """Forward FLOPs of the score and value matmuls per token at this context length
        (full, not causal-halved, context: the PaLM / nanoGPT convention used for MFU); a
        sliding window caps the context."""
        if self.window:
            context = min(context, self.window)
        return 4.0 * self.n_heads * self.head_dim * context


@torch.no_grad()
def sparse_decode_gap(model: nn.Module, tokens: torch.Tensor, prefix: int, top_k: int) -> dict:
    """Exact vs top-k decode of ``tokens [B, T]`` after a ``prefix``-token prefill: the largest
    absolute logit difference and the next-token loss of each, over the decoded positions."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    saved = [m.decode_top_k for m in layers]
    results = {}
    try:
        for name, k in (("exact", 0), ("sparse", top_k)):
            for m in layers:
                m.decode_top_k = k
            _, state = model(tokens[:, :prefix])
            steps = []
            for t in range(prefix, tokens.shape[1] - 1):
                logits, state = model(tokens[:, t : t + 1], state)
                steps.append(logits)
            results[name] = torch.cat(steps, 1)
    finally:
        for m, k in zip(layers, saved, strict=True):
            m.decode_top_k = k
    targets = tokens[:, prefix + 1 :]

    def loss(logits: torch.Tensor) -> float:
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).item()

    exact, sparse = results["exact"], results["sparse"]
    return {
        "max_abs_logit_diff": (exact - sparse).abs().max().item(),
        "loss_exact": loss(exact),
        "loss_sparse": loss(sparse),
        "loss_gap": loss(sparse) - loss(exact),
    }
