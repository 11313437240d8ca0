"""lmlab's Muon against torch.optim.Muon (the reference implementation)."""

import pytest
import torch

from lmlab.train.muon import Muon, newton_schulz


def train_pair(reference_cls, ours_kwargs, steps=4):
    torch.manual_seed(0)
    weights = [torch.randn(24, 40), torch.randn(40, 16)]
    ref = [w.clone().requires_grad_(True) for w in weights]
    mine = [w.clone().requires_grad_(True) for w in weights]
    ref_opt = reference_cls(ref, lr=0.02, weight_decay=0.1)
    my_opt = Muon(mine, lr=0.02, weight_decay=0.1, **ours_kwargs)
    for step in range(steps):
        grads = [
            torch.randn_like(w, generator=torch.Generator().manual_seed(step)) for w in weights
        ]
        for params, opt in ((ref, ref_opt), (mine, my_opt)):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()
    return ref, mine


def test_bf16_iteration_matches_torch_muon_exactly():
    ref, mine = train_pair(torch.optim.Muon, {"ns_dtype": torch.bfloat16})
    for a, b in zip(ref, mine, strict=True):
        assert torch.equal(a, b)


def test_float32_iteration_is_close_to_torch_muon():
    ref, mine = train_pair(torch.optim.Muon, {"ns_dtype": torch.float32})
    for a, b in zip(ref, mine, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3)


def test_newton_schulz_orthogonalises():
    torch.manual_seed(0)
    g = torch.randn(32, 64)
    u = newton_schulz(g, steps=10)
    singular = torch.linalg.svdvals(u)
    assert singular.min() > 0.5 and singular.max() < 1.5
    assert newton_schulz(g.T, steps=10).shape == (64, 32)


def test_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(3))])


def test_batched_newton_schulz_equals_one_matrix_at_a_time():
    torch.manual_seed(0)
    stack = torch.randn(5, 24, 40)
    batched = newton_schulz(stack)
    for single, expected in zip(stack, batched, strict=True):
        torch.testing.assert_close(newton_schulz(single), expected, rtol=0, atol=1e-5)
    tall = newton_schulz(stack.mT)
    torch.testing.assert_close(tall, batched.mT, rtol=0, atol=1e-5)


def test_same_shape_matrices_step_like_separate_optimisers():
    """Grouping same-shape matrices into one batched iteration changes nothing but speed."""
    torch.manual_seed(0)
    weights = [torch.randn(24, 40) for _ in range(3)] + [torch.randn(40, 16)]
    together = [w.clone().requires_grad_(True) for w in weights]
    apart = [w.clone().requires_grad_(True) for w in weights]
    joint = Muon(together, lr=0.02, weight_decay=0.1)
    separate = [Muon([p], lr=0.02, weight_decay=0.1) for p in apart]
    for step in range(3):
        generator = torch.Generator().manual_seed(step)
        grads = [torch.randn(w.shape, generator=generator) for w in weights]
        for params in (together, apart):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
        joint.step()
        for opt in separate:
            opt.step()
    for a, b in zip(together, apart, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
