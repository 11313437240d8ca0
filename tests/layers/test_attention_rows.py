"""Attention caches of different lengths stacked into one batch (``stack_states``, used by
``lmlab serve``'s continuous batching): each row decodes exactly as it does alone, after
merging stacked batches, selecting rows out and growing the buffer."""

import pytest
import torch
from mixer_checks import assert_close, make_mixer, random_input

from lmlab.layers.attention import Attention
from lmlab.layers.position import Rotary

LENGTHS = [5, 1, 9]


def take(state: dict, rows: list[int]) -> dict:
    """Rows of a stacked cache, as the server selects them (dim 0 of every tensor)."""
    index = torch.tensor(rows)
    return {k: v.index_select(0, index) if torch.is_tensor(v) else v for k, v in state.items()}


@pytest.mark.parametrize(
    ("name", "model"),
    [
        ("attention", {"position": "rope"}),
        ("attention", {"position": "none", "n_kv_heads": 2}),
        ("attention", {"position": "rope", "n_kv_heads": 1}),
        ("moh", {"position": "rope"}),
    ],
)
def test_rows_of_different_lengths_decode_as_they_do_alone(name, model):
    mixer = make_mixer(name, n_heads=4, model=model).eval()
    steps = 12  # the longest row's buffer doubles on the way
    inputs = [random_input(1, length + steps, 32, seed=i) for i, length in enumerate(LENGTHS)]
    with torch.no_grad():
        alone, states = [], []
        for x, length in zip(inputs, LENGTHS, strict=True):
            _, state = mixer(x[:, :length])
            states.append(state)
            outputs = []
            for t in range(length, length + steps):
                y, state = mixer(x[:, t : t + 1], state)
                outputs.append(y)
            alone.append(torch.cat(outputs, 1))
        # rows 0 and 1 start as one batch; row 2 joins after 4 steps; row 1 leaves after 8
        batch = mixer.stack_states(states[:2])
        assert batch is not None and batch["lengths"].tolist() == LENGTHS[:2]
        got: list[list[torch.Tensor]] = [[], [], []]
        rows = [0, 1]
        for step in range(steps):
            if step == 4:
                late = states[2]
                for t in range(LENGTHS[2], LENGTHS[2] + 4):
                    y, late = mixer(inputs[2][:, t : t + 1], late)
                    got[2].append(y)
                batch = mixer.stack_states([batch, late])
                rows = [0, 1, 2]
            if step == 8:
                batch, rows = take(batch, [0, 2]), [0, 2]
            x = torch.cat([inputs[r][:, LENGTHS[r] + step : LENGTHS[r] + step + 1] for r in rows])
            y, batch = mixer(x, batch)
            for i, r in enumerate(rows):
                got[r].append(y[i : i + 1])
    for r, length in enumerate(LENGTHS):
        produced = torch.cat(got[r], 1)
        expected = alone[r][:, : produced.shape[1]]
        assert produced.shape[1] == (8 if r == 1 else steps)
        assert_close(produced, expected, 1e-9, f"row {r} (prompt {length})")


@pytest.mark.parametrize(
    "options",
    [
        {"window": 4},
        {"decode_top_k": 2},
        {"qkv_conv": 3},
        {"model": {"position": "alibi"}},
        {"model": {"position": "cope"}},
    ],
)
def test_caches_needing_more_than_a_mask_do_not_stack_across_lengths(options):
    mixer = make_mixer("attention", n_heads=4, **options)
    with torch.no_grad():
        _, state = mixer(random_input(1, 3, 32))
    assert mixer.stack_states([state, state]) is None


def test_a_stacked_cache_refuses_several_tokens_at_once():
    mixer: Attention = make_mixer("attention", n_heads=4).eval()
    with torch.no_grad():
        _, state = mixer(random_input(1, 3, 32))
        batch = mixer.stack_states([state, state])
        with pytest.raises(ValueError, match="one token at a time"):
            mixer(random_input(2, 2, 32), batch)


def test_rotary_at_per_row_positions_equals_each_rows_offset():
    rotary = Rotary(8, 10000.0)
    x = torch.randn(3, 2, 2, 8, dtype=torch.float64)
    offsets = torch.tensor([0, 7, 300])
    rows = torch.cat([rotary(x[i : i + 1], int(offsets[i])) for i in range(3)])
    torch.testing.assert_close(rotary(x, offsets), rows)
