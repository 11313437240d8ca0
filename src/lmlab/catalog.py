"""Catalogues of things a user picks by name: token and channel mixers, post-training methods,
verifiers. Each is a dict with one way to add to it (a decorator that refuses a name taken twice
and may check what it is given) and one way to read it (an unknown name is one line with the
closest known name, the known ones and how to add one), so every catalogue answers a typo alike.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import TypeVar

from lmlab.errors import LmlabError

T = TypeVar("T")


class Catalog(dict[str, T]):
    """Name -> item. ``what`` names the kind in messages ("token mixer"); ``how_to_add`` ends
    the unknown-name message; ``check(name, item)`` runs before an item is admitted and may
    raise, or annotate the item."""

    def __init__(
        self,
        what: str,
        how_to_add: str,
        check: Callable[[str, T], None] | None = None,
    ) -> None:
        super().__init__()
        self.what = what
        self.how_to_add = how_to_add
        self.check = check

    def register(self, name: str) -> Callable[[T], T]:
        """A decorator adding its argument under ``name``."""

        def add(item: T) -> T:
            if name in self:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            if self.check is not None:
                self.check(name, item)
            self[name] = item
            return item

        return add

    def lookup(self, name: str) -> T:
        if name not in self:
            close = difflib.get_close_matches(name, list(self), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            known = ", ".join(sorted(self)) or "none"
            raise LmlabError(
                f"unknown {self.what} {name!r}; {hint}available: {known}; {self.how_to_add}"
            )
        return self[name]
