"""Modern Hopfield retrieval: the op against the update written out per query, the mixer
against causal attention (its one-step case) and against the op on its own store, its option
checks, and the associative-memory probe."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from mixer_checks import make_mixer

from lmlab.errors import LmlabError, ParamError
from lmlab.memory.hopfield import hopfield_recall
from lmlab.ops.hopfield import hopfield_retrieve


def direct_update(xi: torch.Tensor, stored: torch.Tensor, beta: float, visible) -> torch.Tensor:
    """xi_new = X^T softmax(beta X xi) for one state pattern, over the visible rows of X."""
    rows = [j for j in range(stored.shape[0]) if visible[j]]
    energies = [beta * float(stored[j] @ xi) for j in rows]
    top = max(energies)
    weights = [math.exp(e - top) for e in energies]
    total = sum(weights)
    return sum(w / total * stored[j] for w, j in zip(weights, rows, strict=True))


@pytest.mark.parametrize("steps", [1, 2, 3])
@pytest.mark.parametrize("with_values", [False, True])
def test_retrieval_matches_the_update_written_out(steps: int, with_values: bool):
    generator = torch.Generator().manual_seed(steps)
    query = torch.randn(2, 5, 6, generator=generator, dtype=torch.float64)
    patterns = torch.randn(2, 7, 6, generator=generator, dtype=torch.float64)
    values = torch.randn(2, 7, 4, generator=generator, dtype=torch.float64) if with_values else None
    mask = torch.rand(2, 5, 7, generator=generator) > 0.4
    mask[..., 0] = True
    got = hopfield_retrieve(query, patterns, 0.8, steps=steps, values=values, mask=mask)
    for b in range(2):
        for i in range(5):
            xi = query[b, i]
            for step in range(steps):
                last = step == steps - 1
                if last and values is not None:
                    # the readout: the same association weights, applied to the values
                    rows = patterns[b] @ xi * 0.8
                    rows = rows.masked_fill(~mask[b, i], -math.inf).softmax(-1)
                    xi = rows @ values[b]
                else:
                    xi = direct_update(xi, patterns[b], 0.8, mask[b, i])
            torch.testing.assert_close(got[b, i], xi)


def test_one_step_retrieves_a_stored_pattern_from_a_noisy_one():
    patterns = torch.randint(0, 2, (16, 64), generator=torch.Generator().manual_seed(0)) * 2.0 - 1
    noisy = patterns[3].clone()
    noisy[:12] *= -1
    retrieved = hopfield_retrieve(noisy[None], patterns, beta=1.0)
    assert torch.equal(retrieved.sign()[0], patterns[3])


def test_the_one_step_mixer_without_slots_is_causal_attention():
    """Ramsauer et al.: with beta = 1/sqrt(d), one update and no learned patterns, the
    Hopfield layer over the sequence is softmax attention."""
    mixer = make_mixer("hopfield", d_model=32, n_heads=4, slots=0)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    q, k, v = (mixer._heads(p) for p in mixer.proj(x).chunk(3, dim=-1))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected = mixer.out(expected.transpose(1, 2).reshape(2, 11, 32))
    torch.testing.assert_close(mixer(x)[0], expected)


def test_the_mixer_retrieves_from_its_slots_and_the_visible_tokens():
    mixer = make_mixer("hopfield", d_model=16, n_heads=2, slots=3, window=4, steps=2, beta=0.7)
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    q, k, v = (mixer._heads(p) for p in mixer.proj(x).chunk(3, dim=-1))
    rows = []
    for i in range(9):
        seen = [j for j in range(9) if i - 4 < j <= i]
        keys = torch.cat([mixer.slot_keys, k[0][:, seen]], dim=1)
        values = torch.cat([mixer.slot_values, v[0][:, seen]], dim=1)
        rows.append(hopfield_retrieve(q[0][:, i : i + 1], keys, 0.7, steps=2, values=values))
    expected = mixer.out(torch.cat(rows, dim=1).transpose(0, 1).reshape(1, 9, 16))
    torch.testing.assert_close(mixer(x)[0], expected)


def test_the_decode_state_is_bounded_by_the_window_only():
    bounded = make_mixer("hopfield", window=4)
    growing = make_mixer("hopfield")
    slots_only = make_mixer("hopfield", context=False)
    assert not bounded.cache_grows_with_context and growing.cache_grows_with_context
    assert not slots_only.cache_grows_with_context
    _, state = bounded(torch.randn(1, 10, 32, dtype=torch.float64))
    assert state["keys"].shape[2] == 3 and state["position"] == 10
    assert set(slots_only(torch.randn(1, 3, 32, dtype=torch.float64))[1]) == {"position"}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"slots": 0, "context": False}, "leaves nothing to retrieve"),
        ({"window": 4, "context": False}, "window needs context=true"),
        ({"steps": 0}, "steps >= 1"),
        ({"beta": -1.0}, "beta must be >= 0"),
    ],
)
def test_incompatible_options_are_one_line_errors(options, message):
    with pytest.raises(LmlabError, match=message):
        make_mixer("hopfield", **options)


def test_the_probe_recalls_few_patterns_and_fails_at_a_tiny_beta():
    strong = hopfield_recall(16, 64, beta=1.0, queries=256)
    assert strong["recall"] == 1.0 and strong["bit_accuracy"] == 1.0
    flat = hopfield_recall(16, 64, beta=1e-3, queries=256)
    assert flat["recall"] < 0.05 and flat["bit_accuracy"] < 0.8  # the mean of all patterns
    crowded = hopfield_recall(2048, 32, beta=1.0, queries=256)
    assert crowded["recall"] < strong["recall"]
    with pytest.raises(ParamError, match=r"noise=1\.5"):
        hopfield_recall(4, 32, 1.0, noise=1.5)
