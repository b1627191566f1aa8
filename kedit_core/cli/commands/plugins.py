"""``kedit plugins``: what is installed, as JSON."""
from __future__ import annotations

import json

NAME = "plugins"
HELP = "list loaded plugins, what each registers, and which op implementations run (JSON)"
DESCRIPTION = """Print JSON describing every loaded plugin (name, distribution, version, hooks, and the
editors, model adapters, op implementations and commands it registers), the plugins that failed to
load (skipped, with the reason), which implementation each kedit op uses per device, and whether the
compiled extension is loaded.

Environment: KEDIT_LOAD_PLUGINS=a,b loads only those plugins; KEDIT_DISABLE_PLUGINS=a,b skips them."""


def add_arguments(parser) -> None:
    parser.add_argument("--compact", action="store_true", help="print on one line")


def run(args) -> int:
    from ... import _ext, ops
    from ..._version import __version__
    from ...plugins import describe_plugins, failed_plugins

    report = {
        "kedit_version": __version__,
        "extension": _ext.status(),
        "plugins": describe_plugins(),
        "failed": failed_plugins(),
        "ops": ops.describe(),
    }
    print(json.dumps(report, indent=None if args.compact else 2))
    return 0
