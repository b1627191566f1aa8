"""The plugin core: hookspecs, lazy manager, registry clashes, allow/block lists."""
import inspect
import subprocess
import sys

import pytest

import kedit_core
from kedit_core import Editor, EditResult, HyperParams, hookimpl
from kedit_core.errors import PluginError
from kedit_core.plugins import get_registry, hookspecs, registered_plugin


def make_editor(editor_name):
    class _Editor(Editor):
        name = editor_name
        HParams = HyperParams

        def compute(self, model, requests, context):
            raise AssertionError("not called")
    return _Editor


class EditorPlugin:
    def __init__(self, cls):
        self.cls = cls

    @hookimpl
    def register_editors(self, register):
        register(self.cls)


def test_every_hookspec_is_documented():
    specs = [f for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("register_")]
    assert {f.__name__ for f in specs} == {"register_editors", "register_model_adapters", "register_ops",
                                           "register_commands"}
    for f in specs:
        doc = inspect.getdoc(f) or ""
        assert ":param register:" in doc, f"{f.__name__} does not document its parameter"


def test_registered_plugin_adds_and_removes_an_editor():
    cls = make_editor("test-editor-xyz")
    with registered_plugin(EditorPlugin(cls), name="test-plugin", distribution="test-dist"):
        assert kedit_core.get_editor("test-editor-xyz") is cls
        assert get_registry().editors["test-editor-xyz"].plugin.distribution == "test-dist"
    assert "test-editor-xyz" not in kedit_core.list_editors()


def test_same_editor_name_from_two_plugins_names_both_distributions():
    a, b = make_editor("dup-editor"), make_editor("dup-editor")
    with registered_plugin(EditorPlugin(a), name="plugin-a", distribution="dist-alpha"):
        with registered_plugin(EditorPlugin(b), name="plugin-b", distribution="dist-beta"):
            with pytest.raises(PluginError) as info:
                get_registry()
            assert "dist-alpha" in str(info.value) and "dist-beta" in str(info.value)
    get_registry()  # healthy again once one is gone


def test_misspelled_hook_fails_loudly():
    class Misspelled:
        @hookimpl
        def register_editor(self, register):  # missing the trailing 's'
            pass

    with pytest.raises(Exception, match="register_editor"):
        with registered_plugin(Misspelled(), name="misspelled"):
            pass


def test_registering_a_non_editor_is_a_clear_error():
    class Bad:
        @hookimpl
        def register_editors(self, register):
            register(object)

    with registered_plugin(Bad(), name="bad-plugin", distribution="bad-dist"):
        with pytest.raises(PluginError, match="bad-dist.*expected a subclass"):
            get_registry()


def test_op_implementation_from_a_plugin_is_explicit_and_visible():
    import torch

    from kedit_core import ops

    calls = []

    def fast_cov(acc, x, mask=None):
        calls.append(1)
        ops.reference.cov_accumulate_(acc, x, mask)

    class OpPlugin:
        @hookimpl
        def register_ops(self, register):
            register("cov_accumulate_", "cpu", fast_cov, name="fast")

    with registered_plugin(OpPlugin(), name="opplug"):
        table = ops.describe(devices=("cpu",))
        assert "opplug:fast" in table["cov_accumulate_"]["cpu"]["available"]
        assert table["cov_accumulate_"]["cpu"]["selected"] != "opplug:fast"  # never picked silently
        ops.select("cov_accumulate_", "opplug:fast", "cpu")
        try:
            ops.cov_accumulate_(torch.zeros(3, 3, dtype=torch.float64), torch.randn(4, 3))
            assert calls == [1]
            assert ops.implementation("cov_accumulate_", "cpu").implementation == "opplug:fast"
        finally:
            ops.select("cov_accumulate_", None, "cpu")


def _run_kedit_plugins(env_extra):
    import json
    import os

    env = dict(os.environ, **env_extra)
    out = subprocess.run([sys.executable, "-m", "kedit_core.cli.main", "plugins", "--compact"], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def _plugins_in_this_process(monkeypatch, capsys, **env):
    import json

    from kedit_core.cli.main import main
    from kedit_core.plugins.manager import reload_plugins

    for key in ("KEDIT_LOAD_PLUGINS", "KEDIT_DISABLE_PLUGINS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reload_plugins()
    capsys.readouterr()
    assert main(["plugins", "--compact"]) == 0
    return {p["name"] for p in json.loads(capsys.readouterr().out)["plugins"]}


def test_allow_list_and_block_list_filter_entry_points(monkeypatch, capsys):
    from kedit_core.plugins.manager import reload_plugins

    all_plugins = {p["name"] for p in _run_kedit_plugins({})["plugins"]}
    assert "kedit-core" in all_plugins
    allowed = {p["name"] for p in _run_kedit_plugins({"KEDIT_LOAD_PLUGINS": ""})["plugins"]}
    assert allowed == {"kedit-core"}  # an empty allow-list loads no entry points; the core stays
    # each block in this process after reload_plugins (a fresh interpreter per plugin cost ~45 s in CI)
    try:
        for name in all_plugins - {"kedit-core"}:
            blocked = _plugins_in_this_process(monkeypatch, capsys, KEDIT_DISABLE_PLUGINS=name)
            assert name not in blocked and blocked == all_plugins - {name}
        assert _plugins_in_this_process(monkeypatch, capsys, KEDIT_LOAD_PLUGINS="") == {"kedit-core"}
    finally:
        monkeypatch.undo()
        reload_plugins()  # the next tests see every plugin again
