"""Post-training examples: JSONL files, one example a line, checked field by field, and their
tokenisation into sequences whose loss mask says which tokens are trained on.

Formats (detected per line from its fields; extra fields are ignored, as metadata):

- instruction ``{"prompt": str, "completion": str}``;
- chat ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``;
- preference ``{"prompt": str, "chosen": str, "rejected": str}``;
- verifiable ``{"prompt": str, "answer": str, "verifier": str}`` (for RL with a reward).

Any mistake is one error naming ``file:line`` and the problem.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmlab.data.chat import ROLES, ChatTemplate
from lmlab.data.tokenizers import Tokenizer, report_unknown
from lmlab.errors import LmlabError

FORMATS: dict[str, tuple[str, ...]] = {
    "chat": ("messages",),
    "preference": ("prompt", "chosen", "rejected"),
    "verifiable": ("prompt", "answer", "verifier"),
    "instruction": ("prompt", "completion"),
}
"""Each format's required fields, in the order formats are recognised."""
NON_EMPTY = ("completion", "chosen", "rejected", "answer", "verifier")
"""Fields that must hold text (a prompt may be empty: plain text to continue)."""
OVERLONG_POLICIES = ("truncate", "drop", "refuse")


@dataclass
class Example:
    """One line of a JSONL file: its format, its fields and where it came from."""

    format: str
    fields: dict
    where: str
    """``file:line``, for messages about it."""


DISTINCTIVE = {"chat": "messages", "preference": "chosen", "verifiable": "answer"}
"""A field that only one format has (an instruction is what has none of them)."""


def _format_of(record: dict, formats: Sequence[str]) -> str | None:
    """The format ``record`` is written in, or, when its fields are incomplete, the accepted
    format it comes closest to (so the error can name the missing field)."""
    for name, field_name in DISTINCTIVE.items():
        if field_name in record or (name == "preference" and "rejected" in record):
            return name
    if "completion" in record:
        return "instruction"
    near = [name for name in formats if set(FORMATS[name]) & set(record)]
    return near[-1] if near else None


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _check(record: dict, kind: str, where: str) -> None:
    for name in FORMATS[kind]:
        if name not in record:
            raise LmlabError(f"{where}: {_a(kind)} example needs field {name!r}; add it")
    if kind == "chat":
        _check_messages(record["messages"], where)
        return
    for name in FORMATS[kind]:
        if not isinstance(record[name], str):
            raise LmlabError(
                f"{where}: field {name!r} must be a string, not {type(record[name]).__name__}"
            )
        if name in NON_EMPTY and not record[name].strip():
            raise LmlabError(f"{where}: field {name!r} is empty; give it text or drop the line")


def _check_messages(messages: object, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise LmlabError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) < {"role", "content"}:
            raise LmlabError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        if message["role"] not in ROLES:
            raise LmlabError(
                f"{where}: messages[{i}] has role {message['role']!r}; use {', '.join(ROLES)}"
            )
        if not isinstance(message["content"], str):
            raise LmlabError(f"{where}: messages[{i}].content must be a string")
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise LmlabError(
            f"{where}: a chat must end with a non-empty assistant message (what is trained on)"
        )


def read_examples(path: str | Path, formats: Sequence[str]) -> list[Example]:
    """Every example of the JSONL file ``path``; each must be in one of ``formats``. Blank
    lines are skipped; an empty file is an error."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LmlabError(f"cannot read {path}: {exc.strerror}") from None
    examples = []
    for number, line in enumerate(raw.split(b"\n"), 1):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except UnicodeDecodeError:
            raise LmlabError(f"{where}: not UTF-8 text; save the file as UTF-8") from None
        except json.JSONDecodeError as exc:
            raise LmlabError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            kind_name = type(record).__name__
            raise LmlabError(f"{where}: an example must be a JSON object, not {kind_name}")
        kind = _format_of(record, formats)
        if kind not in formats:
            wanted = " or ".join("{" + ", ".join(FORMATS[f]) + "}" for f in formats)
            found = f"{_a(kind)} example" if kind else f"fields {sorted(record)}"
            raise LmlabError(f"{where}: expected {wanted}, found {found}")
        _check(record, kind, where)
        examples.append(Example(kind, record, where))
    if not examples:
        raise LmlabError(f"{path} holds no examples; give a JSONL file with one example a line")
    return examples


@dataclass
class Sequences:
    """Tokenised examples: ``ids[i]`` with ``trained[i]`` true at the tokens that get a loss
    (predicted from everything before them), and what fitting them into the context cost."""

    ids: list[np.ndarray] = field(default_factory=list)
    trained: list[np.ndarray] = field(default_factory=list)
    text_bytes: list[int] = field(default_factory=list)
    """UTF-8 bytes of each example's trained text (for bits per byte)."""
    truncated: int = 0
    """Examples whose prompt lost tokens on the left to fit the context."""
    truncated_tokens: int = 0
    dropped: int = 0
    """Examples left out: their trained tokens alone do not fit the context."""

    def stats(self) -> dict[str, int]:
        return {
            "examples": len(self.ids),
            "truncated": self.truncated,
            "truncated_tokens": self.truncated_tokens,
            "dropped": self.dropped,
        }


def pieces_of(example: Example, template: ChatTemplate | None) -> list[tuple[str, bool]]:
    """``(text, trained)`` pieces of an instruction or chat example."""
    if example.format == "chat":
        if template is None:
            raise LmlabError(f"{example.where}: a chat example needs a chat template")
        return template.render(example.fields["messages"])
    return [(example.fields["prompt"], False), (example.fields["completion"], True)]


def tokenize_examples(
    examples: list[Example],
    tokenizer: Tokenizer,
    context: int,
    overlong: str = "truncate",
    template: ChatTemplate | None = None,
) -> Sequences:
    """Token ids and loss masks of instruction and chat examples, each at most ``context + 1``
    tokens (``context`` inputs and their next tokens). An example too long loses untrained
    (prompt) tokens on the left under ``truncate``, is left out under ``drop``, and stops
    everything under ``refuse``; one whose trained tokens alone do not fit is left out under
    ``truncate`` too."""
    if overlong not in OVERLONG_POLICIES:
        raise LmlabError(f"overlong={overlong!r} is unknown; use {', '.join(OVERLONG_POLICIES)}")
    out = Sequences()
    limit = context + 1
    unknown = 0
    for example in examples:
        pieces = pieces_of(example, template)
        encoded = [tokenizer.encode_array(text).astype(np.int64) for text, _ in pieces]
        unknown += sum(tokenizer.unknown_count(ids) for ids in encoded)
        ids = np.concatenate(encoded)
        trained = np.concatenate(
            [np.full(len(e), flag) for e, (_, flag) in zip(encoded, pieces, strict=True)]
        )
        cut = len(ids) - limit
        if cut > 0:
            if overlong == "refuse":
                raise LmlabError(
                    f"{example.where}: {len(ids)} tokens do not fit the context of {limit} "
                    "(data.seq_len + 1); shorten it, raise data.seq_len or set "
                    "post.overlong=truncate or drop"
                )
            if overlong == "drop" or trained[:cut].any():
                out.dropped += 1
                continue
            ids, trained = ids[cut:], trained[cut:]
            out.truncated += 1
            out.truncated_tokens += cut
        out.ids.append(ids)
        out.trained.append(trained)
        out.text_bytes.append(sum(len(text.encode("utf-8")) for text, flag in pieces if flag))
    if unknown:
        report_unknown(tokenizer, unknown, f"the examples in {examples[0].where.rsplit(':', 1)[0]}")
    if not out.ids:
        raise LmlabError(
            f"no example fits the context of {limit} tokens ({out.dropped} dropped); raise "
            "data.seq_len"
        )
    return out
