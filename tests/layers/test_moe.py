"""Mixture of experts: every router against a per-token loop, capacities, balancing, statistics."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from lmlab.config.schema import ModelConfig
from lmlab.errors import LmlabError
from lmlab.layers.features import feature_counters
from lmlab.layers.moe import SPECIALISATION_FILE, MoE
from lmlab.layers.registry import build_channel_mixer
from lmlab.model.lm import LanguageModel

D_MODEL = 16
VOCAB = 12


def make_moe(seed: int = 0, d_model: int = D_MODEL, **options) -> MoE:
    """A float64 MoE with random router weights and a random selection bias."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=VOCAB, d_model=d_model, mlp_hidden=24, mixer_options={"moe": options}
    )
    moe = build_channel_mixer("moe", cfg, layer_idx=0).double()
    with torch.no_grad():
        moe.router.weight.normal_(std=0.5)
        moe.expert_bias.normal_(std=0.05)
    return moe


def random_input(batch: int, time: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, time, D_MODEL, generator=generator, dtype=torch.float64)


def expert_output(expert: torch.nn.Module, v: torch.Tensor) -> torch.Tensor:
    gate, up = (expert.gate_up.weight @ v).chunk(2)
    return expert.out.weight @ (F.silu(gate) * up)


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """The definition, one token at a time with Python sorting: the oracle for every router."""
    options, n_experts = moe.options, moe.n_experts
    flat = x.reshape(-1, x.shape[-1])
    n_tokens = flat.shape[0]
    probs = [torch.softmax(moe.router.weight @ v, -1) for v in flat]
    score = [[float(p[e].detach() + moe.expert_bias[e]) for e in range(n_experts)] for p in probs]
    picks: list[tuple[int, int, torch.Tensor]] = []
    if options.router == "expert_choice" and moe.training:
        capacity = min(n_tokens, math.ceil(n_tokens * moe.capacity_factor / n_experts))
        for e in range(n_experts):
            best = sorted(range(n_tokens), key=lambda t: -score[t][e])[:capacity]
            picks += [(t, e, probs[t][e]) for t in best]
    else:
        taken = [0] * n_experts
        for t in range(n_tokens):
            ranked = sorted(range(n_experts), key=lambda e: -score[t][e])
            if options.router == "topk":
                chosen = ranked[: options.top_k]
            elif options.router == "top_p":
                chosen, mass = [], 0.0
                for e in ranked[: options.top_k]:
                    if mass >= options.top_p:
                        break
                    chosen.append(e)
                    mass += float(probs[t][e].detach())
            elif options.router == "switch":
                chosen = ranked[:1]
                capacity = math.ceil(moe.capacity_factor * n_tokens / n_experts)
                if moe.training and taken[chosen[0]] >= capacity:
                    chosen = []
                for e in chosen:
                    taken[e] += 1
            else:  # expert_choice in eval mode: token-choice top-k
                chosen = ranked[: round(moe.capacity_factor)]
            gates = [probs[t][e] for e in chosen]
            if options.router in ("topk", "top_p"):
                total = sum(gates)
                gates = [g / total for g in gates]
            picks += [(t, e, g) for e, g in zip(chosen, gates, strict=True)]
    rows = []
    for t in range(n_tokens):
        y = sum(g * expert_output(moe.experts[e], flat[t]) for tt, e, g in picks if tt == t)
        if moe.shared is not None:
            y = y + expert_output(moe.shared, flat[t])
        rows.append(torch.zeros(x.shape[-1], dtype=x.dtype) + y)
    return torch.stack(rows).view(x.shape)


def outputs_and_grads(moe: MoE, fn, x: torch.Tensor) -> list[torch.Tensor]:
    moe.zero_grad()
    x = x.clone().requires_grad_()
    y = fn(x)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=y.dtype)
    (y * weights).sum().backward()
    return [y.detach(), x.grad] + [p.grad.clone() for p in moe.parameters()]


@pytest.mark.parametrize(
    ("router", "training", "extra"),
    [
        ("topk", True, {}),
        ("topk", False, {"shared_experts": 2}),
        ("switch", True, {"capacity_factor": 1.0}),
        ("switch", False, {}),
        ("top_p", True, {"top_p": 0.45, "top_k": 3}),
        ("expert_choice", True, {}),
        ("expert_choice", False, {"capacity_factor": 1.5, "shared_experts": 1}),
    ],
)
def test_dispatch_equals_per_token_loop(router, training, extra):
    moe = make_moe(router=router, n_experts=4, **extra).train(training)
    x = random_input(2, 9)
    fast = outputs_and_grads(moe, moe, x)
    naive = outputs_and_grads(moe, lambda v: naive_moe(moe, v), x)
    for got, want in zip(fast, naive, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def forced_to_expert_zero(**options) -> MoE:
    """A MoE whose selection bias sends every token to expert 0 (the gates stay learned)."""
    moe = make_moe(n_experts=4, **options)
    with torch.no_grad():
        moe.expert_bias.copy_(torch.tensor([10.0, 0.0, 0.0, 0.0]))
    return moe


def test_switch_capacity_drops_exactly_the_overflow():
    moe = forced_to_expert_zero(router="switch", capacity_factor=1.0)  # capacity 16/4 = 4
    x = random_input(2, 8)
    y = moe.train()(x).view(16, D_MODEL)
    assert (y[:4].abs().sum(-1) > 0).all()
    assert (y[4:] == 0).all()  # dropped: the residual carries them
    stats = moe.pop_statistics()
    assert stats["dropped"] == 12
    assert stats["experts_per_token"] == pytest.approx(4 / 16)
    assert stats["load"] == [1.0, 0.0, 0.0, 0.0]
    assert moe.eval()(x).view(16, D_MODEL).abs().sum(-1).gt(0).all()  # no dropping at inference


def test_top_p_takes_experts_until_the_mass_is_reached():
    moe = make_moe(router="top_p", top_p=0.75, top_k=3, n_experts=5).eval()
    with torch.no_grad():
        moe.expert_bias.zero_()
    probs = torch.tensor(  # binary fractions: the sums hit 0.75 exactly
        [
            [0.75, 0.125, 0.0625, 0.0625, 0.0],  # one expert reaches 0.75
            [0.125, 0.5, 0.25, 0.125, 0.0],  # 0.5, then exactly 0.75: two
            [0.2, 0.2, 0.2, 0.2, 0.2],  # would need four: the cap top_k = 3
            [0.0625, 0.0625, 0.375, 0.5, 0.0],  # two
        ],
        dtype=torch.float64,
    )
    routing = moe.route(probs)
    assert torch.bincount(routing.tokens, minlength=4).tolist() == [1, 2, 3, 2]
    assert routing.experts[routing.tokens == 1].tolist() == [1, 2]
    sums = torch.zeros(4, dtype=torch.float64).index_add_(0, routing.tokens, routing.gates)
    torch.testing.assert_close(sums, torch.ones(4, dtype=torch.float64))


def test_expert_choice_respects_capacity():
    moe = make_moe(router="expert_choice", n_experts=4, capacity_factor=2.0).train()
    x = random_input(2, 6)  # 12 tokens: each expert takes 12 * 2 / 4 = 6
    moe(x)
    probs = torch.softmax(x.view(12, D_MODEL) @ moe.router.weight.T, -1)
    routing = moe.route(probs)
    for e in range(4):
        tokens = routing.tokens[routing.experts == e]
        assert len(tokens) == len(set(tokens.tolist())) == 6
        assert set(tokens.tolist()) == set(probs[:, e].topk(6).indices.tolist())
    stats = moe.pop_statistics()
    assert stats["load_cv"] == 0
    assert stats["experts_per_token"] == 2


def test_loss_free_bias_balances_a_skewed_router():
    moe = make_moe(router="switch", n_experts=4, aux_loss_coef=0.0, bias_update_rate=0.005).train()
    generator = torch.Generator().manual_seed(3)
    direction = 0.5 * torch.randn(D_MODEL, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        moe.expert_bias.zero_()
        moe.router.weight.normal_(std=0.1, generator=generator)
        moe.router.weight[0] += direction  # inputs lean along ``direction``: expert 0 is favoured
    cvs = []
    with torch.no_grad():
        for _ in range(300):
            x = torch.randn(512, D_MODEL, generator=generator, dtype=torch.float64) + direction
            moe(x)
            cvs.append(moe.pop_statistics()["load_cv"])
    assert cvs[0] > 1.0
    assert sum(cvs[-20:]) / 20 < 0.2
    assert moe.expert_bias[0] < 0 < moe.expert_bias[1:].min()
    assert "expert_bias" in moe.state_dict()  # checkpointed: resume continues exactly


def known_router() -> tuple[MoE, torch.Tensor]:
    """Every token has router probabilities (0.4, 0.3, 0.2, 0.1) and logsumexp 2."""
    moe = make_moe(n_experts=4, top_k=2)
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    with torch.no_grad():
        moe.expert_bias.zero_()
        moe.router.weight.zero_()
        moe.router.weight[:, 0] = probs.log() + 2
    x = torch.zeros(2, 5, D_MODEL, dtype=torch.float64)
    x[..., 0] = 1
    return moe, x


def test_aux_losses_and_statistics_on_a_known_case():
    moe, x = known_router()
    moe.train()
    moe(x)
    # top-2 sends half the assignments to each of experts 0 and 1:
    # aux = 4 * (0.5 * 0.4 + 0.5 * 0.3) = 1.4; z = logsumexp^2 = 4.
    assert moe.aux_loss.item() == pytest.approx(0.01 * 1.4 + 0.001 * 4.0)
    moe(x)  # a second micro-batch of the same step adds up
    stats = moe.pop_statistics()
    assert stats["aux_loss"] == pytest.approx(1.4)
    assert stats["z_loss"] == pytest.approx(4.0)
    assert stats["load"] == [0.5, 0.5, 0.0, 0.0]
    assert stats["load_cv"] == pytest.approx(1.0)
    assert stats["tokens"] == 20
    assert stats["dropped"] == 0
    assert stats["experts_per_token"] == 2
    assert moe.pop_statistics() == {}
    moe.eval()(x)
    assert moe.aux_loss is None
    assert moe.pop_statistics() == {}  # evaluation leaves the training statistics alone


def tiny_lm(**moe_options) -> LanguageModel:
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=VOCAB,
        d_model=32,
        n_layers=2,
        n_heads=2,
        channel_mixer="moe",
        mixer_options={"moe": moe_options},
    )
    return LanguageModel(cfg)


def test_specialisation_counts_sum_to_tokens_times_k(tmp_path):
    model = tiny_lm(top_k=2, n_experts=4).train()
    idx = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))
    model(idx)
    model(idx[:, :4])
    occurrences = torch.bincount(torch.cat([idx.flatten(), idx[:, :4].flatten()]), minlength=VOCAB)
    for block in model.blocks:
        counts = block.channel.token_expert_counts
        assert counts.sum() == (21 + 12) * 2
        assert counts.sum(-1).tolist() == (2 * occurrences).tolist()
    with torch.no_grad():
        model.eval()(idx)  # inference does not count
    model.on_training_end(tmp_path, decode=lambda ids: f"<{ids[0]}>")
    table = json.loads((tmp_path / SPECIALISATION_FILE).read_text())["layers"]
    assert set(table) == {"blocks.0.channel", "blocks.1.channel"}
    rows = table["blocks.0.channel"]["rows"]
    assert sum(row["total"] for row in rows) == 66
    assert rows[0]["token"] == f"<{rows[0]['token_id']}>"
    assert all(sum(row["counts"]) == row["total"] for row in rows)


@pytest.mark.parametrize("router", ["topk", "switch", "top_p", "expert_choice"])
def test_one_token_decode_equals_full_forward(router):
    model = tiny_lm(router=router, shared_experts=1).eval()
    tokens = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, _ = model(tokens)
        logits, state = model(tokens[:, :4])
        pieces = [logits]
        for t in range(4, 11):
            logits, state = model(tokens[:, t : t + 1], state)
            pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)


def test_tiny_language_model_trains_and_counts_its_feature():
    model = tiny_lm(router="topk", bias_update_rate=1e-3).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sequence = torch.arange(33) % VOCAB  # a cycle the model can learn to continue
    x, y = sequence[:-1].repeat(4, 1), sequence[1:].repeat(4, 1)
    losses = []
    for _ in range(30):
        logits, _ = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        (loss + model.auxiliary_loss()).backward()
        optimizer.step()
        optimizer.zero_grad()
        model.pop_statistics()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert feature_counters(model) == {"moe": 60}  # one per layer per training forward


def test_flops_count_only_the_active_experts():
    moe = make_moe(n_experts=8, top_k=2, shared_experts=1)
    hidden = moe.expert_hidden
    assert hidden == 24 // 3  # the dense width over (2 routed + 1 shared) active experts
    per_expert = 2 * 3 * D_MODEL * hidden
    assert moe.flops_per_token() == 2 * D_MODEL * 8 + 2 * per_expert + per_expert
    moe_lm = tiny_lm(n_experts=8, top_k=2)
    dense_lm = LanguageModel(dataclasses.replace(moe_lm.cfg, channel_mixer="swiglu"))
    dense_mlp = 2 * sum(p.numel() for p in dense_lm.blocks[0].channel.parameters())
    difference = moe_lm.flops_per_token(16) - dense_lm.flops_per_token(16)
    assert difference == 2 * (moe_lm.blocks[0].channel.flops_per_token() - dense_mlp)


def test_router_runs_in_float32_under_bf16_autocast():
    model = tiny_lm(router="switch").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(torch.randint(0, VOCAB, (2, 5)))
    assert logits.dtype == torch.bfloat16
    assert model.auxiliary_loss().dtype == torch.float32


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"router": "top2"}, "router='top2' is unknown"),
        ({"top_k": 9}, "top_k=9 must be between 1 and n_experts=8"),
        ({"top_p": 1.5}, "top_p=1.5"),
        ({"bias_update_rate": -1.0}, "must not be negative"),
    ],
)
def test_bad_options_fail_with_a_one_line_error(options, message):
    with pytest.raises(LmlabError, match=re.escape(message)):
        tiny_lm(**options)
