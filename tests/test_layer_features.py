"""Layer-level features: per-layer overrides and list patterns, Mixture-of-Depths, activation
checkpointing (side records counted once), and the Muon/AdamW parameter split."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import ctrl_c_in_step, metrics_rows, train_losses
from torch import nn

from lmlab.cli import main
from lmlab.config.load import build_config, dump_config
from lmlab.config.schema import ModelConfig
from lmlab.errors import LmlabError
from lmlab.layers.registry import CHANNEL_MIXERS, token_mixer_names
from lmlab.model.lm import LanguageModel, module_flops
from lmlab.train.optim import split_parameters

TINY = {"vocab_size": 50, "d_model": 32, "n_layers": 4, "n_heads": 4}


def model_of(**settings) -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(**(TINY | settings)))


# --- per-layer overrides ---------------------------------------------------------------------


def test_overrides_resolve_per_layer_and_beat_the_pattern():
    cfg = ModelConfig(
        **TINY,
        pattern="AMAM",
        mixer_options={"attention": {"window": 8, "decode_top_k": 2}},
        layer_overrides={
            "0,2": {"mlp_hidden": 64},
            1: {"mixer": "gla", "n_heads": 2},
            -1: {"mixer": "attention", "mixer_options": {"attention": {"window": 4}}},
        },
    )
    layers = cfg.layer_configs()
    assert [c.mixer for c in layers] == ["attention", "gla", "attention", "attention"]
    assert [c.mlp_hidden for c in layers] == [64, 0, 64, 0]
    assert [c.n_heads for c in layers] == [4, 2, 4, 4]
    assert layers[3].mixer_options["attention"] == {"window": 4, "decode_top_k": 2}
    assert layers[0].mixer_options["attention"] == {"window": 8, "decode_top_k": 2}
    model = LanguageModel(cfg)
    assert model.blocks[1].mixer_name == "gla" and model.blocks[1].mixer.n_heads == 2
    assert model.blocks[0].channel.out.in_features == 64
    assert model.blocks[3].mixer.window == 4 and model.blocks[2].mixer.window == 8


def test_pattern_as_a_list_and_overrides_from_the_command_line(tmp_path):
    config = build_config(
        None,
        [
            "model.n_layers=3",
            "model.pattern=[gla, attention, gla]",
            "model.layer_overrides.2.mixer=attention",
            "model.layer_overrides.2.mlp_hidden=64",  # merged with the line above, not replacing
        ],
    )
    assert config.model.layer_mixers() == ["gla", "attention", "attention"]
    assert config.model.layer_configs()[2].mlp_hidden == 64
    path = tmp_path / "again.yaml"
    path.write_text(dump_config(config))
    assert build_config(str(path)) == config


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({1: {"mlp_hiden": 64}}, "model.layer_overrides.1.mlp_hiden is unknown; did you mean"),
        ({1: {"d_model": 64}}, "model.layer_overrides.1.d_model cannot differ per layer"),
        ({4: {"mixer": "gla"}}, "index 4 is out of range for model.n_layers=4"),
        ({"first": {"mixer": "gla"}}, "key 'first' is not a layer index"),
        ({2: "gla"}, "model.layer_overrides.2 must map settings to values"),
        ({2: {"n_heads": 3}}, "layer 2 (model.layer_overrides): model.d_model=32 is not divisible"),
        ({2: {"mlp_hidden": "wide"}}, "model.layer_overrides.2.mlp_hidden='wide' must be of type"),
        ({2: {"mixer_options": {"gla": 1}}}, "mixer_options.gla must map settings to values"),
    ],
)
def test_bad_overrides_are_one_line_errors(overrides, fragment):
    with pytest.raises(LmlabError) as info:
        ModelConfig(**TINY, layer_overrides=overrides).validate()
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_unknown_mixer_in_a_list_pattern_is_an_error():
    with pytest.raises(LmlabError, match="unknown token mixer 'glaa'; did you mean 'gla'"):
        model_of(n_layers=2, pattern=["attention", "glaa"])


# --- Mixture-of-Depths -----------------------------------------------------------------------


def test_mod_every_and_overrides_choose_the_routed_layers():
    cfg = ModelConfig(**TINY, mod_capacity=0.25, layer_overrides={0: {"mod_capacity": 0.5}})
    assert [c.mod_capacity for c in cfg.layer_configs()] == [0.5, 0.25, 0.0, 0.25]
    with pytest.raises(LmlabError, match="mod_every=5 selects none"):
        ModelConfig(**TINY, mod_capacity=0.5, mod_every=5).validate()
    with pytest.raises(LmlabError, match=r"mod_capacity=1\.5 must be in"):
        ModelConfig(**TINY, mod_capacity=1.5).validate()


def test_training_routes_the_top_k_tokens_and_skips_the_rest():
    model = model_of(n_layers=2, mod_capacity=0.25).train()
    block = model.blocks[1]
    x = torch.randn(3, 16, 32, requires_grad=True)
    y, _ = block(x)
    changed = (y - x).abs().amax(-1) > 0
    assert changed.sum(1).tolist() == [4, 4, 4]  # ceil(0.25 * 16) per sequence
    with torch.no_grad():
        logits = block.router.score(x).squeeze(-1)
    top = logits.topk(4, dim=1).indices
    assert changed.gather(1, top).all()
    (y.square().sum() + block.router.aux_loss).backward()
    assert block.router.score.weight.grad.abs().sum() > 0
    stats = block.router.pop_statistics()
    assert stats["routed_fraction"] == 0.25 and stats["tokens"] == 48
    assert 0 <= stats["predictor_accuracy"] <= 1 and block.router.pop_statistics() == {}
    assert model.feature_counters() == {"mixture_of_depths": 12}


@pytest.mark.parametrize("mixer", ["attention", "gla"])
def test_mod_cached_decode_equals_full_recompute(mixer):
    model = model_of(mixer=mixer, mod_capacity=0.5, mod_every=1).eval()
    with torch.no_grad():  # spread the router logits so rows route different token counts
        for block in model.blocks:
            block.router.score.weight.normal_(std=1.0)
    tokens = torch.randint(0, 50, (2, 19))
    with torch.no_grad():
        full, _ = model(tokens)
        routed = [(b.router.score(model.embed(tokens)) > 0).sum().item() for b in model.blocks]
        logits, state = model(tokens[:, :7])
        pieces = [logits]
        logits, state = model(tokens[:, 7:11], state)
        pieces.append(logits)
        for t in range(11, 19):
            logits, state = model(tokens[:, t : t + 1], state)
            pieces.append(logits)
    assert 0 < routed[0] < 2 * 19  # the first layer routes some tokens, not all
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)


def test_mod_flops_count_the_routed_share_of_tokens_and_context():
    dense, routed = model_of(n_layers=2), model_of(n_layers=2, mod_capacity=0.25)
    router = 2 * 32  # one logit per token
    expected = router + 0.25 * module_flops(dense.blocks[1], 16)  # a quarter, at context 16
    assert routed.blocks[1].flops_per_token(64) == pytest.approx(expected)
    assert routed.blocks[0].flops_per_token(64) == dense.blocks[0].flops_per_token(64)
    assert module_flops(dense.blocks[1], 64) - module_flops(dense.blocks[1], 16) == 4 * 32 * 48
    assert routed.flops_per_token(64) == pytest.approx(
        dense.flops_per_token(64) - dense.blocks[1].flops_per_token(64) + expected
    )


def test_mod_trains_with_carried_state_checkpointing_and_resumes_exactly(tmp_path, corpus):

    settings = [
        "model.d_model=32",
        "model.n_layers=2",
        "model.n_heads=2",
        "model.pattern=[gla, attention]",
        "model.mixer_options.attention.window=8",  # a bounded cache under truncated BPTT
        "model.layer_overrides.0.channel_mixer=moe",
        "model.mod_capacity=0.5",
        "model.mod_every=1",
        f"data.path={corpus}",
        "data.seq_len=16",
        "train.batch_size=4",
        "train.tbptt=true",
        "train.optimizer=muon",
        "train.activation_checkpointing=true",
        "train.max_steps=6",
        "train.max_time=0",
        "train.checkpoint_interval=3",
        "train.eval_batches=2",
        "train.deterministic=true",
        f"out_dir={tmp_path}",
    ]
    assert main(["train", "--quiet", *settings, "name=whole"]) == 0
    with ctrl_c_in_step(4):
        assert main(["train", "--quiet", *settings, "name=part"]) == 130
    assert main(["train", "--quiet", "--resume", str(tmp_path / "part")]) == 0

    whole = metrics_rows(tmp_path / "whole")
    assert train_losses(tmp_path / "part") == train_losses(tmp_path / "whole")
    first = whole[0]
    assert first["feature_calls"] == {"moe": 1, "sliding_window": 1, "mixture_of_depths": 64}
    assert first["statistics"]["blocks.1.router"]["routed_fraction"] == 0.5


# --- activation checkpointing ----------------------------------------------------------------


def test_checkpointing_keeps_gradients_statistics_and_counters():
    settings = {
        "pattern": "AOAO",
        "channel_mixer": "moe",
        "mixer_options": {"moe": {"n_experts": 4, "router": "switch"}},
        "mod_capacity": 0.5,
    }
    plain = model_of(**settings).train()
    recomputed = copy.deepcopy(plain)
    recomputed.set_activation_checkpointing(True)
    tokens = torch.randint(0, 50, (2, 12))
    results = []
    for model in (plain, recomputed):
        for _ in range(2):
            logits, _ = model(tokens)
            aux = model.auxiliary_loss()
            (logits.logsumexp(-1).mean() + aux).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        counts = [b.channel.token_expert_counts.clone() for b in model.blocks]
        results.append(
            (aux.item(), grads, model.pop_statistics(), model.feature_counters(), counts)
        )
    (aux_a, grads_a, stats_a, calls_a, counts_a), (aux_b, grads_b, stats_b, calls_b, counts_b) = (
        results
    )
    assert aux_a == pytest.approx(aux_b, rel=1e-6)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grads_b[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert calls_a == calls_b == {"moe": 8, "mixture_of_heads": 4, "mixture_of_depths": 48}
    assert stats_a.keys() == stats_b.keys()
    for name, stats in stats_a.items():
        assert stats_b[name].keys() == stats.keys()
        for key, value in stats.items():
            assert stats_b[name][key] == pytest.approx(value, rel=1e-5), (name, key)
    assert all(torch.equal(a, b) for a, b in zip(counts_a, counts_b, strict=True))


def test_checkpointing_is_off_in_eval_and_without_gradients(monkeypatch):
    """Each block goes through torch.utils.checkpoint only when training with gradients; in
    eval, or without gradients, the blocks run directly and give the same logits."""
    import lmlab.model.lm as lm

    calls = []

    def counted(function, *args, **kwargs):
        calls.append(function)
        return torch.utils.checkpoint.checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(lm, "checkpoint", counted)
    model = model_of()
    model.set_activation_checkpointing(True)
    tokens = torch.randint(0, 50, (1, 5))
    trained, _ = model.train()(tokens)
    assert len(calls) == 4  # one per block
    with torch.no_grad():
        no_grad, state = model.train()(tokens)
    evaluated, _ = model.eval()(tokens)
    assert len(calls) == 4
    assert state.layers[0]["length"] == 5
    torch.testing.assert_close(no_grad, trained.detach(), rtol=0, atol=0)
    torch.testing.assert_close(evaluated.detach(), trained.detach(), rtol=0, atol=0)


# --- Muon / AdamW split ----------------------------------------------------------------------


class LatentLinear(nn.Linear):
    """Stands for a quantisation-aware linear layer (e.g. BitLinear) that keeps latent weights."""


@pytest.mark.parametrize("channel", sorted(CHANNEL_MIXERS))
def test_every_parameter_lands_in_exactly_one_optimizer(channel):
    mixers = token_mixer_names()
    model = model_of(n_layers=len(mixers), pattern=mixers, channel_mixer=channel, mod_capacity=0.5)
    model.blocks[0].channel.extra = LatentLinear(4, 4)
    muon, adamw = split_parameters(model)
    ids = [id(p) for _, p in muon + adamw]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    muon_names = {n for n, _ in muon}
    assert "blocks.0.channel.extra.weight" in muon_names
    for name, param in muon:
        assert param.ndim == 2 and not name.startswith(("embed", "head")), name
    routers = [n for n, _ in muon + adamw if "router" in n]
    assert routers and not muon_names.intersection(routers)
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert muon_names <= linear  # raw 2-D parameters (conv kernels, per-head biases) stay out


def test_tied_head_and_embedding_stay_with_adamw():
    muon, adamw = split_parameters(model_of(n_layers=1))
    assert "embed.weight" in {n for n, _ in adamw}
    assert sorted(n for n, _ in muon) == [
        "blocks.0.channel.gate_up.weight",
        "blocks.0.channel.out.weight",
        "blocks.0.mixer.out.weight",
        "blocks.0.mixer.qkv.weight",
    ]
