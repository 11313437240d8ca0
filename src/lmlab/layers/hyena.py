"""The Hyena operator (Poli et al. 2023, "Hyena Hierarchy: Towards Larger Convolutional Language
Models"), after HazyResearch/safari ``src/models/sequence/hyena.py``.

Order ``N`` (default 2): a linear projection and a short causal depthwise convolution give
``N`` gates ``x^1..x^N`` and a value ``v``, and the operator alternates long causal convolutions
with implicit filters ``h^n`` and elementwise gating (the paper's Algorithm 3)::

    z^0 = v,    z^n = x^n * (h^n * z^{n-1} + D^n z^{n-1}),    y = out(z^N)

Each filter is ``h^n_l = MLP(pos(l)) * exp(-|delta| t_l)``: an MLP with sine activations (one
shared frequency vector, as in safari) over positional features ``pos(l) = [t_l, cos(2 pi f
l / L), -sin(2 pi f l / L)]`` with ``t_l = l / (L - 1)``, times an exponential-decay window
whose rates span ``log(1e-2) / 1.5 .. log(1e-2) / 0.3`` across channels; ``D`` is the
per-channel skip of safari's ``fftconv``. The convolutions run by FFT in training
(``mode="fft"``) or as a direct sum (``mode="direct"``, the oracle).

Deviations: the positional features are computed for any position rather than stored as a
learned table of ``l_max`` rows, so filters extend past ``l_max`` (which only sets their time
scale) and decoding can go on indefinitely; safari's optimiser settings for the filter (its
own learning rate, no weight decay) are not reproduced. safari's code applies one long filter
fewer than the paper (``v`` enters the first gate straight from its short convolution);
``code_form=True`` selects that variant. There are no heads (safari's default
``num_heads=1``): ``model.n_heads`` is not used. Decoding keeps every long convolution's past inputs
(like an attention cache, O(t) per token) plus the short convolution's tail.

Precision: the filters are always computed in float32 (autocast included). Keep the weights
in float32 too (autocast training does): cast to bfloat16, the filter MLP's sines at frequency
14 amplify the weights' rounding about 14-fold per layer and the filters come out ~40% off.
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
from lmlab.layers.registry import register_token_mixer
from lmlab.ops.long_conv import causal_long_conv, causal_long_conv_step
from lmlab.ops.short_conv import short_conv

DECAY_TARGET = 1e-2
"""The window falls to this value at ``fast_decay_pct`` (0.3) .. ``slow_decay_pct`` (1.5) of
``l_max``, the fastest to the slowest channel (safari's ``ExponentialModulation``)."""
DECAY_SPAN = (0.3, 1.5)


class ImplicitFilter(nn.Module):
    """Long filters ``[length, channels]`` evaluated from positions (safari's ``HyenaFilter``)."""

    def __init__(
        self, channels: int, emb_dim: int, width: int, frequency: float, l_max: int
    ) -> None:
        super().__init__()
        self.l_max = l_max
        self.bands = (emb_dim - 1) // 2
        self.frequency = frequency
        self.first = nn.Linear(emb_dim, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(2))
        self.last = nn.Linear(width, channels, bias=False)
        self.sine_frequency = nn.Parameter(torch.empty(width))
        self.skip = nn.Parameter(torch.empty(channels))
        fast, slow = (math.log(DECAY_TARGET) / pct for pct in DECAY_SPAN)
        self.register_buffer("rates", torch.linspace(slow, fast, channels).abs(), persistent=False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """safari: sine frequency ``w`` for every unit, standard-normal skip ``D``."""
        self.sine_frequency.fill_(self.frequency)
        self.skip.normal_()

    def forward(self, length: int) -> torch.Tensor:
        """Filters for lags ``0 .. length - 1``, computed in float32 or wider whatever the weights
        or autocast say: sines of large arguments lose everything in bfloat16, and the cost is
        per position, not per token of the batch."""
        wide = torch.promote_types(self.first.weight.dtype, torch.float32)
        device = self.rates.device
        position = torch.arange(length, device=device, dtype=torch.float64)
        t = position / max(self.l_max - 1, 1)
        bands = torch.linspace(1e-4, self.bands - 1, self.bands, device=device, dtype=torch.float64)
        angle = 2 * math.pi * position[:, None] * bands / self.l_max
        h = torch.cat([t[:, None], angle.cos(), -angle.sin()], dim=-1).to(wide)
        frequency = self.sine_frequency.to(wide)
        with torch.autocast(device.type, enabled=False):
            for layer in (self.first, *self.hidden):
                h = torch.sin(frequency * F.linear(h, layer.weight.to(wide), layer.bias.to(wide)))
            h = F.linear(h, self.last.weight.to(wide))
        return h * torch.exp(-t[:, None].to(wide) * self.rates.to(wide))


@register_token_mixer("hyena")
class Hyena(TokenMixer):
    """Hyena of order ``N``: short convolution, then ``N`` long convolutions each gated."""

    cache_grows_with_context = True
    """Decoding keeps every long convolution's past inputs, one row per token."""

    @dataclass
    class Options:
        order: int = 2
        filter_width: int = 64
        """Width of the filter MLP (safari's ``filter_order``; Pile configs: 64)."""
        emb_dim: int = 33
        """Positional features: ``t`` plus ``(emb_dim - 1) / 2`` cosine/sine bands (Pile: 33)."""
        sine_frequency: float = 14.0
        """Initial frequency of the filter MLP's sine activations (safari's ``w``; Pile: 14)."""
        l_max: int = 1024
        """Time scale of the filters: positions are normalised by it (safari's ``l_max``)."""
        short_kernel: int = 3
        code_form: bool = False
        """safari's code variant: no long convolution before the first gate."""
        mode: str = "fft"
        """``fft`` (training) or ``direct`` (the convolution sum, the oracle)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, options: Options) -> None:
        super().__init__()
        checks = {
            "order": options.order >= 1 + int(options.code_form),
            "emb_dim": options.emb_dim >= 3 and options.emb_dim % 2 == 1,
            "filter_width": options.filter_width >= 1,
            "l_max": options.l_max >= 2,
            "short_kernel": options.short_kernel >= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise LmlabError(
                    f"hyena: {name}={getattr(options, name)} is invalid (order >= 1, >= 2 with "
                    "code_form; filter_width, short_kernel >= 1; emb_dim odd and >= 3; "
                    "l_max >= 2); change "
                    f"model.mixer_options.hyena.{name}"
                )
        width = cfg.d_model
        self.order = options.order
        self.first_filtered = 1 if options.code_form else 0
        self.mode = options.mode
        streams = (self.order + 1) * width
        self.proj = nn.Linear(width, streams)
        # Conv1d's [C, 1, W] layout: a 3-D tensor, so Muon leaves it to AdamW.
        self.short_weight = nn.Parameter(torch.empty(streams, 1, options.short_kernel))
        self.short_bias = nn.Parameter(torch.empty(streams))
        self.filter = ImplicitFilter(
            (self.order - self.first_filtered) * width,
            options.emb_dim,
            options.filter_width,
            options.sine_frequency,
            options.l_max,
        )
        self.out = nn.Linear(width, width)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PyTorch's ``Conv1d`` default for the short filter (safari uses ``nn.Conv1d``)."""
        bound = 1 / math.sqrt(self.short_weight.shape[-1])
        self.short_weight.uniform_(-bound, bound)
        self.short_bias.uniform_(-bound, bound)
        self.filter.reset_parameters()

    def forward(self, x: torch.Tensor, state: dict | None = None) -> tuple[torch.Tensor, dict]:
        width, time = x.shape[-1], x.shape[1]
        u, short_tail = short_conv(
            self.proj(x),
            self.short_weight.squeeze(1),
            self.short_bias,
            None if state is None else state["short"],
        )
        *gates, z = u.split(width, dim=-1)
        past = 0 if state is None else state["inputs"].shape[1]
        filters = self.filter(past + time).T.reshape(-1, width, past + time)
        skips = self.filter.skip.view(-1, width)
        inputs = []
        for n, gate in enumerate(reversed(gates)):  # safari applies the last gate first
            if n >= self.first_filtered:
                index = n - self.first_filtered
                inputs.append(z)
                z = self._long_conv(z, state, index, filters[index], skips[index])
            z = gate * z
        stacked = torch.stack(inputs, dim=2)
        if state is not None:
            stacked = torch.cat([state["inputs"], stacked], dim=1)
        return self.out(z), {"short": short_tail, "inputs": stacked}

    def _long_conv(
        self,
        z: torch.Tensor,
        state: dict | None,
        index: int,
        taps: torch.Tensor,
        skip: torch.Tensor,
    ) -> torch.Tensor:
        """Long convolution ``index`` of ``z``, continuing the inputs kept in ``state``."""
        if state is None:
            return causal_long_conv(z, taps, skip, mode=self.mode)
        history = torch.cat([state["inputs"][:, :, index], z], dim=1)
        if z.shape[1] == 1:
            return causal_long_conv_step(history, taps, skip)
        return causal_long_conv(history, taps, skip, mode=self.mode)[:, -z.shape[1] :]

    def extra_flops_per_token(self, context: int) -> float:
        """Per token and long-convolution channel, a forward and an inverse real FFT of size
        ``2 * context`` (about ``5 log2(2 context)`` each) and the spectral product; plus the
        short convolution. The filter MLP, evaluated per position for the whole batch, is left
        out."""
        channels = self.filter.skip.numel()
        short = 2.0 * self.short_weight.numel()
        return channels * (10.0 * math.log2(2 * max(context, 1)) + 6.0) + short
