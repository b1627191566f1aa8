import json

from kedit_core.cli.main import main


def test_demo_edits_the_toy_model_and_writes_json_and_png(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--model", "toy", "-n", "5", "--out", str(out), "--stats-dir", str(tmp_path / "stats"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "ES" in printed and "recall" in printed and "before" in printed
    result = json.loads((out / "demo.json").read_text())
    assert result["method"] == "memit" and result["num_edits"] == 5
    assert result["pre"]["ES"] == 0.0 and result["post"]["ES"] >= 80      # the edits took
    assert result["recall"]["before"] >= 98
    assert set(result["phases_seconds"]) >= {"load model", "statistics", "edit"}
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "hparams.json").read_text())["hparams"]["layers"] == result["hparams"]["layers"]


def test_demo_refuses_bad_input_in_one_line(tmp_path, capsys):
    assert main(["demo", "--model", "toy", "-n", "0", "--out", str(tmp_path)]) == 2
    assert "--num-edits 0" in capsys.readouterr().err
    assert main(["demo", "--method", "nope", "--out", str(tmp_path)]) == 2
    assert "no editor named 'nope'" in capsys.readouterr().err


def test_the_demo_settings_are_valid_for_their_editor():
    # The demo's own settings are validated data like any hyper-parameter file: a misspelt key or a wrong type
    # would otherwise surface only on the real model, so each is parsed as the editor's --set flags would be.
    from kedit_core.demo import DEMO_SETTINGS
    from kedit_core.editors import get_editor
    from kedit_core.hparams import parse_assignments

    assert ("smollm2-135m", "memit") in DEMO_SETTINGS
    for (_, method), settings in DEMO_SETTINGS.items():
        flags = [f"{key}={json.dumps(value)}" for key, value in settings.items()]
        assert parse_assignments(get_editor(method).HParams, flags) == settings
