"""How the ``lmlab`` command reads its arguments: options declared once (:class:`Opt`) with
their defaults read from the library function they feed, the options several commands share,
the :class:`Command` row, and one-line argument errors (``error: ...``, exit 2)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

DEFAULT_PRESET = "gpt-tiny"
OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=")
REGISTRY_HELP = "run registry database ($LMLAB_REGISTRY or runs/registry.sqlite)"


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (``error: ...``, exit 2) like every other error."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see: {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be at least {low}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text} must be a finite number above 0")
    return value


@dataclasses.dataclass(frozen=True)
class Opt:
    """One option, declared once. ``param`` is the library parameter it feeds, which must exist
    in ``source``, else the command's library function (building the parser checks it); its
    default comes from there unless ``default`` is set;
    ``aliases`` are further parameter names the library may name in errors about it."""

    flag: str
    help: str
    param: str | None = None
    source: Callable[..., Any] | None = None
    aliases: tuple[str, ...] = ()
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    def add(self, parser: argparse.ArgumentParser, library: Callable[..., Any] | None) -> None:
        kwargs = dict(self.kwargs)
        source = self.source or library
        if self.param and source is not None:
            default = inspect.signature(source).parameters[self.param].default
            if "default" not in kwargs and default is not inspect.Parameter.empty:
                kwargs["default"] = list(default) if isinstance(default, tuple) else default
        default = kwargs.get("default")
        shown = (
            default is not None and default is not False and str(default).strip() not in ("", "[]")
        )
        if self.flag.startswith("-") and "metavar" not in kwargs and "action" not in kwargs:
            kwargs["metavar"] = self.flag.lstrip("-").upper().replace("-", "_")
        help_text = f"{self.help} ({default})" if shown else self.help
        if self.flag.startswith("-"):
            parser.add_argument(self.flag, dest=self.param, help=help_text, **kwargs)
        else:
            parser.add_argument(self.flag, help=help_text, **kwargs)


def opt(flag: str, help: str, param: str | None = None, **kwargs: Any) -> Opt:
    """An :class:`Opt`; ``source`` and ``aliases`` go with ``param``, the rest to argparse."""
    source = kwargs.pop("source", None)
    aliases = kwargs.pop("aliases", ())
    return Opt(flag, help, param, source, aliases, kwargs)


ITEMS = "config_items"
PRESET = opt("--preset", "a preset shipped with lmlab (see: lmlab presets)")
QUIET = opt("--quiet", "no progress bars (one line per run)", action="store_true")
REGISTRY = opt("--registry", REGISTRY_HELP)
SEEDS = opt("--seeds", "seeds per arm or grid point", "seeds", type=int)
OUT = opt("--out", "study folder (default: <command>-<names> in the config's out_dir)", "out")
BUDGET = opt(
    "--budget",
    "per run: tokens=N (2M), flops=N (training FLOPs, 1e15), time=N (10m, 90s) or steps=N",
    "budget",
)
RUN = opt("run", "run folder")
DEVICE = opt("--device", "cpu, cuda, mps or auto", default="auto")
JSON = opt("--json", "print JSON", action="store_true")
NPROC_PER_RUN = opt(
    "--nproc-per-run",
    "processes per run, each run a torchrun job (train.parallel=ddp unless the config says fsdp;"
    " compare needs --parallel)",
    "nproc_per_run",
    type=int,
    metavar="N",
)
SAMPLER_SEED = opt("--seed", "random seed", "seed", type=at_least(0))


@dataclasses.dataclass(frozen=True)
class Command:
    """One verb: its handler, the library function its options mirror, its options, and the
    positional configs and ``key=value`` overrides when ``items`` says what they are."""

    name: str
    run: Callable[[argparse.Namespace], int]
    help: str
    options: tuple[Opt, ...] = ()
    library: Callable[..., Any] | None = None
    items: str | None = None
    description: str | None = None
    epilog: str | None = None

    def flags(self) -> dict[str, str]:
        """Library parameter -> the flag that sets it, for wording library errors."""
        names = {}
        for option in self.options:
            for param in filter(None, (option.param, *option.aliases)):
                names[param] = option.flag
        return names


def is_override(item: str) -> bool:
    """``key=value`` with a dotted key, unless it names an existing file (YAML names may hold
    '=')."""
    return OVERRIDE.match(item) is not None and not Path(item).exists()


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line. argparse fills a command's positionals from one run of
    arguments and rejects those written after an option; they are gathered into ``items``
    here instead, so ``lmlab probe gpt-tiny --task mqar model.d_model=64`` works."""
    args, extras = parser.parse_known_args(argv)
    takes_items = hasattr(args, ITEMS)
    if extras and (not takes_items or any(extra.startswith("-") for extra in extras)):
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if takes_items:
        items = getattr(args, ITEMS) + extras
        args.configs = [item for item in items if not is_override(item)]
        args.overrides = [item for item in items if is_override(item)]
    return args
