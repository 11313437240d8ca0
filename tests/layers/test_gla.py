"""Gated Linear Attention: an explicit per-step recurrence, widths and option checks (the
generic contract is in ``test_mixer_contract.py``)."""

import pytest
import torch
from mixer_checks import (
    make_mixer,
    random_input,
)

from lmlab.errors import LmlabError


def test_explicit_recurrence():
    """S_t = diag(alpha_t) S_{t-1} + k_t v_t^T, o_t = K^-1/2 q_t^T S_t with
    log alpha_t = logsigmoid(gate) / 16, then the gated per-head norm and the output projection."""
    mixer = make_mixer("gla", d_model=16, n_heads=2)
    torch.nn.init.normal_(mixer.gate_up.bias, std=2.0)
    x = random_input(1, 6, 16)
    y, state = mixer(x)
    kd, vd = mixer.key_dim, mixer.value_dim
    q, k, v, g, low = mixer.proj(x)[0].split(mixer.splits, dim=-1)
    alpha = torch.sigmoid(mixer.gate_up(low)) ** (1 / 16)
    s = torch.zeros(2, kd, vd, dtype=torch.float64)
    outputs = []
    for t in range(6):
        qt, kt, at = (z[t].view(2, kd) for z in (q, k, alpha))
        s = at[..., None] * s + kt[..., None] * v[t].view(2, 1, vd)
        outputs.append(torch.einsum("hk,hkv->hv", qt, s) * kd**-0.5)
    o = torch.stack(outputs)[None]
    expected = mixer.out(mixer.norm(o, g.view(1, 6, 2, vd)).reshape(1, 6, -1))
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(state["recurrent"][0].double(), s)


def test_default_widths_follow_fla():
    mixer = make_mixer("gla", d_model=32, n_heads=2)
    assert (mixer.key_dim, mixer.value_dim) == (8, 16)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"n_heads": 3}, "expand_k"),
        ({"expand_v": 0.3}, "expand_v"),
        ({"mode": "parallel"}, "mode"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"gate_normalizer": 0.0}, "gate_normalizer"),
    ],
)
def test_bad_options_are_rejected(options, match):
    with pytest.raises(LmlabError, match=match):
        make_mixer("gla", **options)
