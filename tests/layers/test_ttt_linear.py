"""TTT-Linear layer: the official block written out around the core (projections, RoPE at
positions modulo the mini-batch, learning-rate gate, post-norm, gate), its initialisation and
option checks (the generic contract is in ``test_mixer_contract.py``)."""

import pytest
import torch
import torch.nn.functional as F
from mixer_checks import make_mixer, random_input

from lmlab.errors import LmlabError
from lmlab.ops.rope import apply_rope, rope_tables
from lmlab.ops.ttt_linear import ttt_linear


@pytest.mark.parametrize("gate", [True, False])
def test_layer_is_the_official_block_around_the_core(gate: bool) -> None:
    mixer = make_mixer("ttt_linear", mini_batch_size=4, gate=gate, base_lr=0.5)
    with torch.no_grad():
        mixer.ln_weight.add_(0.2 * torch.randn_like(mixer.ln_weight))
        mixer.bias0.normal_(std=0.1)
    x = random_input(2, 11, 32)
    y, state = mixer(x)
    heads, dim = 2, 16
    projected = x @ mixer.proj.weight.T
    q, k, v = (projected[..., i * 32 : (i + 1) * 32].reshape(2, 11, heads, dim) for i in range(3))
    cos, sin = rope_tables(torch.arange(11) % 4, dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    lr = torch.sigmoid(projected[..., -heads:]) * 0.5 / dim
    o, _ = ttt_linear(
        q,
        k,
        v,
        mixer.ln_weight,
        mixer.ln_bias,
        lr,
        mini_batch_size=4,
        initial_state=mixer.weight0.expand(2, -1, -1, -1),
        initial_state_bias=mixer.bias0.expand(2, -1, -1, -1),
        mode="recurrent",
    )
    h = F.layer_norm(
        o.reshape(2, 11, 32), (32,), mixer.post_norm.weight, mixer.post_norm.bias, 1e-6
    )
    if gate:
        h = h * F.gelu(projected[..., 96:128], approximate="tanh")
    torch.testing.assert_close(y, h @ mixer.out.weight.T, rtol=1e-9, atol=1e-12)
    assert state["ttt"].seen == 11 % 4


def test_initialisation_follows_the_official_layer() -> None:
    mixer = make_mixer("ttt_linear", d_model=256, n_heads=4)
    assert mixer.weight0.shape == (4, 64, 64)
    assert abs(mixer.weight0.std().item() - 0.02) < 2e-3
    assert not mixer.bias0.any() and not mixer.ln_bias.any()
    assert torch.equal(mixer.ln_weight, torch.ones_like(mixer.ln_weight))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"mini_batch_size": 0}, "mini_batch_size"),
        ({"base_lr": 0.0}, "base_lr"),
        ({"head_dim": 7}, "even head_dim"),
        ({"mode": "parallel"}, "mode"),
    ],
)
def test_bad_options_are_rejected(options: dict, match: str) -> None:
    with pytest.raises(LmlabError, match=match):
        make_mixer("ttt_linear", **options)
