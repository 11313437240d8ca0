"""Mamba-3 (SISO): the paper's complex-valued, exponential-trapezoidal recurrence written out step
by step against the layer (which runs it as a shifted real recurrence on the GLA core) in both
core modes, and option checks (the generic contract is in ``test_mixer_contract.py``)."""

import pytest
import torch
import torch.nn.functional as F
from mixer_checks import make_mixer, random_input

from lmlab.errors import LmlabError

SMALL = {"head_dim": 16, "d_state": 8, "ngroups": 2}


def _perturbed(**options) -> torch.nn.Module:
    """Random B/C biases and norm weights, so that their paths show."""
    mixer = make_mixer("mamba3", **(SMALL | options))
    with torch.no_grad():
        for p in (mixer.b_bias, mixer.c_bias, mixer.b_norm.weight, mixer.c_norm.weight):
            p.add_(0.3 * torch.randn_like(p))
    return mixer


def _complex_reference(mixer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """h_t = e^{dt (A - i theta)} h_{t-1} + (1 - lam) dt e^{dt (A - i theta)} B_{t-1} x_{t-1}
    + lam dt B_t x_t with a complex state (channel pairs (n, n + N/2) as real and imaginary
    parts), y_t = Re(C_t^H h_t) + D x_t, then rms_norm(y * silu(z)) per group and out."""
    time, heads, p, n = x.shape[1], mixer.n_heads, 16, 8
    z, xs, b, c, theta, dt, lam = mixer.in_proj(x)[0].split(mixer.splits, dim=-1)
    group = torch.arange(heads) // (heads // 2)

    def bc(t: torch.Tensor, norm: torch.nn.Module, bias: torch.Tensor) -> torch.Tensor:
        normed = norm(t.view(time, 2, n))[:, group] + bias  # [T, H, N]
        return torch.complex(normed[..., : n // 2], normed[..., n // 2 :])

    b, c = bc(b, mixer.b_norm, mixer.b_bias), bc(c, mixer.c_norm, mixer.c_bias)
    theta = theta.view(time, 2, n // 2)[:, group]  # [T, H, N/2]
    dt = F.softplus(dt + mixer.dt_bias)
    lam = torch.sigmoid(lam)
    a = -mixer.A_log.exp()
    xs = xs.view(time, heads, p).to(torch.complex128)
    h = torch.zeros(heads, n // 2, p, dtype=torch.complex128)
    previous = torch.zeros(heads, n // 2, p, dtype=torch.complex128)  # B_{t-1} x_{t-1}^T
    outputs = []
    for t in range(time):
        step = torch.exp(dt[t, :, None] * torch.complex(a[:, None].expand(-1, n // 2), -theta[t]))
        current = b[t, :, :, None] * xs[t, :, None, :]
        trapezoid = ((1 - lam[t]) * dt[t])[:, None, None] * step[..., None] * previous
        h = step[..., None] * h + trapezoid + (lam[t] * dt[t])[:, None, None] * current
        previous = current
        y = torch.einsum("hn,hnp->hp", c[t].conj(), h).real + mixer.D[:, None] * xs[t].real
        outputs.append(y)
    y = torch.stack(outputs).reshape(time, 2, -1) * F.silu(z.view(time, 2, -1))
    normed = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + 1e-5) * mixer.norm.weight
    return mixer.out(normed.reshape(1, time, -1))


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_layer_matches_the_complex_trapezoidal_recurrence(mode: str) -> None:
    mixer = _perturbed(mode=mode, chunk_size=4)
    with torch.no_grad():  # angles large enough to turn the state visibly
        mixer.in_proj.weight.mul_(3.0)
    x = random_input(1, 11, 32)
    y, _ = mixer(x)
    torch.testing.assert_close(y, _complex_reference(mixer, x), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"d_state": 7}, "even"),
        ({"head_dim": 48}, "head_dim"),
        ({"ngroups": 3}, "ngroups"),
        ({"mode": "parallel"}, "mode"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_options_are_rejected(options: dict, match: str) -> None:
    with pytest.raises(LmlabError, match=match):
        make_mixer("mamba3", **(SMALL | options))
