"""``LanguageModel.rewind``: after a forward over k drafted tokens of which only the first j
are kept, the state must be the state of decoding exactly those j tokens, for every mixer."""

from __future__ import annotations

import pytest
import torch

from lmlab.config.schema import ModelConfig
from lmlab.layers.registry import token_mixer_names
from lmlab.model.cache import ModelState
from lmlab.model.lm import LanguageModel

VOCAB = 19
PROMPT, VERIFIED = 6, 5


def tiny_model(**fields) -> LanguageModel:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, **fields)
    return LanguageModel(cfg).double().eval()


def decode_one_by_one(model: LanguageModel, tokens: torch.Tensor, state: ModelState) -> ModelState:
    for t in range(tokens.shape[1]):
        _, state = model(tokens[:, t : t + 1], state)
    return state


def continuation_logits(model: LanguageModel, state: ModelState, tokens: torch.Tensor):
    """What a state does next: the logits of three more tokens fed one at a time (a state is
    equal to another when nothing downstream can tell them apart)."""
    outputs = []
    for t in range(tokens.shape[1]):
        logits, state = model(tokens[:, t : t + 1], state)
        outputs.append(logits)
    return torch.cat(outputs, 1)


def check_rewind(model: LanguageModel) -> None:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (2, PROMPT + VERIFIED + 3), generator=generator)
    prompt, verified = tokens[:, :PROMPT], tokens[:, PROMPT : PROMPT + VERIFIED]
    after_tokens = tokens[:, PROMPT + VERIFIED :]
    with torch.no_grad():
        _, before = model(prompt)
        for keep in range(VERIFIED + 1):
            _, after = model(verified, before)  # the verification forward over every token
            rewound = model.rewind(before, after, verified, keep)
            expected = decode_one_by_one(model, verified[:, :keep], before)
            assert rewound.position == expected.position == PROMPT + keep
            torch.testing.assert_close(
                continuation_logits(model, rewound, after_tokens),
                continuation_logits(model, expected, after_tokens),
                rtol=1e-9,
                atol=1e-9,
                msg=lambda m, keep=keep: f"keep={keep}: {m}",
            )


@pytest.mark.parametrize("mixer", token_mixer_names())
def test_rewind_equals_decoding_only_the_kept_tokens(mixer: str) -> None:
    check_rewind(tiny_model(mixer=mixer))


@pytest.mark.parametrize(
    "fields",
    [
        {"mixer": "attention", "mixer_options": {"attention": {"window": 3}}},
        {"mixer": "attention", "mixer_options": {"attention": {"qkv_conv": 3}}},
        {"pattern": "MA", "mod_capacity": 0.5, "mod_every": 1},
        {"mixer": "mamba3", "mixer_options": {"mamba3": {"mimo_rank": 3, "chunk_size": 4}}},
    ],
    ids=["sliding-window", "qkv-conv", "hybrid-mixture-of-depths", "mamba3-mimo"],
)
def test_rewind_where_caches_cannot_be_cut(fields: dict) -> None:
    """A windowed cache dropped its oldest keys, a convolution folded tokens in, a routed
    block holds only its routed tokens and Mamba-3's MIMO state took R writes per token: these
    recompute from the state before."""
    model = tiny_model(**fields)
    check_rewind(model)


def test_attention_cache_is_cut_without_recomputation(monkeypatch) -> None:
    """Plain attention rewinds by shortening its caches: no forward runs."""
    model = tiny_model(mixer="attention")
    prompt = torch.randint(0, VOCAB, (1, PROMPT + VERIFIED))
    with torch.no_grad():
        _, before = model(prompt[:, :PROMPT])
        _, after = model(prompt[:, PROMPT:], before)
    monkeypatch.setattr(model, "forward", lambda *a, **k: pytest.fail("recomputed"))
    rewound = model.rewind(before, after, prompt[:, PROMPT:], 2)
    assert [layer["length"] for layer in rewound.layers] == [PROMPT + 2] * 2


def test_a_rewind_that_forgets_nothing_is_caught() -> None:
    """The check can fail: the state after every verified token (with the kept prefix's
    position) is not the kept prefix's state."""
    model = tiny_model(mixer="gla")
    model.rewind = lambda before, after, tokens, keep: ModelState(
        after.layers, before.position + keep
    )
    with pytest.raises(AssertionError):
        check_rewind(model)
