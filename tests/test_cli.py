import json
import subprocess
import sys

import pytest

from kedit_core.cli.main import build_parser, main


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "kedit_core.cli.main", *args], capture_output=True, text=True,
                          env=env)


def subcommands():
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return sorted(action.choices)


def test_help_for_kedit_and_every_subcommand(capsys):
    out = run_cli("--help")  # as a process once: the console entry works from a fresh interpreter
    assert out.returncode == 0 and "usage: kedit" in out.stdout
    names = subcommands()
    assert "plugins" in names
    # every subcommand in this process: a fresh interpreter per subcommand cost a minute of imports in CI
    for name in names:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        res = capsys.readouterr()
        assert exit_info.value.code == 0 and f"usage: kedit {name}" in res.out, (name, res.err)


def test_plugins_prints_json(capsys):
    assert main(["plugins"]) == 0
    report = json.loads(capsys.readouterr().out)
    core = next(p for p in report["plugins"] if p["name"] == "kedit-core")
    assert {"gpt2", "gptj", "gpt-neox", "llama", "mistral", "qwen2"} <= set(core["adapters"])
    assert "cov_accumulate_" in report["ops"]


def test_user_errors_print_one_line_without_traceback(tmp_path):
    import os

    env = dict(os.environ, KEDIT_OPS="nonsense")
    res = run_cli("plugins", env=env)
    assert res.returncode == 2
    assert res.stderr.startswith("kedit: error: KEDIT_OPS") and "Traceback" not in res.stderr
