"""Chat templates: how a run turns OpenAI chat messages into one prompt.

A run fine-tuned on chats (``lmlab finetune``) carries lmlab's own template,
``chat_template.json`` (:mod:`lmlab.data.chat`: a prefix and suffix per role, with special
tokens); the server renders with it, so a reply is asked for exactly as training framed it.
Any other run can be chatted with when its tokenizer folder holds ``chat_template.jinja``
(:data:`CHAT_TEMPLATE_FILE`), a Jinja2 template in the format of Hugging Face's
``chat_template``: it receives ``messages`` (a list of ``{"role", "content"}``) and
``add_generation_prompt`` (always true here: the prompt ends where the assistant's reply begins)
and renders the prompt text; ``raise_exception(message)`` refuses messages it cannot take
(the client gets a 400 with that message). It runs in Jinja's immutable sandbox, as
``transformers`` does, so a template from someone else's run can read its arguments but not
reach Python objects.
"""

from __future__ import annotations

from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmlab.data.chat import CHAT_TEMPLATE_FILE as ROLES_TEMPLATE_FILE
from lmlab.data.chat import ChatTemplate as RolesTemplate
from lmlab.errors import LmlabError

CHAT_TEMPLATE_FILE = "chat_template.jinja"


def refuse(message: str) -> None:
    """``raise_exception(message)`` in a template (as in Hugging Face's): refuse the messages."""
    raise TemplateError(message)


class ChatTemplate:
    """A compiled chat template (see the module docstring)."""

    def __init__(self, source: str, origin: str) -> None:
        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        environment.globals["raise_exception"] = refuse
        try:
            self._template = environment.from_string(source)
        except TemplateError as exc:
            raise LmlabError(f"{origin} is not a valid Jinja2 template: {exc}") from None
        self.origin = origin

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt for ``messages``; a template error (e.g. it refuses a role) is a
        ``ValueError`` whose message the server returns to the client."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=True)
        except TemplateError as exc:
            raise ValueError(f"the chat template could not render these messages: {exc}") from None


class TrainedTemplate:
    """Post-training's template (:class:`lmlab.data.chat.ChatTemplate`) with the server's
    interface: the prompt ends with the assistant's prefix, as in training."""

    def __init__(self, template: RolesTemplate, origin: str) -> None:
        self._template = template
        self.origin = origin

    def render(self, messages: list[dict[str, str]]) -> str:
        unknown = sorted({m["role"] for m in messages} - set(self._template.roles))
        if unknown:
            raise ValueError(f"the chat template has no role {', '.join(unknown)}")
        return self._template.prompt(messages)


def load_chat_template(tokenizer_dir: Path) -> ChatTemplate | TrainedTemplate | None:
    """The run's chat template (post-training's first), or None when its tokenizer folder has
    neither."""
    trained = RolesTemplate.load(tokenizer_dir)
    if trained is not None:
        return TrainedTemplate(trained, str(tokenizer_dir / ROLES_TEMPLATE_FILE))
    path = tokenizer_dir / CHAT_TEMPLATE_FILE
    if not path.is_file():
        return None
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LmlabError(f"cannot read the chat template {path}: {exc}") from None
    return ChatTemplate(source, str(path))
