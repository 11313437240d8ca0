"""Mixture-of-Depths router (``lmlab.layers.mod``) on its own, with a known inner block.

The model-level behaviour (cached decode, FLOPs, carried state, checkpointing) is tested in
``tests/test_layer_features.py``; here the router's arithmetic is checked against a direct
per-token computation.
"""

from __future__ import annotations

import pytest
import torch

from lmlab.layers.mod import DepthRouter

D_MODEL = 8


def doubling_inner(h: torch.Tensor, state: object, take) -> tuple[torch.Tensor, object]:
    """A block whose update is ``2 h`` and whose state counts the tokens it has seen."""
    seen = (0 if state is None else state) + h.shape[1]
    return 2 * h, seen


def router(capacity: float = 0.25) -> DepthRouter:
    torch.manual_seed(0)
    module = DepthRouter(D_MODEL, capacity, aux_loss_coef=0.1)
    with torch.no_grad():
        module.score.weight.normal_(std=1.0)
    return module


@pytest.mark.parametrize(("capacity", "time", "count"), [(0.25, 16, 4), (0.3, 7, 3), (0.01, 5, 1)])
def test_routed_count_is_the_ceiling_and_at_least_one(capacity, time, count):
    assert router(capacity).routed_count(time) == count


def test_training_adds_the_gated_update_at_the_top_k_positions_only():
    module = router(0.25).train()
    x = torch.randn(3, 16, D_MODEL, requires_grad=True)
    y, state = module(x, doubling_inner)
    logits = (x @ module.score.weight.T).squeeze(-1)
    top = logits.topk(4, dim=1).indices
    routed = torch.zeros(3, 16, dtype=torch.bool).scatter(1, top, True)
    expected = torch.where(routed[..., None], x + torch.sigmoid(logits)[..., None] * 2 * x, x)
    torch.testing.assert_close(y, expected)
    assert state == {"mixer": 4}
    y.sum().backward()
    assert module.score.weight.grad.abs().sum() > 0  # the gate carries the router's gradient
    assert module.aux_loss is not None and module.aux_loss > 0


def test_eval_routes_positive_logits_per_row_and_keeps_a_state_per_row():
    module = router().eval()
    x = torch.randn(2, 9, D_MODEL)
    with torch.no_grad():
        y, state = module(x, doubling_inner)
        logits = (x @ module.score.weight.T).squeeze(-1)
    routed = logits > 0
    expected = torch.where(routed[..., None], x + torch.sigmoid(logits)[..., None] * 2 * x, x)
    torch.testing.assert_close(y, expected)
    assert state == {"rows": [int(n) if n else None for n in routed.sum(1)]}


def test_a_state_cannot_switch_between_training_and_eval_routing():
    module = router()
    x = torch.randn(1, 4, D_MODEL)
    _, training_state = module.train()(x, doubling_inner)
    with pytest.raises(ValueError, match="training state cannot continue in eval mode"):
        module.eval()(x, doubling_inner, training_state)
    _, eval_state = module.eval()(x, doubling_inner)
    with pytest.raises(ValueError, match="state from eval mode cannot continue in training"):
        module.train()(x, doubling_inner, eval_state)
