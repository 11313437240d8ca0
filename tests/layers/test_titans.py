"""Titans (MAG): the layer written out around the memory core (persistent tokens, sliding-window
attention that always sees them, the gate), the MLP memory's weights and option checks (the
generic contract is in ``test_mixer_contract.py``)."""

import math

import pytest
import torch
import torch.nn.functional as F
from mixer_checks import (
    make_mixer,
    random_input,
)

from lmlab.errors import LmlabError
from lmlab.ops.neural_memory import neural_memory
from lmlab.ops.rope import apply_rope, rope_tables


def test_layer_is_memory_gated_window_attention_with_persistent_tokens() -> None:
    mixer = make_mixer("titans", window=3, persistent_tokens=2, conv_size=1, chunk_size=4)
    with torch.no_grad():
        mixer.conv_weight.fill_(1.0)  # width 1: the convolution is silu alone
    x = random_input(1, 9, 32)
    y, _ = mixer(x)
    heads, dim, width = 2, 16, 32
    stream = torch.cat((mixer.persistent[None], x), dim=1)  # [P; x]
    attn, memory, gates = mixer.proj(stream).split(mixer.widths, dim=-1)
    q, k, v = attn.view(1, 11, 3, heads, dim).unbind(2)
    cos, sin = rope_tables(torch.arange(9), dim)
    q_real = apply_rope(q[:, 2:], cos, sin)
    k_real = apply_rope(k[:, 2:], cos, sin)
    outputs = []
    for t in range(9):  # keys: both persistent tokens, then real tokens t-2 .. t
        keys = torch.cat((k[0, :2], k_real[0, max(t - 2, 0) : t + 1]))
        values = torch.cat((v[0, :2], v[0, 2:][max(t - 2, 0) : t + 1]))
        scores = torch.einsum("hd,khd->hk", q_real[0, t], keys) / math.sqrt(dim)
        outputs.append(torch.einsum("hk,khd->hd", scores.softmax(-1), values))
    y_attn = torch.stack(outputs)[None]
    mq, mk, mv = F.silu(memory).view(1, 11, 3, heads, dim).unbind(2)
    pre = gates.view(1, 11, 3, heads) + mixer.gate_bias
    y_mem, _ = neural_memory(
        F.normalize(mq, dim=-1),
        F.normalize(mk, dim=-1),
        mv,
        0.5 * torch.sigmoid(pre[..., 0, :]),
        F.logsigmoid(pre[..., 1, :]),
        torch.log1p(-torch.sigmoid(pre[..., 2, :])),
        initial_state=(mixer.memory_init[0][None],),
        mode="recurrent",
        chunk_size=4,
    )

    def rms(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return t * torch.rsqrt(t.square().mean(-1, keepdim=True) + 1e-5) * weight

    gated = rms(y_attn, mixer.attn_norm.weight) * torch.sigmoid(
        rms(y_mem[:, 2:], mixer.memory_norm.weight)
    )
    torch.testing.assert_close(y, mixer.out(gated.reshape(1, 9, width)), rtol=1e-9, atol=1e-12)


def test_persistent_tokens_stay_visible_beyond_the_window() -> None:
    """Late tokens (far outside the window) still depend on the persistent tokens through the
    attention branch, also when decoding from a carried state."""
    mixer = make_mixer("titans", window=2, memory="linear")
    x = random_input(1, 12, 32)
    with torch.no_grad():
        _, state = mixer(x[:, :10])
        before, _ = mixer(x[:, 10:], state)
        mixer.persistent.mul_(2.0)  # the memory's state already holds the old tokens
        after, _ = mixer(x[:, 10:], state)
    assert (before - after).abs().max() > 1e-3


def test_mlp_memory_weights() -> None:
    mixer = make_mixer("titans", memory="mlp", mlp_expand=3)
    assert [tuple(w.shape) for w in mixer.memory_init] == [(2, 16, 48), (2, 48, 16)]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"memory": "deep"}, "memory"),
        ({"window": 0}, "window"),
        ({"persistent_tokens": -1}, "persistent_tokens"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"head_dim": 7}, "even head_dim"),
        ({"mode": "parallel"}, "mode"),
    ],
)
def test_bad_options_are_rejected(options: dict, match: str) -> None:
    with pytest.raises(LmlabError, match=match):
        make_mixer("titans", **options)
