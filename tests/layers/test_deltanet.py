"""DeltaNet: a from-the-papers reference of the whole delta-rule
family (DeltaNet, Gated DeltaNet, KDA) that checks the layers' wiring: convolutions, norms, beta,
decays and gates, independently of the layers' code and of the core."""

import pytest
import torch
import torch.nn.functional as F
from mixer_checks import (
    assert_close,
    check_modes_agree,
    clone_with,
    make_mixer,
    random_input,
)

from lmlab.errors import LmlabError

NAME = "deltanet"


def reference_layer(
    mixer: torch.nn.Module, x: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The layer as the papers write it, one token at a time, with the state ``S [V, K]`` per
    head (keys as columns): ``S <- S diag(alpha)``; ``S <- S + beta (v - S k) k^T``;
    ``o = S q / sqrt(K)``; then the per-head output norm and gate and the output projection.
    Returns the output and the decode state: the last inputs of the short convolution and the
    final ``S`` in the core's layout ``[B, H, K, V]``."""
    name, heads, kd, vd = mixer.mixer_name, mixer.n_heads, mixer.key_dim, mixer.value_dim
    batch, time, _ = x.shape
    slices = F.linear(x, mixer.proj.weight).split(mixer.widths, -1)
    parts = dict(zip(mixer.names, slices, strict=True))
    width, size = mixer.conv_weight.shape
    conv = F.conv1d(parts["qkv"].mT, mixer.conv_weight[:, None], padding=size - 1, groups=width)
    q, k, v = F.silu(conv[..., :time].mT).split([heads * kd, heads * kd, heads * vd], -1)
    q, k, v = (t.reshape(batch, time, heads, -1) for t in (q, k, v))
    q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    beta = torch.sigmoid(parts["beta"]) * mixer.beta_scale
    alpha = torch.ones(batch, time, heads, kd, dtype=x.dtype)
    if name == "gated_deltanet":
        dt = F.softplus(parts["decay"] + mixer.dt_bias)
        alpha = alpha * torch.exp(-mixer.a_log.exp() * dt)[..., None]
    if name == "kda":
        pre = (parts["decay"] @ mixer.decay_up.weight.T).reshape(batch, time, heads, kd)
        alpha = torch.exp(-mixer.a_log.exp() * F.softplus(pre + mixer.dt_bias))
    state = torch.zeros(batch, heads, vd, kd, dtype=x.dtype)
    outs = []
    for t in range(time):
        state = state * alpha[:, t, :, None, :]
        k_t = k[:, t]
        error = v[:, t] - torch.einsum("bhvk,bhk->bhv", state, k_t)
        state = state + beta[:, t, :, None, None] * error[..., None] * k_t[:, :, None, :]
        outs.append(torch.einsum("bhvk,bhk->bhv", state, q[:, t]) / kd**0.5)
    o = torch.stack(outs, 1)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + mixer.norm.eps) * mixer.norm.weight
    if name == "gated_deltanet":
        o = o * F.silu(parts["gate"].reshape(o.shape))
    if name == "kda":
        gate = parts["gate"] @ mixer.gate_up.weight.T + mixer.gate_up.bias
        o = o * torch.sigmoid(gate.reshape(o.shape))
    tail = parts["qkv"][:, -(size - 1) :]
    return o.reshape(batch, time, -1) @ mixer.out.weight.T, {"conv": tail, "recurrent": state.mT}


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet", "kda"])
@pytest.mark.parametrize("options", [{}, {"allow_neg_eigval": True, "chunk_size": 8}])
def test_family_matches_reference(name: str, options: dict) -> None:
    mixer = make_mixer(name, **options)
    x = random_input(2, 21, 32)
    with torch.no_grad():
        y, _ = mixer(x)
        # 1e-6, not float64's 1e-12: GatedRMSNorm normalises in float32.
        assert_close(y, reference_layer(mixer, x)[0], 1e-6, f"{name} vs reference")


def test_negative_eigenvalues_chunk_matches_recurrent() -> None:
    mixer = make_mixer(NAME, allow_neg_eigval=True, chunk_size=16)
    check_modes_agree(mixer, clone_with(mixer, mode="recurrent"), time=37)


def test_state_holds_the_convolution_tail_and_the_final_matrix_state() -> None:
    mixer = make_mixer(NAME, head_dim=8, expand_v=2.0, conv_size=3)
    x = random_input(3, 5, 32)
    _, state = mixer(x)
    _, expected = reference_layer(mixer, x)
    assert state["recurrent"].shape == (3, 2, 8, 16)  # [B, H, K, V]
    torch.testing.assert_close(state["recurrent"], expected["recurrent"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state["conv"], expected["conv"])


@pytest.mark.parametrize(
    "options",
    [{"mode": "parallel"}, {"chunk_size": 0}, {"conv_size": 0}, {"expand_v": 0.3}],
)
def test_bad_options_are_rejected(options: dict) -> None:
    with pytest.raises(LmlabError, match=NAME):
        make_mixer(NAME, **options)
