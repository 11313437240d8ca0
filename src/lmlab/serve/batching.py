"""Stacking per-request model states into one batch and taking rows back out.

Continuous batching decodes many requests in one forward pass. Every mixer's state is a tree of
tensors whose first dimension is the batch (plus plain values such as an attention cache's
length), so states whose trees match apart from that first dimension are concatenated along it
(:func:`signature` says whether they match, for any mixer), decoded together, and rows are
selected back out when a request leaves. States that differ in more than the batch (attention
caches of different lengths) stack only through their mixer's ``stack_states`` hook, which
knows how to pad and mask them; no mixer is special-cased here.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from lmlab.layers.base import TokenMixer
from lmlab.model.cache import ModelState
from lmlab.model.lm import LanguageModel


def signature(tree: Any) -> Hashable:
    """What two states (or layer states) must share to be concatenated: the tree, every plain
    value, and each tensor's shape past the batch dimension and its dtype."""
    leaves, spec = tree_flatten(tree)
    parts = tuple(
        ("t", tuple(leaf.shape[1:]), leaf.dtype) if isinstance(leaf, torch.Tensor) else ("v", leaf)
        for leaf in leaves
    )
    return (str(spec), parts)


def concatenate(trees: Sequence[Any]) -> Any:
    """One tree whose tensors hold the rows of ``trees`` in order (all of one signature)."""
    if len(trees) == 1:
        return trees[0]
    flat = [tree_flatten(tree) for tree in trees]
    leaves = [
        torch.cat(column) if isinstance(column[0], torch.Tensor) else column[0]
        for column in zip(*(leaves for leaves, _ in flat), strict=True)
    ]
    return tree_unflatten(leaves, flat[0][1])


def stack_equal(states: Sequence[ModelState]) -> ModelState:
    """States of one :func:`signature` (e.g. prompts prefilled to the same length) as one.
    ``ModelState.position`` only counts tokens (the scheduler counts each request's own)."""
    layers = concatenate([state.layers for state in states])
    return ModelState(layers, max(state.position for state in states))


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


class Batcher:
    """How one model's decode states share a forward. Per layer, a mixer whose
    ``stack_states`` accepts states that differ (attention caches of any lengths, padded and
    masked) stacks any rows; the other layers' states concatenate when their shapes match
    (recurrent states of a fixed size always do). ``enabled`` is False for a model whose state
    keeps rows apart in its tree (Mixture-of-Depths in eval mode keeps a list of per-row
    states): the scheduler then runs each request in forwards of its own."""

    def __init__(self, model: LanguageModel, vocab_size: int) -> None:
        device = next(model.parameters()).device
        ids = torch.arange(6, device=device).remainder(vocab_size).view(2, 3)
        with torch.inference_mode():
            _, one = model(ids[:1])
            _, two = model(ids)
        self.enabled = rows_split_along_dim0(one, two)
        self.mixers: list[TokenMixer | None] = [
            block.mixer if self.enabled and block.router is None else None for block in model.blocks
        ]
        with torch.inference_mode():
            self.ragged = [
                mixer is not None and mixer.stack_states([layer]) is not None
                for mixer, layer in zip(self.mixers, one.layers, strict=True)
            ]

    def key(self, state: ModelState) -> Hashable:
        """States of equal keys stack with :meth:`stack`."""
        return tuple(
            "any" if ragged else signature(layer)
            for ragged, layer in zip(self.ragged, state.layers, strict=True)
        )

    def stack(self, states: Sequence[ModelState]) -> ModelState:
        """Decode states of one :meth:`key` as one batch, rows in order."""
        layers = []
        for i, (mixer, ragged) in enumerate(zip(self.mixers, self.ragged, strict=True)):
            column = [state.layers[i] for state in states]
            layers.append(mixer.stack_states(column) if ragged else concatenate(column))
        return ModelState(layers, max(state.position for state in states))


def rows_split_along_dim0(one: ModelState, two: ModelState) -> bool:
    """Whether a two-row state has the tree of a one-row state with every tensor twice as
    tall (the rows of a batch are then selectable along dim 0)."""
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
