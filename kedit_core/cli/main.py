"""The ``kedit`` command line. Built-in subcommands live in :mod:`kedit_core.cli.commands`; plugins add
theirs through the ``register_commands`` hook.

Every error prints one line, without a traceback (``--debug`` or ``KEDIT_TRACEBACK=1`` shows it), and
sets the exit status: 2 for usage and input errors (bad flags, files, records, fields, settings: what
the user can fix), 1 for faults while running (numerical failures, a full disk, an I/O error, a bug),
130 for Ctrl-C."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from typing import Sequence

from .._version import __version__
from ..errors import EXIT_INPUT, EXIT_RUNTIME, KeditError, PluginError

# Core subcommands, in the order `kedit --help` lists them (each module defines NAME, HELP,
# add_arguments(parser) and run(args)).
BUILTIN_COMMAND_MODULES = ("demo", "models", "plugins", "stats", "edit", "eval", "toyworld")


def _builtin_commands():
    for module_name in BUILTIN_COMMAND_MODULES:
        yield importlib.import_module(f"kedit_core.cli.commands.{module_name}")


class KeditArgumentParser(argparse.ArgumentParser):
    """argparse with usage errors on one line (argparse prints the whole usage first), exit status 2."""

    def error(self, message: str):
        self.exit(EXIT_INPUT, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = KeditArgumentParser(
        prog="kedit", description="Edit the factual knowledge stored in transformer language models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `kedit <command> --help` for a command's options. Exit status: 0 done, 2 usage or input "
               "error, 1 fault while running.")
    parser.add_argument("--version", action="version", version=f"kedit {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also accepted after the command; KEDIT_TRACEBACK=1 "
                             "does the same)")
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


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"kedit: warning: {_one_line(message)}\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("KEDIT_TRACEBACK", "") in {"1", "true", "yes"}
    argv = [a for a in argv if a != "--debug"]
    previous_format = warnings.formatwarning
    if not debug:  # warnings as one line each, like errors (not the source line that raised them)
        warnings.formatwarning = _format_warning
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "_run", None) is None:
            parser.print_help()
            return 0
        code = args._run(args)
        return int(code or 0)
    except KeditError as exc:
        if debug:
            raise
        print(f"kedit: error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kedit: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # a full disk, a permission, an unreadable file: the environment, while running
        if debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"kedit: error: {where}{_one_line(exc.strerror or exc)}", file=sys.stderr)
        return EXIT_RUNTIME
    except MemoryError:
        if debug:
            raise
        print("kedit: error: out of memory (try a smaller batch, fewer requests or another device)", file=sys.stderr)
        return EXIT_RUNTIME
    except Exception as exc:  # a bug (in kedit or a plugin): still one line, the traceback on request
        if debug:
            raise
        print(f"kedit: internal error: {type(exc).__name__}: {_one_line(exc)[:500]} (run again with --debug for "
              "the traceback, and please report it)", file=sys.stderr)
        return EXIT_RUNTIME
    finally:
        warnings.formatwarning = previous_format


if __name__ == "__main__":
    sys.exit(main())
