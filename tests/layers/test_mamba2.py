"""Mamba-2 (SSD): the SSM recurrence written out step by step and the mamba_ssm initialisation
(the generic contract is in ``test_mixer_contract.py``)."""

import math

import pytest
import torch
import torch.nn.functional as F
from mixer_checks import (
    make_mixer,
    random_input,
)

from lmlab.errors import LmlabError

SMALL = {"head_dim": 16, "d_state": 8}


def test_explicit_ssm_recurrence():
    """h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t^T, y_t = C_t^T h_t + D x_t (no K^-1/2), each
    group's B and C shared by its heads, then rms_norm(y * silu(z)) * w per group and out."""
    mixer = make_mixer("mamba2", ngroups=2, **SMALL)
    x = random_input(1, 6, 32)
    y, state = mixer(x)
    heads, p, n = mixer.n_heads, 16, 8
    z, xbc, dt = mixer.in_proj(x).split(mixer.splits, dim=-1)
    width = mixer.conv_weight.shape[-1]
    padded = F.pad(xbc.transpose(1, 2), (width - 1, 0))
    xbc = F.silu(F.conv1d(padded, mixer.conv_weight, mixer.conv_bias, groups=xbc.shape[-1]))
    xs, b, c = xbc[0].T.split([mixer.d_inner, 2 * n, 2 * n], dim=-1)
    dt = F.softplus(dt[0] + mixer.dt_bias)
    a = -mixer.A_log.exp()
    h = torch.zeros(heads, n, p, dtype=torch.float64)
    outputs = []
    for t in range(6):
        xt = xs[t].view(heads, p)
        group = torch.arange(heads) // (heads // 2)
        bt, ct = b[t].view(2, n)[group], c[t].view(2, n)[group]
        decay, step = (dt[t] * a).exp()[:, None, None], dt[t][:, None, None]
        h = decay * h + step * bt[..., None] * xt[:, None]
        outputs.append(torch.einsum("hn,hnp->hp", ct, h) + mixer.D[:, None] * xt)
    gated = torch.stack(outputs).reshape(6, 2, -1) * F.silu(z[0].view(6, 2, -1))
    normed = gated * torch.rsqrt(gated.square().mean(-1, keepdim=True) + 1e-5) * mixer.norm.weight
    expected = mixer.out(normed.reshape(1, 6, -1))
    torch.testing.assert_close(y, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(state["recurrent"][0].double(), h)


def test_initialisation_follows_mamba_ssm():
    mixer = make_mixer("mamba2", d_model=512, **SMALL)
    a = mixer.A_log.exp().detach()
    dt = F.softplus(mixer.dt_bias).detach()
    assert a.min() >= 1 and a.max() <= 16
    assert dt.min() >= 0.001 * (1 - 1e-6) and dt.max() <= 0.1 * (1 + 1e-6)
    assert math.log(dt.max() / dt.min()) > 0.5 * math.log(100)  # spread over the log range
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))
    assert mixer.conv_weight.ndim == 3  # a filter, kept away from Muon like nn.Conv1d's


def test_default_heads_are_64_wide():
    mixer = make_mixer("mamba2", d_model=64)
    assert (mixer.n_heads, mixer.head_dim, mixer.d_state) == (2, 64, 128)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"head_dim": 48}, "head_dim"),
        ({"ngroups": 3, **SMALL}, "ngroups"),
        ({"d_state": 0}, "d_state"),
        ({"a_init_min": 0.0}, "a_init"),
        ({"dt_max": 0.0001}, "dt_min"),
        ({"mode": "parallel"}, "mode"),
    ],
)
def test_bad_options_are_rejected(options, match):
    with pytest.raises(LmlabError, match=match):
        make_mixer("mamba2", **options)
