"""Stacking per-request model states into one batch and taking rows back out.

Continuous batching decodes many requests in one forward pass. Every mixer's state is a tree of
tensors whose first dimension is the batch (plus plain values such as an attention cache's
length), so states whose trees match apart from that first dimension are concatenated along it,
decoded together, and rows are selected back out when a request leaves. Whether two states match
is a generic test (:func:`signature`), so no mixer is special-cased here: recurrent states of a
fixed size always match; an attention cache matches another of the same length and buffer size.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from lmlab.model.cache import ModelState
from lmlab.model.lm import LanguageModel


def signature(state: ModelState) -> Hashable:
    """What two states must share to be stacked: the tree, every plain value, and each tensor's
    shape past the batch dimension and its dtype. ``ModelState.position`` is left out: it only
    counts tokens (the scheduler counts each request's own)."""
    leaves, spec = tree_flatten(state.layers)
    parts = tuple(
        ("t", tuple(leaf.shape[1:]), leaf.dtype) if isinstance(leaf, torch.Tensor) else ("v", leaf)
        for leaf in leaves
    )
    return (str(spec), parts)


def stack(states: Sequence[ModelState]) -> ModelState:
    """One state whose rows are ``states``' rows in order (all of one :func:`signature`)."""
    if len(states) == 1:
        return states[0]
    flat = [tree_flatten(state.layers) for state in states]
    spec = flat[0][1]
    leaves = [
        torch.cat(column) if isinstance(column[0], torch.Tensor) else column[0]
        for column in zip(*(leaves for leaves, _ in flat), strict=True)
    ]
    return ModelState(tree_unflatten(leaves, spec), max(state.position for state in states))


def select(state: ModelState, rows: Sequence[int]) -> ModelState:
    """The state of ``rows`` only (a copy, so the old batch's memory is released)."""
    leaves, spec = tree_flatten(state.layers)
    index = None
    kept = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if index is None or index.device != leaf.device:
                index = torch.tensor(list(rows), device=leaf.device)
            leaf = leaf.index_select(0, index)
        kept.append(leaf)
    return ModelState(tree_unflatten(kept, spec), state.position)


def repeat(state: ModelState, times: int) -> ModelState:
    """``times`` copies of a one-row state as one batch (``n`` choices of one prompt)."""
    return select(state, [0] * times)


@torch.no_grad()
def rows_are_stackable(model: LanguageModel, vocab_size: int) -> bool:
    """Whether this model's states batch along their first dimension: a state made from two
    rows at once must have the tree of a one-row state with every tensor twice as tall. A model
    whose state keeps rows apart in its tree (Mixture-of-Depths in eval mode keeps a list of
    per-row states) fails, and the scheduler then decodes each request on its own."""
    device = next(model.parameters()).device
    ids = torch.arange(6, device=device).remainder(vocab_size).view(2, 3)
    _, one = model(ids[:1])
    _, two = model(ids)
    one_leaves, one_spec = tree_flatten(one.layers)
    two_leaves, two_spec = tree_flatten(two.layers)
    if str(one_spec) != str(two_spec):
        return False
    for a, b in zip(one_leaves, two_leaves, strict=True):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return False
        if isinstance(a, torch.Tensor):
            if a.shape[0] != 1 or b.shape[0] != 2 or a.shape[1:] != b.shape[1:]:
                return False
        elif a != b:
            return False
    return True
