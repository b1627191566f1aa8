"""The one plugin manager: created on first use (never at import time), loading the ``kedit``
entry-point group, honouring ``KEDIT_LOAD_PLUGINS`` (allow-list) and ``KEDIT_DISABLE_PLUGINS``
(block-list), then ``check_pending()`` so a misspelled hook implementation fails loudly.

A plugin whose import raises does not take kedit down with it: it is skipped with a warning naming it,
its error and how to switch it off, and ``kedit plugins`` lists it under ``failed``; asking for an
editor it would have provided names it too."""
from __future__ import annotations

import contextlib
import importlib.metadata as md
import os
import threading
import warnings
from typing import Iterator

import pluggy

from ..errors import PluginError
from . import hookspecs
from .registry import PluginInfo, Registry

ENTRY_POINT_GROUP = "kedit"
CORE_PLUGIN_NAME = "kedit-core"

_lock = threading.RLock()
_pm: pluggy.PluginManager | None = None
_infos: dict[str, PluginInfo] = {}
_failed: dict[str, str] = {}   # entry-point name -> why it did not load
_registry: Registry | None = None


def _names_from_env(var: str) -> set[str] | None:
    raw = os.environ.get(var)
    if raw is None:
        return None
    return {name.strip() for name in raw.split(",") if name.strip()}


def _core_info() -> PluginInfo:
    from .._version import __version__

    return PluginInfo(CORE_PLUGIN_NAME, "kedit", __version__, "kedit_core.adapters.builtin")


def _create() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    from ..adapters import builtin

    pm.register(builtin, name=CORE_PLUGIN_NAME)
    _infos[CORE_PLUGIN_NAME] = _core_info()

    allow = _names_from_env("KEDIT_LOAD_PLUGINS")
    block = _names_from_env("KEDIT_DISABLE_PLUGINS") or set()
    seen: dict[str, str] = {}
    for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        dist = ep.dist.name if ep.dist is not None else None
        version = ep.dist.version if ep.dist is not None else None
        if ep.name in seen:
            if seen[ep.name] == dist:  # the same distribution seen twice on sys.path
                continue
            raise PluginError(f"two distributions declare the kedit plugin {ep.name!r}: "
                              f"'{seen[ep.name]}' and '{dist}'")
        seen[ep.name] = dist
        if (allow is not None and ep.name not in allow) or ep.name in block:
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin is named, with the way to switch it off, and skipped
            message = (f"kedit plugin {ep.name!r} (distribution '{dist}', {ep.value}) failed to load and is skipped: "
                       f"{type(exc).__name__}: {' '.join(str(exc).split())}. Disable it with "
                       f"KEDIT_DISABLE_PLUGINS={ep.name}")
            _failed[ep.name] = message
            warnings.warn(message, RuntimeWarning, stacklevel=2)
            continue
        pm.register(plugin, name=ep.name)
        _infos[ep.name] = PluginInfo(ep.name, dist, version, ep.value)
    pm.check_pending()
    return pm


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, created and loaded on first call."""
    global _pm
    with _lock:
        if _pm is None:
            _pm = _create()
        return _pm


def failed_plugins() -> dict[str, str]:
    """Entry points that failed to load (skipped), with the reason: ``{name: message}``."""
    get_plugin_manager()
    return dict(_failed)


def plugin_info(name: str) -> PluginInfo:
    get_plugin_manager()
    return _infos.get(name) or PluginInfo(name, None, None, None)


def _build_registry(pm: pluggy.PluginManager) -> Registry:
    registry = Registry()
    # Call each plugin's implementation with a register() bound to that plugin, so clashes can name
    # both distributions. Oldest registration first: the core, then entry points in name order.
    hook_registrars = [
        ("register_model_adapters", registry.adapter_registrar),
        ("register_editors", registry.editor_registrar),
        ("register_ops", registry.op_registrar),
        ("register_commands", registry.command_registrar),
    ]
    for hook_name, registrar in hook_registrars:
        for impl in reversed(getattr(pm.hook, hook_name).get_hookimpls()):
            info = plugin_info(impl.plugin_name)
            try:
                impl.function(register=registrar(info))
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(f"{info.label}: its {hook_name} hook failed: {type(exc).__name__}: {exc}") from exc
    return registry


def get_registry() -> Registry:
    """Everything the loaded plugins registered (built once, rebuilt after :func:`registered_plugin`)."""
    global _registry
    with _lock:
        if _registry is None:
            _registry = _build_registry(get_plugin_manager())
        return _registry


def _invalidate() -> None:
    global _registry
    _registry = None
    from .. import ops

    ops.reset_cache()


def reload_plugins() -> None:
    """Forget the plugin manager, so the next use loads entry points again (after pip install/uninstall
    or a change of KEDIT_LOAD_PLUGINS / KEDIT_DISABLE_PLUGINS)."""
    global _pm
    with _lock:
        _pm = None
        _infos.clear()
        _failed.clear()
        _invalidate()


@contextlib.contextmanager
def registered_plugin(plugin: object, name: str, distribution: str | None = None) -> Iterator[None]:
    """Register ``plugin`` for the duration of a ``with`` block (tests, notebooks)::

        with registered_plugin(MyPlugin(), name="my-test-plugin"):
            ...
    """
    pm = get_plugin_manager()
    with _lock:
        pm.register(plugin, name=name)
        _infos[name] = PluginInfo(name, distribution, None, type(plugin).__module__)
        try:
            pm.check_pending()
        except Exception:
            pm.unregister(name=name)
            _infos.pop(name, None)
            raise
        _invalidate()
    try:
        yield
    finally:
        with _lock:
            pm.unregister(name=name)
            _infos.pop(name, None)
            _invalidate()


def describe_plugins() -> list[dict]:
    """What ``kedit plugins`` prints: each plugin's name, version, hooks and registrations."""
    pm = get_plugin_manager()
    by_plugin = get_registry().by_plugin()
    out = []
    for name, plugin in sorted(pm.list_name_plugin(), key=lambda item: (item[0] != CORE_PLUGIN_NAME, item[0])):
        info = plugin_info(name)
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        regs = by_plugin.get(name, {"editors": [], "adapters": [], "ops": [], "commands": []})
        out.append({
            "name": name,
            "distribution": info.distribution,
            "version": info.version,
            "module": info.module,
            "hooks": hooks,
            **regs,
        })
    return out
