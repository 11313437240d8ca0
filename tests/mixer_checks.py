"""Generic checks that every token mixer must pass; ``layers/test_mixer_contract.py`` runs them
over every registered mixer.

They exercise the one contract every mixer shares: ``forward(x, state=None) -> (y, state)``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch

from lmlab.config.schema import ModelConfig
from lmlab.layers.registry import build_token_mixer


def make_mixer(
    name: str,
    d_model: int = 32,
    n_heads: int = 2,
    seed: int = 0,
    layer_idx: int = 0,
    model: dict[str, Any] | None = None,
    perturb: bool = False,
    **options,
) -> torch.nn.Module:
    """A float64 mixer with deterministic random weights (non-trivial gates and decays).

    ``model`` sets further ``ModelConfig`` fields (``position``, ``n_kv_heads``); ``perturb``
    applies the mixer's entry in ``PERTURBATIONS``, for mixers whose initialisation hides
    data-dependent paths that the checks must exercise."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=16,
        d_model=d_model,
        n_heads=n_heads,
        mixer=name,
        mixer_options={name: options} if options else {},
        **(model or {}),
    )
    mixer = build_token_mixer(name, cfg, layer_idx=layer_idx).double()
    if perturb and name in PERTURBATIONS:
        with torch.no_grad():
            PERTURBATIONS[name](mixer, seed)
    return mixer


def _randomise_cope(mixer: torch.nn.Module, seed: int) -> None:
    """CoPE embeddings start at zero, which would hide every position effect."""
    if mixer.cope is not None:
        torch.nn.init.normal_(mixer.cope.embedding, std=0.5)


def _perturb_rwkv7(mixer: torch.nn.Module, seed: int) -> None:
    """The official zero-initialised LoRA inputs are perturbed, so that decay, learning rate and
    gate depend on the data as they do after training."""
    generator = torch.Generator().manual_seed(seed + 100)
    for lora in (mixer.decay, mixer.learning_rate, mixer.gate):
        lora.down.weight.normal_(std=0.3, generator=generator)
    mixer.mix.uniform_(0, 1, generator=generator)


def _amplify_bdh(mixer: torch.nn.Module, seed: int) -> None:
    """Visibly non-zero neurons and gates: the initial scale leaves most ReLUs near zero."""
    for p in mixer.parameters():
        p.mul_(10) if p.dim() > 1 else p.add_(torch.randn_like(p))


def _perturb_mamba3(mixer: torch.nn.Module, seed: int) -> None:
    """B/C biases and norm weights (and MIMO's lift, gate and reduction weights) start at
    constants that would let one column or path stand in for another."""
    generator = torch.Generator().manual_seed(seed + 100)
    names = ("b_bias", "c_bias", "b_norm.weight", "c_norm.weight", "mimo_x", "mimo_z", "mimo_o")
    for name, p in mixer.named_parameters():
        if name in names:
            p.add_(0.3 * torch.randn(p.shape, generator=generator, dtype=p.dtype))


ATTENTION_VARIANTS = [
    ("rope", 0, 5),
    ("none", 2, 3),
    ("alibi", 0, 0),
    ("alibi", 1, 4),
    ("cope", 0, 0),
    ("cope", 2, 6),
]
"""(position, n_kv_heads, window) of the attention mixer: every position kind, MHA, GQA and MQA,
with and without a sliding window."""


PERTURBATIONS: dict[str, Callable[[torch.nn.Module, int], None]] = {
    "attention": _randomise_cope,
    "rwkv7": _perturb_rwkv7,
    "bdh": _amplify_bdh,
    "mamba3": _perturb_mamba3,
}


def random_input(batch: int, time: int, d_model: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, time, d_model, generator=generator, dtype=torch.float64)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    scale = expected.abs().max().clamp_min(1e-6)
    error = (actual - expected).abs().max() / scale
    assert error <= rtol, f"{what}: relative error {error:.3e} > {rtol:.1e}"


def check_decode_matches_full(
    mixer: torch.nn.Module, time: int = 13, prefix: int = 5, rtol: float = 1e-9
) -> None:
    """Prefill ``prefix`` tokens, then decode the rest one token at a time."""
    x = random_input(2, time, mixer_width(mixer))
    with torch.no_grad():
        full, _ = mixer(x)
        outs = []
        y, state = mixer(x[:, :prefix])
        outs.append(y)
        for t in range(prefix, time):
            y, state = mixer(x[:, t : t + 1], state)
            outs.append(y)
    assert_close(torch.cat(outs, 1), full, rtol, "prefill + decode vs full forward")


def check_segments_match_whole(
    mixer: torch.nn.Module, time: int = 40, cut: int = 17, rtol: float = 1e-9
) -> None:
    """Two consecutive segments with the carried state equal one long sequence."""
    x = random_input(2, time, mixer_width(mixer))
    with torch.no_grad():
        whole, _ = mixer(x)
        first, state = mixer(x[:, :cut])
        second, _ = mixer(x[:, cut:], state)
    assert_close(torch.cat([first, second], 1), whole, rtol, "two segments vs one sequence")


def check_modes_agree(
    chunk: torch.nn.Module, recurrent: torch.nn.Module, time: int = 37, rtol: float = 1e-8
) -> None:
    """The chunked and recurrent forms of the same weights agree in outputs and in gradients
    of the input and of every parameter."""
    recurrent.load_state_dict(chunk.state_dict())
    x = random_input(2, time, mixer_width(chunk))
    grads = []
    for module in (chunk, recurrent):
        xi = x.clone().requires_grad_(True)
        y, _ = module(xi)
        weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)
        (y * weights).sum().backward()
        grads.append((y.detach(), xi.grad, {n: p.grad for n, p in module.named_parameters()}))
    (y_c, gx_c, gp_c), (y_r, gx_r, gp_r) = grads
    assert_close(y_c, y_r, rtol, "chunk vs recurrent output")
    assert_close(gx_c, gx_r, rtol, "chunk vs recurrent input gradient")
    for name, grad in gp_c.items():
        if grad is None:
            assert gp_r[name] is None, f"{name}: gradient only in recurrent mode"
            continue
        assert_close(grad, gp_r[name], rtol, f"chunk vs recurrent gradient of {name}")


def mixer_width(mixer: torch.nn.Module) -> int:
    for module in mixer.modules():
        if isinstance(module, torch.nn.Linear):
            return module.in_features
    raise AssertionError("mixer has no input projection")


def unigram_entropy(tokens: torch.Tensor, vocab: int) -> float:
    counts = torch.bincount(tokens.flatten(), minlength=vocab).double()
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * probs.log()).sum())


def check_learns(
    name: str, steps: int = 120, model_fields: dict | None = None, **options
) -> tuple[float, float]:
    """Train a tiny 2-layer model with this mixer on embedded Shakespeare (char tokens) and
    return (final training loss, unigram entropy) in nats; the caller asserts the gap.
    ``model_fields`` sets other ``ModelConfig`` fields (e.g. ``{"bitlinear": True}``)."""
    from lmlab.data.corpus import load_embedded_corpus
    from lmlab.model.lm import LanguageModel

    text = load_embedded_corpus("modern")[0].text[:200_000]
    vocab = sorted(set(text))
    lookup = {c: i for i, c in enumerate(vocab)}
    tokens = torch.tensor([lookup[c] for c in text])
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=len(vocab),
        d_model=64,
        n_layers=2,
        n_heads=2,
        mixer=name,
        mixer_options={name: options} if options else {},
        **(model_fields or {}),
    )
    model = LanguageModel(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, len(tokens) - 65, (16,), generator=generator)
        batch = torch.stack([tokens[s : s + 65] for s in starts])
        logits, _ = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    final = sum(losses[-10:]) / 10
    assert math.isfinite(final), f"{name}: loss diverged"
    return final, unigram_entropy(tokens, len(vocab))


def clone_with(mixer: torch.nn.Module, **attributes) -> torch.nn.Module:
    """A deep copy of a mixer with some attributes changed (e.g. ``mode="recurrent"``)."""
    twin = copy.deepcopy(mixer)
    for key, value in attributes.items():
        setattr(twin, key, value)
    return twin


def check_bfloat16(mixer: torch.nn.Module, time: int = 40, rtol: float = 5e-2) -> None:
    """Forward and backward in bfloat16, both as training runs it (float32 weights under
    autocast) and with bfloat16 weights: finite gradients, outputs loosely close to float32."""
    mixer = mixer.float()
    x = random_input(2, time, mixer_width(mixer)).float()
    with torch.no_grad():
        reference, _ = mixer(x)
    for cast in ("autocast", "weights"):
        module = clone_with(mixer)
        xi = x.clone().requires_grad_(True)
        if cast == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y, _ = module(xi)
        else:
            module = module.bfloat16()
            y, _ = module(xi.bfloat16())
        y.float().square().sum().backward()
        assert torch.isfinite(xi.grad).all(), f"bfloat16 ({cast}): input gradient not finite"
        for name, param in module.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), (
                f"bfloat16 ({cast}): gradient of {name} missing or not finite"
            )
        assert_close(y.detach().float(), reference, rtol, f"bfloat16 ({cast}) vs float32")
