"""The one exception type users see: a one-line message naming the problem and the fix.

The CLI catches :class:`LmlabError`, prints ``error: <message>`` on one line and exits with
code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Mapping


class LmlabError(Exception):
    """A problem with the user's input (config, data, paths), not a bug in lmlab."""

    exit_code = 2


class ParamError(LmlabError):
    """A bad argument of a library function. The message marks each parameter it names as
    ``<name>``, so a caller words them its own way: called directly the message names the
    parameter (``seeds=0 must be at least 1``), and the CLI names its flag instead
    (``--seeds=0 ...``)."""

    def __init__(self, template: str, *params: str) -> None:
        self.template = template
        self.params = params
        super().__init__(self.worded({}))

    def worded(self, names: Mapping[str, str]) -> str:
        """The message with each marked parameter named by ``names`` (itself if absent)."""
        text = self.template
        for param in self.params:
            text = text.replace(f"<{param}>", names.get(param, param))
        return text
