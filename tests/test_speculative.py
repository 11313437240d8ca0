"""Speculative decoding: greedy output equals plain greedy decoding per mixer family, and
sampled output follows the target's distribution (Leviathan et al.'s rule, checked by a
chi-square test that the rule with a wrong resampling step fails)."""

from __future__ import annotations

import itertools

import pytest
import torch

from lmlab.config.schema import ModelConfig
from lmlab.errors import ParamError
from lmlab.model import speculative
from lmlab.model.generate import SamplingSettings, generate
from lmlab.model.lm import LanguageModel
from lmlab.model.speculative import EarlyExit, SpeculativeStats, stream_speculative

VOCAB = 23
GREEDY = SamplingSettings(temperature=0)
FAMILIES = {
    "attention": {"mixer": "attention"},
    "recurrent": {"mixer": "gla"},
    "hybrid": {"pattern": "MMA", "mixer_options": {"mamba2": {"head_dim": 16, "d_state": 8}}},
}


def tiny_model(seed: int, vocab: int = VOCAB, **fields) -> LanguageModel:
    torch.manual_seed(seed)
    fields = {"d_model": 32, "n_layers": 3, "n_heads": 2, "init_std": 0.3} | fields
    return LanguageModel(ModelConfig(vocab_size=vocab, **fields)).double().eval()


def speculate(
    target, draft, prompt, new, settings, k, seed=0, stats=None, confidence=0.0
) -> torch.Tensor:
    tokens = stream_speculative(target, draft, prompt, new, settings, k, seed, stats, confidence)
    return torch.cat([prompt, *tokens], 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_output_equals_plain_greedy(family: str) -> None:
    target = tiny_model(0, **FAMILIES[family])
    drafts = {
        "another model": tiny_model(1, d_model=16, **FAMILIES[family]),
        "the target itself": target,
        "early exit": EarlyExit(target, 1),
    }
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    expected = generate(target, prompt, 30, GREEDY)
    for name, draft in drafts.items():
        for k in (1, 4):
            stats = SpeculativeStats()
            got = speculate(target, draft, prompt, 30, GREEDY, k, stats=stats)
            assert torch.equal(got, expected), f"{family}, draft {name}, k={k}"
            assert stats.emitted == 30
            if draft is target:
                assert stats.accepted == stats.drafted  # every round but the last drafts k
    # a random draft disagrees often: the rejection path ran
    stats = SpeculativeStats()
    speculate(target, drafts["another model"], prompt, 30, GREEDY, 3, stats=stats)
    assert stats.accepted < stats.drafted
    # drafting stops early where the draft is unsure, and the text stays the same
    short = SpeculativeStats()
    got = speculate(target, drafts["another model"], prompt, 30, GREEDY, 3, 0, short, 0.5)
    assert torch.equal(got, expected)
    assert short.drafted < 3 * (short.rounds - 1)  # the last round may draft fewer anyway


def test_one_token_prompt_and_short_budgets() -> None:
    target, draft = tiny_model(0), tiny_model(1, n_layers=1)
    prompt = torch.tensor([[3]])
    for new in (0, 1, 2, 5):
        expected = generate(target, prompt, new, GREEDY)
        assert torch.equal(speculate(target, draft, prompt, new, GREEDY, 4), expected)


VOCAB_SMALL = 5
CHI2_999_DOF24 = 51.18
"""The 0.999 quantile of chi-square with 24 degrees of freedom (25 cells): a correct sampler
fails the test with probability 0.001 for a given seed, and the seed is fixed."""


def bigram_model(seed: int) -> LanguageModel:
    """A real one-layer model whose next-token distribution is a random bigram table: the
    block adds nothing (zero output projection) and the head reads the one-hot embedding.
    Cheap to run thousands of times, with distributions far apart for two seeds."""
    model = tiny_model(0, VOCAB_SMALL, d_model=VOCAB_SMALL, n_layers=1, n_heads=1, position="none")
    table = torch.randn(VOCAB_SMALL, VOCAB_SMALL, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        model.blocks[0].mixer.out.weight.zero_()
        model.blocks[0].channel.out.weight.zero_()
        model.embed.weight.copy_(torch.eye(VOCAB_SMALL))
        # the final RMSNorm scales a one-hot row by sqrt(V); the head undoes it
        model.head.weight = torch.nn.Parameter(2 * table.T.double() / VOCAB_SMALL**0.5)
    return model


def exact_two_token_distribution(model: LanguageModel, prompt: torch.Tensor) -> torch.Tensor:
    """P(t1, t2 | prompt) for every pair, ``[V * V]``, from the model's own softmax."""
    with torch.no_grad():
        first = model(prompt)[0][0, -1].softmax(-1)
        pairs = torch.cat([prompt.expand(VOCAB_SMALL, -1), torch.arange(VOCAB_SMALL)[:, None]], 1)
        second = model(pairs)[0][:, -1].softmax(-1)
    return (first[:, None] * second).flatten()


def chi_square_of_speculative_samples(samples: int, confidence: float = 0.0) -> float:
    """Chi-square of the first two tokens (both drafted: ``draft_tokens=2``, unless the
    draft's ``confidence`` in the first is too low) against the target's exact joint
    distribution."""
    target, draft = bigram_model(seed=0), bigram_model(seed=1)
    prompt = torch.tensor([[1, 4, 2]])
    settings = SamplingSettings(temperature=1.0)
    expected = exact_two_token_distribution(target, prompt) * samples
    counts = torch.zeros(VOCAB_SMALL * VOCAB_SMALL, dtype=torch.float64)
    for seed in range(samples):
        tokens = stream_speculative(target, draft, prompt, 3, settings, 2, seed, None, confidence)
        t1, t2 = itertools.islice(tokens, 2)
        counts[int(t1) * VOCAB_SMALL + int(t2)] += 1
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("confidence", [0.0, 0.5])
def test_sampling_follows_the_target_distribution(confidence: float) -> None:
    assert chi_square_of_speculative_samples(1000, confidence) < CHI2_999_DOF24


def test_an_unsure_draft_ends_the_round_early() -> None:
    """With ``draft_confidence`` 0.5, the first round of the chi-square test above drafts one
    token when the draft gave its first token less than 0.5, else two: both happen."""
    target, draft = bigram_model(seed=0), bigram_model(seed=1)
    settings = SamplingSettings(temperature=1.0)
    drafted = []
    for seed in range(40):
        stats = SpeculativeStats()
        cursor = speculative.start_cursor(target, draft, torch.tensor([[1, 4, 2]]))
        generator = torch.Generator().manual_seed(seed)
        speculative.speculative_round(target, draft, cursor, 2, settings, generator, stats, 0.5)
        drafted.append(stats.drafted)
    assert set(drafted) == {1, 2}


def test_a_wrong_rejection_rule_fails_the_same_test(monkeypatch) -> None:
    """Resampling from p instead of max(0, p - q) after a rejection (a classic mistake)
    over-weights the tokens the draft likes: the statistic must catch it."""

    def resample_from_p(p, q, token, generator):
        if torch.rand((), generator=generator) * q[token] < p[token]:
            return None
        return int(torch.multinomial(p, 1, generator=generator))

    monkeypatch.setattr(speculative, "accept_or_resample", resample_from_p)
    assert chi_square_of_speculative_samples(1000) > CHI2_999_DOF24


def test_bad_parameters_name_themselves() -> None:
    target = tiny_model(0)
    prompt = torch.tensor([[1, 2]])
    with pytest.raises(ParamError, match="draft_tokens"):
        next(stream_speculative(target, target, prompt, 3, GREEDY, 0))
    with pytest.raises(ParamError, match="draft"):
        next(stream_speculative(target, tiny_model(1, vocab=7), prompt, 3, GREEDY))
    with pytest.raises(ParamError, match="prompt"):
        next(stream_speculative(target, target, prompt.expand(2, -1), 3, GREEDY))
    with pytest.raises(ParamError, match="draft_confidence"):
        next(stream_speculative(target, target, prompt, 3, GREEDY, 2, draft_confidence=1.0))
    with pytest.raises(ParamError, match="n_layers"):
        EarlyExit(target, 3)
