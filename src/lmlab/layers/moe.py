"""Mixture of experts as a channel mixer: SwiGLU experts behind a learned softmax router.

Routers (option ``router``):

- ``topk``: each token takes its ``top_k`` most probable experts; the gates are their
  probabilities renormalised to sum to one (Shazeer et al. 2017; Mixtral).
- ``switch``: top-1, gate = the router probability, so the router learns through the gate
  (Fedus et al. 2021). In training each expert serves at most
  ``ceil(capacity_factor * tokens / n_experts)`` tokens, first come (token order) first served;
  the overflow skips the layer (residual only) and is counted as dropped.
- ``top_p``: adaptive; each token takes experts in order of probability until their summed
  probability reaches ``top_p``, at most ``top_k``; gates renormalised over the chosen (Huang et
  al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models").
- ``expert_choice``: each expert takes its ``ceil(tokens * capacity_factor / n_experts)`` best
  tokens of the whole batch, gate = the router probability (Zhou et al. 2022). Choosing among
  the batch looks at later positions, which a causal model cannot do while generating: in eval
  mode (evaluation, generation, one-token decode) it routes token-choice top-k instead, with
  ``k = round(capacity_factor)`` and the same raw-probability gates.

``switch`` never drops in eval mode, so decoding one token at a time equals a full forward.

Shared experts (``shared_experts``, DeepSeek-MoE): always-on experts added to the routed output,
held as ONE SwiGLU of their summed width, which is the same function as summing them.

Precision: the router logits are computed in float32 under autocast, and under
``model.bitlinear`` the router stays a full-precision :class:`~lmlab.layers.base.Router` (only the
experts become BitLinear), so the ternary export stores it as float and routes as training did.

Balancing: the auxiliary loss ``n_experts * sum_e f_e * P_e`` (Switch/GShard; ``f_e`` the
fraction of the router's assignments that went to expert e, ``P_e`` its mean probability; 1 at
perfect balance), the router z-loss ``mean(logsumexp(logits)^2)`` (ST-MoE), and loss-free
balancing (DeepSeek-V3): a per-expert bias buffer is added to the probabilities to CHOOSE
experts only, never to the gates, and after each optimiser step ``bias_e += bias_update_rate *
sign(mean_load - load_e)``. That update runs in :meth:`MoE.pop_statistics`, which the trainer
calls once per step after the optimiser step: it sees the whole step's load (every micro-batch),
a recomputed forward (activation checkpointing) cannot apply it twice, and the bias is a buffer,
so it is in the checkpoint and a resumed run continues exactly. Only bias differences matter,
so a common drift of all biases is harmless. Loss-free recipe: ``aux_loss_coef=0
bias_update_rate=1e-3`` (DeepSeek-V3's rate, for long runs); 3e-3 balances a small char model
within ~300 steps (load summed over 50 steps: CV ~0.01). ``expert_choice`` is balanced by
construction: its aux loss is constant (no gradient) and its bias never moves.

Statistics (:meth:`MoE.pop_statistics`, training forwards only): load per expert (fraction of
the router's assignments, before capacity drops), its coefficient of variation, tokens dropped,
experts run per token, the raw aux and z losses (before their coefficients), and the bias. The
specialisation table counts (input token id, expert) assignments over the whole training in the
``token_expert_counts`` buffer; :meth:`MoE.on_training_end` writes it to the run folder.

Dispatch: the assignments are grouped by expert (one stable sort), and a loop over EXPERTS
(never tokens) gathers each expert's tokens with ``index_select``, runs the expert once and adds
its gated output back with ``index_add_``. Measured on the 2-core AVX2 CPU (8 experts, top-2,
4096 tokens, width 256, expert width 352, forward + backward, best of 10, two threads): this
loop 135 ms against 162 ms for padded per-expert groups through ``torch.bmm`` with balanced
routing, and 119 ms against 576 ms when the busiest expert takes half the assignments (padding
every group to the busiest); ``torch.nn.functional.grouped_mm`` on CPU took 2-3x the loop's
time. The loop also lets every expert be an ordinary :class:`SwiGLU` of ``nn.Linear`` weights,
so initialisation, Muon, quantisation and LoRA see plain matrices.

Expert width: ``expert_hidden`` = 0 takes ``mlp_hidden / (active experts per token + shared
experts)``, so a token's active width equals the dense MLP's: top-2 of 8 experts has about 4x
the dense parameters at the dense FLOPs (plus the router's).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmlab.config.schema import ModelConfig
from lmlab.errors import LmlabError
from lmlab.files import atomic_write_text
from lmlab.layers.base import ChannelMixer, Decode, Router
from lmlab.layers.features import FeatureCounter, recording
from lmlab.layers.mlp import SwiGLU
from lmlab.layers.registry import register_channel_mixer

ROUTERS = ("topk", "switch", "top_p", "expert_choice")
SWITCH_CAPACITY = 1.25
SPECIALISATION_FILE = "expert_specialisation.json"


@dataclass
class Routing:
    """The token-expert assignments of one forward (flat token indices)."""

    tokens: torch.Tensor
    experts: torch.Tensor
    gates: torch.Tensor
    """Weight of each assignment's expert output; differentiable (the router learns by it)."""
    kept: torch.Tensor | None = None
    """False where an expert's capacity dropped the assignment; None when nothing can drop."""

    def served(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens, experts and gates of the assignments that run (capacity drops removed)."""
        if self.kept is None:
            return self.tokens, self.experts, self.gates
        return self.tokens[self.kept], self.experts[self.kept], self.gates[self.kept]


@register_channel_mixer("moe")
class MoE(FeatureCounter, ChannelMixer):
    """``y = shared(x) + sum over the routed experts e of gate_e * expert_e(x)``."""

    feature = "moe"
    wants_token_ids = True
    """The model hands the input token ids over (``set_token_ids``) for the specialisation
    table."""

    @dataclass
    class Options:
        router: str = "topk"
        """``topk``, ``switch``, ``top_p`` or ``expert_choice``."""
        n_experts: int = 8
        top_k: int = 2
        """Experts per token (topk); the most a token may take (top_p); the mean per token and
        the default capacity factor (expert_choice). ``switch`` always takes one."""
        top_p: float = 0.5
        """Probability mass a token's experts must reach (top_p)."""
        capacity_factor: float = 0.0
        """switch: 0 means 1.25; expert_choice: 0 means top_k. Unused by topk and top_p."""
        expert_hidden: int = 0
        """Hidden width of each expert; 0: the dense width over the active experts per token."""
        shared_experts: int = 0
        aux_loss_coef: float = 0.01
        z_loss_coef: float = 0.001
        bias_update_rate: float = 0.0
        """Loss-free balancing step per training step (DeepSeek-V3: 1e-3); 0 disables it."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, options: Options) -> None:
        super().__init__()
        check_options(options)
        self.options = options
        self.n_experts = options.n_experts
        if options.router == "expert_choice":
            self.capacity_factor = options.capacity_factor or float(options.top_k)
            self.active_experts = self.capacity_factor
            self.token_choice_k = min(max(1, round(self.capacity_factor)), options.n_experts)
        else:
            self.capacity_factor = options.capacity_factor or SWITCH_CAPACITY
            self.active_experts = 1.0 if options.router == "switch" else float(options.top_k)
            self.token_choice_k = int(self.active_experts)
        hidden = options.expert_hidden or max(
            1, round(cfg.resolved_mlp_hidden / (self.active_experts + options.shared_experts))
        )
        self.expert_hidden = hidden
        self.router = Router(cfg.d_model, options.n_experts, bias=False)
        expert_cfg = dataclasses.replace(cfg, mlp_hidden=hidden)
        self.experts = nn.ModuleList(
            SwiGLU(expert_cfg, layer_idx, None) for _ in range(options.n_experts)
        )
        self.shared = (
            SwiGLU(
                dataclasses.replace(cfg, mlp_hidden=hidden * options.shared_experts),
                layer_idx,
                None,
            )
            if options.shared_experts
            else None
        )
        self.register_buffer("expert_bias", torch.zeros(options.n_experts))
        self.register_buffer(
            "token_expert_counts",
            torch.zeros(max(cfg.vocab_size, 0), options.n_experts, dtype=torch.int64),
        )
        self.token_ids: torch.Tensor | None = None
        self._reset_statistics()

    def set_token_ids(self, idx: torch.Tensor) -> None:
        """The input token ids of the next forward (``[B, T]``), for the specialisation table."""
        self.token_ids = idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        token_ids, self.token_ids = self.token_ids, None
        # Routing decides discrete choices: keep its logits in at least float32 under autocast.
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(flat.to(dtype), self.router.weight.to(dtype))
        probs = logits.softmax(-1)
        routing = self.route(probs)
        y = self._run_experts(flat, routing)
        if self.shared is not None:
            y = y + self.shared(flat)
        if self.training:
            self._account(logits, probs, routing, token_ids)
        else:
            self.aux_loss = None
        return y.view(x.shape)

    def route(self, probs: torch.Tensor) -> Routing:
        """The assignments for router probabilities ``[tokens, n_experts]`` (training mode
        applies capacities and expert choice)."""
        n_tokens, n_experts = probs.shape
        router = self.options.router
        scores = probs.detach() + self.expert_bias  # the bias chooses experts, never weighs them
        if router == "expert_choice" and self.training:
            capacity = min(n_tokens, math.ceil(n_tokens * self.capacity_factor / n_experts))
            tokens = scores.topk(capacity, dim=0).indices.T.reshape(-1)
            experts = torch.arange(n_experts, device=probs.device).repeat_interleave(capacity)
            return Routing(tokens, experts, probs[tokens, experts])
        chosen = scores.topk(self.token_choice_k, dim=-1).indices
        gates = probs.gather(-1, chosen)
        selected = torch.ones_like(chosen, dtype=torch.bool)
        if router == "top_p":
            mass_before = gates.detach().cumsum(-1) - gates.detach()
            selected = mass_before < self.options.top_p
            gates = gates * selected
        if router in ("topk", "top_p"):
            gates = gates / gates.sum(-1, keepdim=True)
        tokens = torch.arange(n_tokens, device=probs.device)[:, None].expand_as(chosen)
        routing = Routing(tokens[selected], chosen[selected], gates[selected])
        if router == "switch" and self.training:
            capacity = math.ceil(self.capacity_factor * n_tokens / n_experts)
            routing.kept = queue_position(routing.experts, n_experts) < capacity
        return routing

    def _run_experts(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Group the assignments by expert, run each expert once on its tokens, add back."""
        tokens, experts, gates = routing.served()
        order = torch.argsort(experts, stable=True)
        counts = torch.bincount(experts, minlength=self.n_experts).tolist()
        y = x.new_zeros(x.shape)  # the experts' sum accumulates in x's precision under autocast
        for expert, group in zip(self.experts, order.split(counts), strict=True):
            rows = tokens[group]
            out = expert(x.index_select(0, rows))
            y.index_add_(0, rows, (out * gates[group, None].to(out.dtype)).to(y.dtype))
        return y

    def _account(
        self,
        logits: torch.Tensor,
        probs: torch.Tensor,
        routing: Routing,
        token_ids: torch.Tensor | None,
    ) -> None:
        """Training only: the balancing losses, this step's statistics, the integrity count
        (recorded once when activation checkpointing recomputes the forward)."""
        options = self.options
        chosen = torch.bincount(routing.experts, minlength=self.n_experts)
        balance = self.n_experts * (chosen / chosen.sum() * probs.mean(0)).sum()
        z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        losses = [
            coef * loss
            for coef, loss in ((options.aux_loss_coef, balance), (options.z_loss_coef, z_loss))
            if coef > 0
        ]
        aux_loss = sum(losses[1:], losses[0]) if losses else None
        if not recording():
            return
        self.aux_loss = aux_loss
        with torch.no_grad():
            n_tokens = probs.shape[0]
            served = routing.served()[0]
            self._load = self._load + chosen
            self._tokens += n_tokens
            self._served += served.numel()
            unserved = torch.ones(n_tokens, dtype=torch.bool, device=probs.device)
            unserved[served] = False
            self._dropped = self._dropped + unserved.sum()
            self._balance = self._balance + balance.detach()
            self._z_loss = self._z_loss + z_loss.detach()
            self._forwards += 1
            if token_ids is not None:
                ids = token_ids.reshape(-1)[routing.tokens]
                self.token_expert_counts.index_put_(
                    (ids, routing.experts),
                    torch.ones_like(ids, dtype=self.token_expert_counts.dtype),
                    accumulate=True,
                )
        self.count_call()

    def _reset_statistics(self) -> None:
        # Sums become tensors on the module's device at the first forward, read at the pop.
        self._load: torch.Tensor | int = 0
        self._dropped: torch.Tensor | int = 0
        self._balance: torch.Tensor | float = 0.0
        self._z_loss: torch.Tensor | float = 0.0
        self._tokens = self._served = self._forwards = 0

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor) -> None:
        """Loss-free balancing: raise the bias of under-loaded experts, lower the over-loaded."""
        step = torch.sign(load.mean() - load).to(self.expert_bias)
        self.expert_bias += self.options.bias_update_rate * step

    def pop_statistics(self) -> dict:
        """Statistics of the training forwards since the last call, then reset; with loss-free
        balancing also the step's bias update (the trainer calls this once per step, after the
        optimiser step). Empty when no training forward ran."""
        if not self._forwards:
            return {}
        load = torch.as_tensor(self._load, dtype=torch.float64)
        if self.options.bias_update_rate > 0:
            self.update_bias(load)
        stats = {
            "load": (load / load.sum()).tolist(),
            "load_cv": (load.std(correction=0) / load.mean()).item(),
            "tokens": self._tokens,
            "dropped": int(self._dropped),
            "experts_per_token": self._served / self._tokens,
            "aux_loss": float(self._balance) / self._forwards,
            "z_loss": float(self._z_loss) / self._forwards,
        }
        if self.options.bias_update_rate > 0:
            stats["bias"] = self.expert_bias.tolist()
        self._reset_statistics()
        return stats

    def flops_per_token(self) -> float:
        """Forward FLOPs per token: the router, the active routed experts (top_p: its upper
        bound top_k; expert_choice: capacity_factor per token) and the shared experts."""
        per_expert = 2 * sum(p.numel() for p in self.experts[0].parameters())
        shared = 0 if self.shared is None else 2 * sum(p.numel() for p in self.shared.parameters())
        return float(2 * self.router.weight.numel() + self.active_experts * per_expert + shared)

    def specialisation(self, decode: Decode | None = None) -> dict:
        """How often the router sent each token id to each expert over the training so far (the
        counts live in the checkpoint, so they survive a resume), most frequent token first;
        ``decode`` adds each token's text."""
        counts = self.token_expert_counts.cpu()
        totals = counts.sum(-1)
        rows = []
        for token in torch.argsort(totals, descending=True, stable=True).tolist():
            if totals[token] == 0:
                break
            row = {"token_id": token, "total": int(totals[token]), "counts": counts[token].tolist()}
            if decode is not None:
                row["token"] = decode([token])
            rows.append(row)
        return {"n_experts": self.n_experts, "router": self.options.router, "rows": rows}

    def on_training_end(self, run_dir: Path, name: str, decode: Decode | None) -> None:
        """Add this layer's :meth:`specialisation` under ``name`` to ``expert_specialisation.json``
        (one file for all MoE layers: each layer adds its own entry)."""
        path = Path(run_dir) / SPECIALISATION_FILE
        layers = json.loads(path.read_text())["layers"] if path.exists() else {}
        layers[name] = self.specialisation(decode)
        text = json.dumps({"layers": layers}, indent=1, ensure_ascii=False) + "\n"
        atomic_write_text(path, text)

    def extra_flops_per_token(self, context: int) -> float:
        """What the model's count of 2 FLOPs per ``nn.Linear`` weight misses: it counts every
        expert, only the active ones run, so this is negative."""
        linear = sum(2 * m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return self.flops_per_token() - linear


def check_options(options: MoE.Options) -> None:
    """One-line errors for bad ``model.mixer_options.moe`` values, before any weights exist."""
    checks = [
        (
            options.router in ROUTERS,
            f"router={options.router!r} is unknown; use {', '.join(ROUTERS)}",
        ),
        (options.n_experts >= 1, "n_experts must be at least 1"),
        (
            1 <= options.top_k <= options.n_experts,
            f"top_k={options.top_k} must be between 1 and n_experts={options.n_experts}",
        ),
        (0 < options.top_p <= 1, f"top_p={options.top_p} must be in (0, 1]"),
        (options.capacity_factor >= 0, "capacity_factor must not be negative (0: the default)"),
        (options.expert_hidden >= 0, "expert_hidden must not be negative (0: the default)"),
        (options.shared_experts >= 0, "shared_experts must not be negative"),
        (
            min(options.aux_loss_coef, options.z_loss_coef, options.bias_update_rate) >= 0,
            "aux_loss_coef, z_loss_coef and bias_update_rate must not be negative (0 disables)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise LmlabError(f"model.mixer_options.moe: {message}")


def queue_position(experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Each assignment's place in its expert's queue, in assignment order (0 = first)."""
    one_hot = F.one_hot(experts, n_experts)
    return (one_hot.cumsum(0) * one_hot).sum(-1) - 1
