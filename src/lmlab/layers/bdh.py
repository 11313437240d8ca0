"""BDH, the "Baby Dragon Hatchling" layer (Kosowski et al. 2025, "The Dragon Hatchling: the
missing link between the Transformer and models of the brain"), after pathwaysai/bdh ``bdh.py``.

Each head encodes the token into ``N = mlp_multiplier * d_model / n_heads`` positive, sparse
neurons, runs linear attention (no softmax) among them with the dense input as the value, and
modulates the neurons again by the attention read-out before decoding back to ``d_model``::

    x_t = relu(E_h u_t)                          # "x_sparse", N neurons per head
    rho_t = rho_{t-1} + rope(x_t) u_t^T          # the synaptic state, [N, d_model] per head
    a_t = rho_{t-1}^T rope(x_t)                  # strictly causal: tokens j < t only
    y_t = relu(E^v_h layer_norm(a_t))            # "y_sparse"
    out_t = D [x_t * y_t over heads]             # "xy_sparse" through the decoder

``u`` is the mixer input (the official code's layer-normed residual stream, lmlab's pre-norm
RMSNorm output), shared by every head as the value. The official attention is
``(QR @ KR.mT).tril(diagonal=-1) @ V`` with ``Q = K``: the diagonal is excluded, which is the
recurrence above reading ``rho_{t-1}`` before adding the current token. It runs on
``gated_linear_attention`` with keys and values shifted one step (``S'_t = rho_{t-1}``); the
last token's key and value, not yet in ``S'``, ride in the state until the next call.

``forget_gate=True`` (an lmlab extension, not in BDH) forgets with a data-dependent gate per
head, ``rho_t = g_t rho_{t-1} + (1 - g_t) x_t u_t^T`` with ``g_t = sigmoid(w_g . u_t + b_h)``:
the core's ``log_decay = log g`` and keys scaled by ``1 - g``.

Mapping to lmlab: this module is the whole official BDH layer except its normalisations. The
official layer is post-norm, ``x = ln(x + ln(decoder(xy_sparse)))``; lmlab's block is pre-norm,
``x + bdh(rms_norm(x))``, followed by its own channel mixer (BDH has none: its encoder/decoder
pair is the MLP). Parameters are per layer (the official model shares ``encoder``,
``encoder_v`` and ``decoder`` across layers). The RoPE is lmlab's rotate-halves form with
BDH's ``theta = 2**16`` and frequencies; the official interleaved pairs are a fixed permutation
of the neurons, which the learned encoders absorb. Scores are not scaled, as in the official
code: the layer norm of ``a_t`` divides any scale away, and a ``1/sqrt(N)`` would only make its
epsilon matter (with the forget gate's small ``1 - g`` above all). Dropout is left out.
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
from lmlab.layers.position import Rotary
from lmlab.layers.registry import register_token_mixer
from lmlab.ops.gated_linear_attention import gated_linear_attention

ROPE_THETA = 2.0**16
"""BDH's rotary base over the neuron dimension."""
FORGET_SPANS = (4.0, 256.0)
"""Initial memory spans ``1 / (1 - g)`` of the forget gate, geometric across heads."""


@register_token_mixer("bdh")
class BDH(TokenMixer):
    """A BDH layer as a token mixer: sparse neurons, strictly causal linear attention, gating."""

    @dataclass
    class Options:
        mlp_multiplier: int = 128
        """Neurons per head = ``mlp_multiplier * d_model / n_heads`` (official: 128)."""
        forget_gate: bool = False
        """Learned data-dependent forgetting of the state (not in the official BDH)."""
        chunk_size: int = 64
        mode: str = "chunk"
        """``chunk`` (training) or ``recurrent`` (the core's step-by-step oracle)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, options: Options) -> None:
        super().__init__()
        width, heads = cfg.d_model, cfg.n_heads
        neurons = options.mlp_multiplier * width
        if options.mlp_multiplier < 1 or neurons % heads or (neurons // heads) % 2:
            raise LmlabError(
                f"bdh: mlp_multiplier * d_model = {neurons} must be a positive multiple of "
                f"2 * n_heads = {2 * heads} (an even number of neurons per head for the rotation); "
                "change model.mixer_options.bdh.mlp_multiplier"
            )
        self.n_heads = heads
        self.neurons = neurons // heads
        self.eps = cfg.norm_eps
        self.init_std = cfg.init_std
        self.chunk_size = options.chunk_size
        self.mode = options.mode
        self.encoder = nn.Linear(width, heads * self.neurons, bias=False)
        self.encoder_v = nn.Parameter(torch.empty(heads, width, self.neurons))
        self.forget = nn.Linear(width, heads) if options.forget_gate else None
        self.out = nn.Linear(heads * self.neurons, width, bias=False)
        self.rotary = Rotary(self.neurons, ROPE_THETA)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) ``encoder_v`` (official: 0.02, as the linear maps); forget-gate
        biases giving memory spans from 4 to 256 tokens across heads."""
        nn.init.normal_(self.encoder_v, std=self.init_std)
        if self.forget is not None:
            spans = torch.logspace(*(math.log10(s) for s in FORGET_SPANS), self.n_heads)
            self.forget.bias.copy_(torch.log(spans - 1))

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        batch, time, width = x.shape
        heads, neurons = self.n_heads, self.neurons
        position = 0 if state is None else state["position"]
        x_sparse = F.relu(self.encoder(x)).view(batch, time, heads, neurons)
        keys = self.rotary(x_sparse, position)
        values = x.unsqueeze(2).expand(batch, time, heads, width)
        # Strict causality: the core sees every (key, value, decay) one step late, so S'_t is
        # rho_{t-1}; the last step's entries wait in the state for the next call.
        streams = {"key": keys, "value": values}
        if self.forget is not None:
            gate = self.forget(x)
            streams["key"] = keys * torch.sigmoid(-gate).unsqueeze(-1)
            streams["log_decay"] = F.logsigmoid(gate)
        late = {}
        for name, new in streams.items():
            old = torch.zeros_like(new[:, :1]) if state is None else state[name]
            late[name] = torch.cat([old, new[:, :-1]], dim=1)
        read, rho = gated_linear_attention(
            keys,
            late["key"],
            late["value"],
            late.get("log_decay"),
            scale=1.0,
            initial_state=None if state is None else state["rho"],
            output_final_state=True,
            mode=self.mode,
            chunk_size=self.chunk_size,
        )
        wide = torch.promote_types(x.dtype, torch.float32)
        read = F.layer_norm(read.to(wide), (width,), eps=self.eps).to(x.dtype)
        y_sparse = F.relu(torch.einsum("bthd,hdn->bthn", read, self.encoder_v))
        y = self.out((x_sparse * y_sparse).reshape(batch, time, heads * neurons))
        # Copies of the last step, so the state does not keep the whole input alive.
        new_state = {name: new[:, -1:].clone() for name, new in streams.items()}
        new_state.update(rho=rho, position=position + time)
        return y, new_state

    def extra_flops_per_token(self, context: int) -> float:
        """The per-head ``encoder_v`` (not an ``nn.Linear``) plus the linear attention's state
        write and read-out, two ``N x d_model`` products per head."""
        width = self.encoder.in_features
        return 2.0 * self.n_heads * width * self.neurons + 4.0 * self.n_heads * self.neurons * width
