"""The one exception type users see: a one-line message naming the problem and the fix.

The CLI catches :class:`LmlabError`, prints ``error: <message>`` on one line and exits with
code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class LmlabError(Exception):
    """A problem with the user's input (config, data, paths), not a bug in lmlab."""

    exit_code = 2
