"""Mixture-of-head attention: per-token top-k head gates over the attention mixer."""

import pytest
import torch
from mixer_checks import (
    assert_close,
    make_mixer,
    random_input,
)

from lmlab.config.schema import ModelConfig
from lmlab.errors import LmlabError
from lmlab.layers import moh_attention
from lmlab.layers.features import feature_counters
from lmlab.model.lm import LanguageModel


def test_gates_select_top_k_routed_heads_and_keep_shared_heads():
    mixer = make_mixer("moh", d_model=32, n_heads=8, n_shared=2, top_k=3)
    assert isinstance(mixer, moh_attention.MixtureOfHeadsAttention)
    x = random_input(2, 9, 32)
    with torch.no_grad():
        gates = mixer.router(x)
        probs = mixer.router.routed(x).softmax(-1)
    assert gates.shape == (2, 9, 8)
    assert (gates[..., :2] > 0).all()
    active = gates[..., 2:] != 0
    assert (active.sum(-1) == 3).all()
    expected = torch.zeros_like(probs).scatter(-1, probs.topk(3, -1).indices, 1.0).bool()
    assert torch.equal(active, expected)


def test_output_is_gated_sum_of_attention_heads():
    mixer = make_mixer("moh", d_model=32, n_heads=4, n_shared=1, top_k=1)
    x = random_input(2, 7, 32)
    with torch.no_grad():
        y, _ = mixer(x)
        heads, _ = mixer.attend(x)
        gates = mixer.router(x)
        expected = mixer.out((heads * gates[..., None]).flatten(2))
    assert_close(y, expected, 1e-12, "moh vs gated heads")
    plain = mixer.out(heads.flatten(2))
    assert (y - plain).abs().max() > 1e-3


def test_statistics_aux_loss_and_integrity_counter():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=20, d_model=32, n_layers=2, n_heads=8, mixer="moh")
    model = LanguageModel(cfg)
    model(torch.randint(0, 20, (2, 10)))
    assert feature_counters(model) == {"mixture_of_heads": 2}
    aux = model.auxiliary_loss()
    assert aux is not None and torch.isfinite(aux) and aux > 0
    stats = model.pop_statistics()["blocks.0.mixer.router"]
    assert stats["tokens"] == 20 and len(stats["head_load"]) == 6
    assert sum(stats["head_load"]) == pytest.approx(1.0)
    assert model.pop_statistics()["blocks.0.mixer.router"]["tokens"] == 0
    model.eval()
    with torch.no_grad():
        model(torch.randint(0, 20, (2, 10)))
    assert model.auxiliary_loss() is None


def test_bad_options_are_rejected():
    with pytest.raises(LmlabError, match="top_k"):
        make_mixer("moh", d_model=32, n_heads=4, n_shared=1, top_k=4)
