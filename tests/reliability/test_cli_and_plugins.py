"""The command line: every error is one line naming what is wrong, exit status 2 for usage and input
errors, 1 for faults while running, no traceback unless --debug; and a plugin whose import raises leaves
kedit working and is named (docs/RELIABILITY.md, "Command line" and "Plugins")."""
import json
import re
import sys
import warnings

import pytest
from safetensors.torch import save_file

from kedit_core.cli.main import main
from kedit_core.plugins import reload_plugins
from kedit_core.testing import save_tiny_model

from .conftest import identity_covariance, main_lines, run_kedit, subprocess_env


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny_model("gpt2", root / "model", num_layers=2, hidden_size=32, context_length=64)
    (root / "requests.json").write_text(json.dumps([
        {"prompt": "The sport played by {}", "subject": "LeBron James", "target_new": "football"}]))
    (root / "bad.json").write_text(json.dumps([
        {"prompt": "The sport played by {}", "subject": "LeBron James", "target_new": "football"},
        {"prompt": "{} plays", "subject": 7, "target_new": "tennis"}]))
    (root / "templates.json").write_text(json.dumps([["{}"]]))
    from kedit_core import load_model

    mom2 = identity_covariance(load_model(root / "model", device="cpu")).moment(None, 1).mom2
    save_file({"mom2": mom2.contiguous()}, str(root / "c1.safetensors"))
    return root


def edit_args(root, *extra):
    return ["edit", "--model", root / "model", "--method", "memit", "--requests", root / "requests.json", "--layers",
            "1", "--cov", f"1={root / 'c1.safetensors'}", "--context-templates", root / "templates.json", "--set",
            "v_num_grad_steps=2", "--device", "cpu", "--no-progress", *extra]


@pytest.mark.parametrize("argv, code, words", [
    (["edit", "--model", "m"], 2, r"^kedit edit: error: the following arguments are required: --method, --requests "
                                  r"\(see `kedit edit --help`\)$"),
    (["nonsense"], 2, r"^kedit: error: argument <command>: invalid choice: 'nonsense'"),
    (["eval", "--model", "m", "--data", "d.json", "--sizes", "ten"], 2, r"argument --sizes: expected comma-separated"),
])
def test_usage_errors_are_one_line_with_status_2(capsys, argv, code, words):
    status, lines = main_lines(argv, capsys)
    assert status == code and len(lines) == 1
    assert re.search(words, lines[0]), lines


def test_input_errors_name_file_record_and_field_with_status_2(workdir, capsys):
    cases = [
        (edit_args(workdir)[:5] + ["--requests", workdir / "bad.json"], r"bad.json, record 1, field 'subject'"),
        (edit_args(workdir, "--set", "v_lr=NaN"), r"MemitHParams.v_lr \(flag 'v_lr=NaN'\): expected a finite number"),
        (edit_args(workdir, "--layers", "7"), r"layer\(s\) \[7\] do not exist; this model has layers 0..1"),
        (edit_args(workdir, "--cov", "1=/elsewhere.safetensors"), r"--cov: layer 1 given twice"),
        (["eval", "--model", workdir / "model", "--data", workdir / "requests.json", "--n", "1"],
         r"requests.json, record 0: looks like a plain request file"),
    ]
    for argv, words in cases:
        status, lines = main_lines(argv, capsys)
        assert status == 2 and len(lines) == 1 and lines[0].startswith("kedit: error: "), (argv, lines)
        assert re.search(words, lines[0]), lines


def test_a_runtime_fault_is_one_line_with_status_1(workdir, capsys):
    out = workdir / "nan.safetensors"
    status, lines = main_lines(edit_args(workdir, "--set", "v_lr=1e30", "--set", "clamp_norm_factor=1e30",
                                         "--save-deltas", out), capsys)
    assert status == 1 and lines == [l for l in lines if l.startswith("kedit: error: editor 'memit' computed NaN")]
    assert len(lines) == 1 and not out.exists()


def test_a_bug_is_one_line_with_status_1_and_debug_shows_the_traceback(monkeypatch, capsys):
    from kedit_core.cli.commands import plugins as plugins_command

    def broken(args):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'")

    monkeypatch.setattr(plugins_command, "run", broken)
    status, lines = main_lines(["plugins"], capsys)
    assert status == 1 and lines == ["kedit: internal error: TypeError: unsupported operand type(s) for +: 'int' and "
                                     "'str' (run again with --debug for the traceback, and please report it)"]
    with pytest.raises(TypeError):
        main(["--debug", "plugins"])
    with pytest.raises(TypeError):
        main(["plugins", "--debug"])


def test_as_a_process_no_traceback_unless_debug(workdir):
    args = edit_args(workdir)[:5] + ["--requests", workdir / "bad.json"]
    plain = run_kedit(*args)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert [l for l in plain.stderr.splitlines() if l.strip()] == [plain.stderr.strip()]
    debug = run_kedit("--debug", *args)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert "RecordError: " in debug.stderr.splitlines()[-1]


# -- plugins -------------------------------------------------------------------------------------------

@pytest.fixture
def broken_plugin(tmp_path, monkeypatch):
    """An installed plugin (a dist-info with a kedit entry point) whose import raises."""
    (tmp_path / "kedit_broken_plugin.py").write_text("raise ImportError('needs libfoo 2.0, found 1.3')\n")
    dist = tmp_path / "kedit_broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kedit-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[kedit]\nbroken = kedit_broken_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("kedit_broken_plugin", None)
    monkeypatch.undo()
    reload_plugins()


def plugins_report(monkeypatch, capsys, **env):
    """``kedit plugins`` after a fresh plugin load under ``env``: the report, the loaded plugin names and
    the warnings emitted."""
    for var in ("KEDIT_LOAD_PLUGINS", "KEDIT_DISABLE_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    reload_plugins()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["plugins", "--compact"]) == 0
    report = json.loads(capsys.readouterr().out)
    return report, {p["name"] for p in report["plugins"]}, [str(w.message) for w in caught]


def test_a_plugin_whose_import_raises_is_skipped_and_named(broken_plugin, monkeypatch, capsys):
    report, names, messages = plugins_report(monkeypatch, capsys)
    assert {"memit", "rome", "emmet", "finetune"} <= names and "broken" not in names    # kedit keeps working
    assert report["failed"]["broken"].startswith("kedit plugin 'broken' (distribution 'kedit-broken', "
                                                 "kedit_broken_plugin) failed to load and is skipped: ImportError: "
                                                 "needs libfoo 2.0, found 1.3. Disable it with "
                                                 "KEDIT_DISABLE_PLUGINS=broken")
    assert any("kedit plugin 'broken'" in m for m in messages)
    status, lines = main_lines(["edit", "--model", "m", "--method", "broken-editor", "--requests", "x.json"], capsys)
    assert status == 2   # the request file is read first; then the editor lookup names the broken plugin
    from kedit_core.editors import get_editor

    with pytest.raises(Exception, match=r"no editor named 'broken-editor'; .*plugin\(s\) that failed to load: broken"):
        get_editor("broken-editor")


@pytest.mark.parametrize("env, loaded", [({"KEDIT_DISABLE_PLUGINS": "broken"}, {"memit", "rome", "emmet", "finetune", "alphaedit"}),
                                         ({"KEDIT_LOAD_PLUGINS": "memit"}, {"memit"}),
                                         ({"KEDIT_LOAD_PLUGINS": "memit,broken"}, {"memit"})])
def test_allow_and_block_lists_with_a_broken_plugin(broken_plugin, monkeypatch, capsys, env, loaded):
    report, names, messages = plugins_report(monkeypatch, capsys, **env)
    assert names - {"kedit-core"} == loaded
    tried = "broken" in env.get("KEDIT_LOAD_PLUGINS", "")      # only an allow-list naming it tries to load it
    assert ("broken" in report["failed"]) == tried == any("plugin 'broken'" in m for m in messages)


def test_as_a_process_the_broken_plugin_is_one_warning_line(broken_plugin):
    env = subprocess_env(PYTHONPATH=str(broken_plugin))
    res = run_kedit("plugins", "--compact", env=env)
    assert res.returncode == 0 and "broken" in json.loads(res.stdout)["failed"]
    assert [l for l in res.stderr.splitlines() if l.strip()] == [
        "kedit: warning: " + json.loads(res.stdout)["failed"]["broken"]]
