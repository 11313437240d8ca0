"""The ``lmlab`` command: a thin layer over the library.

Each command is a row of :data:`COMMANDS` (``commands.py``): a handler that calls library
functions (``handlers.py``), and options declared once (``options.py``) and shared between
commands. An option that feeds a library
parameter takes its default from that function's signature, so the two cannot drift; a
:class:`ParamError` the library raises names the parameter, and :func:`main` words it with the
option's flag instead. Every user mistake surfaces as ``error: <one line>`` and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from lmlab.cli.commands import COMMANDS
from lmlab.cli.options import ITEMS, Command, Parser, parse_args
from lmlab.errors import LmlabError, ParamError

__all__ = ["COMMANDS", "build_parser", "main", "parse_args"]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="lmlab",
        description="Build, train, evaluate and compare small language models.",
        epilog="Examples:\n"
        "  lmlab train --preset gpt-tiny train.max_steps=500\n"
        "  lmlab train my.yaml model.d_model=256 train.lr=3e-3\n"
        "  lmlab train --resume runs/gpt-tiny-20260101-120000\n"
        "  lmlab eval runs/gpt-tiny-20260101-120000\n"
        '  lmlab generate runs/gpt-tiny-20260101-120000 --prompt "ROMEO:"\n'
        "  lmlab quantize runs/gpt-tiny-20260101-120000 --int8 --out runs/int8\n"
        "  lmlab export runs/bitnet-run --format ternary --out model.safetensors\n"
        "  lmlab export runs/gpt-tiny-20260101-120000 --format hf --out hf-tiny",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        sub = commands.add_parser(
            command.name,
            help=command.help,
            description=command.description,
            epilog=command.epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter
            if "\n" in (command.description or "") + (command.epilog or "")
            else argparse.HelpFormatter,
        )
        for option in command.options:
            option.add(sub, command.library)
        if command.items:
            sub.add_argument(
                ITEMS,
                nargs="*",
                metavar="CONFIG|KEY=VALUE",
                help=f"{command.items}, and key=value overrides (e.g. model.d_model=64); "
                "before, between or after the options",
            )
        sub.set_defaults(command_spec=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    command: Command = args.command_spec
    try:
        return command.run(args)
    except ParamError as exc:
        print(f"error: {exc.worded(command.flags())}", file=sys.stderr)
        return exc.exit_code
    except LmlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
