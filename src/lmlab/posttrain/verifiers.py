"""Verifiers: plain Python callables that score a model's completion against the expected
answer (1.0 right, 0.0 wrong, or anything between), registered by name. A verifiable example
names its verifier (``{"prompt", "answer", "verifier"}``); RL rewards and held-out accuracy
call it. Add one with::

    from lmlab.posttrain.verifiers import register_verifier

    @register_verifier("contains")
    def contains(completion: str, answer: str) -> float:
        return float(answer in completion)
"""

from __future__ import annotations

from collections.abc import Callable

from lmlab.catalog import Catalog

Verifier = Callable[[str, str], float]
VERIFIERS: Catalog[Verifier] = Catalog(
    "verifier", "register one with lmlab.posttrain.verifiers.register_verifier"
)


def register_verifier(name: str) -> Callable[[Verifier], Verifier]:
    """Register ``verifier(completion, answer) -> score`` under ``name``."""
    return VERIFIERS.register(name)


def get_verifier(name: str) -> Verifier:
    return VERIFIERS.lookup(name)


def first_line(text: str) -> str:
    """The answer part of a completion: its first line, without surrounding spaces (a model
    that answers and then keeps writing is judged on its answer)."""
    return text.split("\n", 1)[0].strip()


@register_verifier("exact_match")
def exact_match(completion: str, answer: str) -> float:
    """1.0 when the completion's first line is exactly the answer (spaces around ignored)."""
    return float(first_line(completion) == answer.strip())


@register_verifier("digit_match")
def digit_match(completion: str, answer: str) -> float:
    """Partial credit: the characters of the completion's first line equal to the answer's at
    the same position, over the longer of the two (a denser reward than exact match for a model
    that rarely gets a whole sum right; 1.0 only for the exact answer)."""
    reply, expected = first_line(completion), answer.strip()
    same = sum(a == b for a, b in zip(reply, expected, strict=False))
    return same / max(len(reply), len(expected), 1)
