"""The ``kedit`` command line. Built-in subcommands live in :mod:`kedit_core.cli.commands`; plugins add
theirs through the ``register_commands`` hook. User errors print one line, without a traceback
(``KEDIT_TRACEBACK=1`` shows it)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from .._version import __version__
from ..errors import KeditError, PluginError

# Core subcommands, in the order `kedit --help` lists them (each module defines NAME, HELP,
# add_arguments(parser) and run(args)).
BUILTIN_COMMAND_MODULES = ("demo", "models", "plugins", "stats", "edit", "eval", "toyworld")


def _builtin_commands():
    for module_name in BUILTIN_COMMAND_MODULES:
        yield importlib.import_module(f"kedit_core.cli.commands.{module_name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kedit", description="Edit the factual knowledge stored in transformer language models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `kedit <command> --help` for a command's options. KEDIT_TRACEBACK=1 shows tracebacks.")
    parser.add_argument("--version", action="version", version=f"kedit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    names = set()
    for module in _builtin_commands():
        p = sub.add_parser(module.NAME, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
        names.add(module.NAME)

    from ..plugins import get_registry

    for name, reg in sorted(get_registry().commands.items()):
        if name in names:
            raise PluginError(f"{reg.plugin.label} registers the command {name!r}, which kedit already has")
        spec = reg.obj
        p = sub.add_parser(name, help=f"{spec.help} [plugin: {reg.plugin.name}]", description=spec.help)
        spec.add_arguments(p)
        p.set_defaults(_run=spec.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    show_traceback = os.environ.get("KEDIT_TRACEBACK", "") in {"1", "true", "yes"}
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "_run", None) is None:
            parser.print_help()
            return 0
        code = args._run(args)
        return int(code or 0)
    except KeditError as exc:
        if show_traceback:
            raise
        print(f"kedit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kedit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
