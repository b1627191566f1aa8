"""kedit's plugin system (pluggy): hookspecs, the lazily created plugin manager, the registry."""
from .hookspecs import hookimpl, hookspec
from .manager import (
    ENTRY_POINT_GROUP,
    describe_plugins,
    failed_plugins,
    get_plugin_manager,
    get_registry,
    plugin_info,
    registered_plugin,
    reload_plugins,
)
from .registry import CommandSpec, PluginInfo, Registration, Registry

__all__ = [
    "ENTRY_POINT_GROUP", "CommandSpec", "PluginInfo", "Registration", "Registry", "describe_plugins", "failed_plugins",
    "get_plugin_manager", "get_registry", "hookimpl", "hookspec", "plugin_info", "registered_plugin",
    "reload_plugins",
]
