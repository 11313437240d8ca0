"""Mamba-3, SISO and MIMO: the paper's complex-valued, exponential-trapezoidal recurrence with a
rank-R state update written out step by step against the layer (which runs it as a shifted
real recurrence of R core steps per token on the GLA core) in both core modes, outputs and
gradients, and option checks (the generic contract, decode and segments included, is in
``test_mixer_contract.py``)."""

import pytest
import torch
import torch.nn.functional as F
from mixer_checks import assert_close, make_mixer, random_input

from lmlab.errors import LmlabError

SMALL = {"head_dim": 16, "d_state": 8, "ngroups": 2}
P, N, GROUPS = 16, 8, 2


def _perturbed(**options) -> torch.nn.Module:
    """Random B/C biases, norm weights and MIMO weights (``mixer_checks``), and angles large
    enough to turn the state visibly."""
    mixer = make_mixer("mamba3", perturb=True, **(SMALL | options))
    with torch.no_grad():
        mixer.in_proj.weight.mul_(3.0)
    return mixer


def _complex_reference(mixer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """h_t = e^{dt (A - i theta)} h_{t-1} + (1 - lam) dt e^{dt (A - i theta)} U_{t-1}
    + lam dt U_t with U_t = sum_r B_t[r] X_t[r]^T, X_t[r] = x_t * w_x[r] (x_t for SISO), a
    complex state (channel pairs (n, n + N/2) as real and imaginary parts);
    o_t[r] = Re(C_t[r]^H h_t) + D X_t[r], y_t = sum_r w_o[r] o_t[r] silu(z_t w_z[r])
    (o_t silu(z_t) for SISO), then rms_norm per group and out."""
    time, heads, rank = x.shape[1], mixer.n_heads, mixer.rank
    z, xs, b, c, theta, dt, lam = mixer.in_proj(x)[0].split(mixer.splits, dim=-1)
    group = torch.arange(heads) // (heads // GROUPS)

    def bc(t: torch.Tensor, norm: torch.nn.Module, bias: torch.Tensor) -> torch.Tensor:
        normed = norm(t.view(time, rank, GROUPS, N))[:, :, group] + bias  # [T, R, H, N]
        return torch.complex(normed[..., : N // 2], normed[..., N // 2 :])

    b, c = bc(b, mixer.b_norm, mixer.b_bias), bc(c, mixer.c_norm, mixer.c_bias)
    theta = theta.view(time, GROUPS, N // 2)[:, group]  # [T, H, N/2]
    dt = F.softplus(dt + mixer.dt_bias)
    lam = torch.sigmoid(lam)
    a = -mixer.A_log.exp()
    xs, z = xs.view(time, heads, P), z.view(time, heads, P)
    if rank == 1:
        lifted, gates, reduce = xs[:, None], F.silu(z)[:, None], torch.ones(1, heads, P)
    else:
        lifted, gates, reduce = (
            xs[:, None] * mixer.mimo_x,
            F.silu(z[:, None] * mixer.mimo_z),
            mixer.mimo_o,
        )
    lifted = lifted.to(torch.complex128)  # [T, R, H, P]
    h = torch.zeros(heads, N // 2, P, dtype=torch.complex128)
    previous = torch.zeros(heads, N // 2, P, dtype=torch.complex128)  # U_{t-1}
    outputs = []
    for t in range(time):
        step = torch.exp(dt[t, :, None] * torch.complex(a[:, None].expand(-1, N // 2), -theta[t]))
        current = torch.einsum("rhn,rhp->hnp", b[t], lifted[t])
        trapezoid = ((1 - lam[t]) * dt[t])[:, None, None] * step[..., None] * previous
        h = step[..., None] * h + trapezoid + (lam[t] * dt[t])[:, None, None] * current
        previous = current
        read = torch.einsum("rhn,hnp->rhp", c[t].conj(), h).real
        read = read + mixer.D[:, None] * lifted[t].real
        outputs.append((reduce * read * gates[t]).sum(0))
    y = torch.stack(outputs).reshape(time, GROUPS, -1)
    normed = y * torch.rsqrt(y.square().mean(-1, keepdim=True) + 1e-5) * mixer.norm.weight
    return mixer.out(normed.reshape(1, time, -1))


def _output_and_gradients(module, forward, x: torch.Tensor) -> list[torch.Tensor]:
    module.zero_grad()
    xi = x.clone().requires_grad_(True)
    y = forward(xi)
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
    (y * weights).sum().backward()
    return [y.detach(), xi.grad, *(p.grad for p in module.parameters())]


@pytest.mark.parametrize("rank", [1, 2, 4])
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_layer_matches_the_complex_trapezoidal_recurrence(mode: str, rank: int) -> None:
    """Outputs and the gradients of the input and of every parameter, float64, 11 tokens
    (chunks of 5 core steps: chunk boundaries fall inside tokens for MIMO)."""
    mixer = _perturbed(mode=mode, chunk_size=5, mimo_rank=rank)
    x = random_input(1, 11, 32)
    ours = _output_and_gradients(mixer, lambda xi: mixer(xi)[0], x)
    reference = _output_and_gradients(mixer, lambda xi: _complex_reference(mixer, xi), x)
    names = ["output", "input gradient", *(name for name, _ in mixer.named_parameters())]
    for name, actual, expected in zip(names, ours, reference, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize(
    ("dtype", "rtol"), [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)], ids=["float32", "bf16"]
)
def test_mimo_in_lower_precision_matches_the_recurrence(dtype: torch.dtype, rtol: float) -> None:
    """Rank 4 over 37 tokens, float32 weights and input, and bfloat16 under autocast (as
    training runs it), against the complex128 recurrence of the same weights."""
    mixer = _perturbed(mimo_rank=4, chunk_size=16)
    x = random_input(2, 37, 32)
    with torch.no_grad():
        expected = torch.cat([_complex_reference(mixer, x[i : i + 1]) for i in range(2)])
        low = mixer.float()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            actual, _ = low(x.float())
    assert_close(actual.double(), expected, rtol, f"mimo rank 4 in {dtype}")


@pytest.mark.parametrize(("write", "read"), [(0, 0), (1, 0), (0, 1), (1, 1)])
def test_siso_is_mimo_with_one_live_column(write: int, read: int) -> None:
    """A rank-2 layer whose two B and C columns copy a SISO layer's, with ``w_x`` and ``w_o``
    one-hot (the input written through column ``write``, the output read through ``read``;
    ``D = 0``, since ``D`` acts on the lifted input) is that SISO layer: the write of a later
    column within a token (``write > read``) is the exact intra-token correction."""
    siso = _perturbed(mimo_rank=1)
    mimo = make_mixer("mamba3", mimo_rank=2, **SMALL)
    bc = GROUPS * N
    with torch.no_grad():
        z, xs, b, c, rest = siso.in_proj.weight.split([32 * 2, 32 * 2, bc, bc, bc // 2 + 8])
        mimo.in_proj.weight.copy_(torch.cat([z, xs, b, b, c, c, rest]))
        for name in ("b_bias", "c_bias"):
            getattr(mimo, name).copy_(getattr(siso, name).expand(2, -1, -1))
        for name in ("b_norm.weight", "c_norm.weight", "A_log", "dt_bias", "norm.weight"):
            mimo.get_parameter(name).copy_(siso.get_parameter(name))
        mimo.out.weight.copy_(siso.out.weight)
        siso.D.zero_()
        mimo.D.zero_()
        mimo.mimo_z.fill_(1.0)
        for weight, column in ((mimo.mimo_x, write), (mimo.mimo_o, read)):
            weight.zero_()[column] = 1.0
    x = random_input(2, 13, 32)
    with torch.no_grad():
        assert_close(mimo(x)[0], siso(x)[0], 1e-12, f"write {write}, read {read}")


def test_siso_keeps_its_parameters() -> None:
    """``mimo_rank = 1`` (the default) is the SISO layer with its former parameter shapes, so
    its checkpoints load; MIMO adds per-column biases and its three weights."""
    shapes = {name: tuple(p.shape) for name, p in make_mixer("mamba3", **SMALL).named_parameters()}
    assert shapes["b_bias"] == shapes["c_bias"] == (4, N) and "mimo_x" not in shapes
    mimo = dict(make_mixer("mamba3", mimo_rank=3, **SMALL).named_parameters())
    assert mimo["b_bias"].shape == (3, 4, N) and mimo["mimo_o"].shape == (3, 4, P)


def test_flops_count_every_column() -> None:
    """R writes and R reads of the N x P state per head, plus two R x R blocks of column pairs
    per token (own token, missing writes), the lift, the gates and the reduction."""
    heads = 4
    siso, mimo = (make_mixer("mamba3", mimo_rank=r, **SMALL) for r in (1, 4))
    core = 4.0 * heads * N * P
    assert siso.extra_flops_per_token(64) == core + 8.0 * heads * N
    expected = 4 * (core + 8.0 * heads * N) + heads * (2.0 * 32 * (N + P) + 5.0 * 4 * P)
    assert mimo.extra_flops_per_token(64) == expected


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"d_state": 7}, "even"),
        ({"head_dim": 48}, "head_dim"),
        ({"ngroups": 3}, "ngroups"),
        ({"mode": "parallel"}, "mode"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"mimo_rank": 0}, "mimo_rank=0 must be an integer >= 1"),
        ({"mimo_rank": 2.5}, "mimo_rank=2.5"),
        ({"mimo_rank": True}, "mimo_rank=True"),
    ],
)
def test_bad_options_are_rejected(options: dict, match: str) -> None:
    with pytest.raises(LmlabError, match=match) as error:
        make_mixer("mamba3", **(SMALL | options))
    assert "\n" not in str(error.value)
