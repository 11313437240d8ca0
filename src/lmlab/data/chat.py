"""The chat template: how a conversation becomes one text, kept in a run's tokenizer folder as
``chat_template.json``.

Hugging Face keeps templates as Jinja in ``tokenizer_config.json``; rendering Jinja and then
finding which characters came from the assistant (the only ones that get a loss) needs markers
inside the template. lmlab's template is data instead: a prefix and a suffix per role, so the
rendered text is a list of pieces that each know whether they are trained on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lmlab.errors import LmlabError
from lmlab.files import atomic_write_text

CHAT_TEMPLATE_FILE = "chat_template.json"
TEMPLATE_FORMAT = "lmlab-chat-template"
ROLES = ("system", "user", "assistant")


def _default_roles() -> dict[str, dict[str, str]]:
    return {
        "system": {"prefix": "<|system|>", "suffix": "<|end|>\n"},
        "user": {"prefix": "<|user|>", "suffix": "<|end|>\n"},
        "assistant": {"prefix": "<|assistant|>", "suffix": "<|end|>\n"},
    }


@dataclass
class ChatTemplate:
    """Each message renders as ``prefix + content + suffix`` of its role. The assistant's
    content and suffix are trained on (the suffix, so the model learns to end its turn); a
    prompt for generation ends with the assistant's prefix (``generation_prompt``)."""

    roles: dict[str, dict[str, str]] = field(default_factory=_default_roles)
    special_tokens: list[str] = field(
        default_factory=lambda: ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    )
    """Strings the tokenizer encodes as one id each (added to it by :meth:`tokenizer_for`)."""

    @property
    def generation_prompt(self) -> str:
        return self.roles["assistant"]["prefix"]

    @property
    def end_of_turn(self) -> str:
        """What ends an assistant turn: generation can stop there."""
        return self.roles["assistant"]["suffix"]

    def render(self, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """``(text, trained)`` pieces of a conversation, in order."""
        pieces = []
        for message in messages:
            role = self.roles[message["role"]]
            trained = message["role"] == "assistant"
            pieces += [
                (role["prefix"], False),
                (message["content"], trained),
                (role["suffix"], trained),
            ]
        return [(text, trained) for text, trained in pieces if text]

    def prompt(self, messages: list[dict[str, str]]) -> str:
        """The text that asks the model for the next assistant turn after ``messages``."""
        return "".join(text for text, _ in self.render(messages)) + self.generation_prompt

    def save(self, directory: Path) -> None:
        """Write ``chat_template.json`` beside the tokenizer it belongs to."""
        data = {
            "format": TEMPLATE_FORMAT,
            "version": 1,
            "roles": self.roles,
            "special_tokens": self.special_tokens,
        }
        atomic_write_text(directory / CHAT_TEMPLATE_FILE, json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> ChatTemplate | None:
        """The template saved in ``directory``, or None when there is none."""
        path = directory / CHAT_TEMPLATE_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != TEMPLATE_FORMAT:
                raise ValueError(f"format is {data.get('format')!r}, not {TEMPLATE_FORMAT!r}")
            roles = {
                role: {"prefix": str(data["roles"][role]["prefix"]), "suffix": str(parts["suffix"])}
                for role, parts in data["roles"].items()
                if role in ROLES
            }
            if set(roles) != set(ROLES):
                raise ValueError(f"roles must be {', '.join(ROLES)}")
            return cls(roles, [str(token) for token in data["special_tokens"]])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LmlabError(f"{path} is not a valid chat template ({exc}); re-create it") from None
