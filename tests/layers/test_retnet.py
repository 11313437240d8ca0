"""RetNet multi-scale retention: the paper's parallel form, its decay rates and state (the generic
contract is in ``test_mixer_contract.py``)."""

import pytest
import torch
from mixer_checks import (
    make_mixer,
    random_input,
)

from lmlab.errors import LmlabError


def test_parallel_form_of_the_paper():
    """Retention(X) = (Q K^T * D) V with D[n, m] = gamma^(n - m) for n >= m, per head, with
    the rotation applied to q and k; then the gated per-head norm and the output projection."""
    mixer = make_mixer("retnet", d_model=16, n_heads=4, expand_v=1.0)
    x = random_input(1, 9, 16)
    y, _ = mixer(x)
    heads, kd, vd = 4, mixer.key_dim, mixer.value_dim
    q, k, v, g = mixer.proj(x).split(mixer.splits, dim=-1)
    q = mixer.rotary(q.view(1, 9, heads, kd))
    k = mixer.rotary(k.view(1, 9, heads, kd))
    v = v.view(1, 9, heads, vd)
    n = torch.arange(9, dtype=torch.float64)
    outputs = []
    for h in range(heads):
        gamma = 1 - 2.0 ** (-5 - h)
        decay = torch.where(n[:, None] >= n[None, :], gamma ** (n[:, None] - n[None, :]), 0.0)
        scores = q[0, :, h] @ k[0, :, h].T * kd**-0.5 * decay
        outputs.append(scores @ v[0, :, h])
    o = torch.stack(outputs, dim=1)[None]
    expected = mixer.out(mixer.norm(o, g.view(1, 9, heads, vd)).reshape(1, 9, -1))
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-12)


def test_decays_are_the_papers_multi_scale_rates():
    mixer = make_mixer("retnet", n_heads=4, d_model=32)
    expected = torch.tensor([1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128, 1 - 1 / 256], dtype=torch.float64)
    torch.testing.assert_close(mixer.log_gamma(random_input(1, 1, 32)).exp(), expected)


def test_state_carries_position():
    mixer = make_mixer("retnet")
    _, state = mixer(random_input(1, 5, 32))
    assert state["position"] == 5
    _, state = mixer(random_input(1, 3, 32), state)
    assert state["position"] == 8
    assert state["recurrent"].shape == (1, 2, mixer.key_dim, mixer.value_dim)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"d_model": 6, "n_heads": 2}, "even"),
        ({"expand_v": 0.3}, "expand_v"),
        ({"mode": "parallel"}, "mode"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_options_are_rejected(options, match):
    with pytest.raises(LmlabError, match=match):
        make_mixer("retnet", **options)
