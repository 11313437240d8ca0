"""``import lmlab`` teaches ``transformers`` the ``lmlab`` model type, without slowing it down.

Registering needs ``transformers`` and torch imported (two seconds), which every lmlab command
would pay at start-up. So ``import lmlab`` registers at once only when ``transformers`` is
already imported, and otherwise puts a small finder in front of ``sys.meta_path`` that
registers right after ``transformers`` is first imported. Python has no post-import hook of its
own, hence this finder; it only wraps the loader that the other finders return.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

WATCHED = "transformers"


def register_with_transformers() -> None:
    """Register lmlab's config and model classes with the ``transformers`` auto classes; a
    failure (an incompatible ``transformers``) is a warning, never a broken import."""
    try:
        from lmlab.interop.hf_model import register

        register()
    except Exception as exc:  # whatever breaks, the user's import of transformers must not
        warnings.warn(
            f"lmlab could not register its model type with transformers: {exc}", stacklevel=2
        )


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of ``transformers`` to register after it runs."""

    def find_spec(self, fullname: str, path: object, target: object = None):
        if fullname != WATCHED:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        run_module = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run_module(module)
            register_with_transformers()

        loader.exec_module = exec_module
        return spec


def install() -> None:
    """Register now if ``transformers`` is loaded, else as soon as it is."""
    if WATCHED in sys.modules:
        register_with_transformers()
    elif importlib.util.find_spec(WATCHED) is not None:
        sys.meta_path.insert(0, _RegisterAfterImport())
