"""Editing sessions on disk: rollback is bit-exact, a stream killed mid-batch resumes to the same deltas
without recomputing finished batches, and bad inputs are one-line errors that change nothing."""
import hashlib
import os
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kedit_core.editors as editors_module
from kedit_core.errors import KeditError
from kedit_core.requests import EditRequest
from kedit_core.session import EditSession, read_manifest
from kedit_core.testing import tiny_model

from .conftest import TEMPLATES, assert_bit_identical, covariance_from_text, state_snapshot
from .test_alphaedit import TINY

REPO = Path(__file__).resolve().parents[2]
SUBJECTS = [("The sport played by {}", "LeBron James", "football", "basketball"),
            ("The capital city of {}", "France", "Berlin", "Paris"),
            ("The birthplace of {}", "Albert Einstein", "Tokyo", "Ulm"),
            ("The language of {}", "Brazil", "Finnish", "Portuguese"),
            ("The sport played by {}", "Lionel Messi", "tennis", "soccer"),
            ("The capital city of {}", "Japan", "Lisbon", "Tokyo")]
STREAM = [EditRequest(p, s, n, t, case_id=i) for i, (p, s, n, t) in enumerate(SUBJECTS)]
ALPHA = {**TINY, "layers": [1, 2]}
MEMIT = {"clamp_norm_factor": 4.0, "v_weight_decay": 1e-3, "mom2_update_weight": 1.0, "layers": [1, 2]}


def fresh():
    return tiny_model("gpt2", num_layers=4, hidden_size=64)


@pytest.fixture(scope="module")
def stats():
    return covariance_from_text(fresh(), [1, 2])


def tree_digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def create(tmp_path, name="s"):
    model = fresh()
    return EditSession.create(tmp_path / name, model, context_templates=TEMPLATES), model


def test_rollback_is_bit_identical_and_reopening_rebuilds_the_stream(tmp_path, stats):
    session, model = create(tmp_path)
    base = state_snapshot(model)
    snapshots = []
    for i, method in enumerate(["alphaedit", "memit", "alphaedit"]):
        settings = ALPHA if method == "alphaedit" else MEMIT
        record = session.add(STREAM[2 * i: 2 * i + 2], method, stats=stats, progress=False, **settings)
        snapshots.append(state_snapshot(model))
        assert record["index"] == i + 1 and record["fingerprint_after"] == model.fingerprint()
    # AlphaEdit's batch 3 saw the keys of batches 1 and 2 (MEMIT's included: the same keys)
    keys = [session._read_keys(r) for r in session.batches]
    expected = sum(k[2].double().T @ k[2].double() for k in keys)
    assert torch.allclose(session.preserved_keys[2], expected, rtol=1e-12, atol=0)
    norms = session.batches[-1]["norms"]
    assert set(norms) == {model.adapter.mlp_out_weight_name(layer) for layer in (1, 2)}
    assert all(s["norm_ratio"] > 0 and s["drift_norm"] > 0 for s in norms.values())

    other = fresh()
    reopened = EditSession.open(tmp_path / "s", other)
    assert_bit_identical(other, snapshots[-1])
    assert all(torch.equal(reopened.preserved_keys[layer], session.preserved_keys[layer]) for layer in (1, 2))

    session.rollback(1)
    assert_bit_identical(model, snapshots[0])
    assert len(read_manifest(tmp_path / "s")["batches"]) == 1 and not (tmp_path / "s/batches/0002").exists()
    assert torch.equal(session.preserved_keys[2], keys[0][2].double().T @ keys[0][2].double())
    third = fresh()
    EditSession.open(tmp_path / "s", third)
    assert_bit_identical(third, snapshots[0])
    session.rollback(0)
    assert_bit_identical(model, base)
    assert not (tmp_path / "s" / "preserved_keys.safetensors").exists()


KILLER = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads({threads})  # as the test process: the same float rounding
    sys.path.insert(0, {repo!r})
    import kedit_core.deltas as deltas
    from tests.editing.test_session import STREAM, ALPHA, fresh, stats_for
    from tests.editing.conftest import TEMPLATES
    from kedit_core.session import EditSession
    real_save = deltas.Deltas.save
    def save(self, path):
        if "0003" in str(path):      # killed while writing batch 3, after its values were computed
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(self, path)
    deltas.Deltas.save = save
    model = fresh()
    session = EditSession.create({directory!r}, model, context_templates=TEMPLATES)
    session.add_stream(STREAM, "alphaedit", 2, stats=stats_for(model), progress=False, **ALPHA)
""")


def stats_for(model):
    return covariance_from_text(model, [1, 2])


def test_a_stream_killed_mid_batch_resumes_to_the_same_deltas(tmp_path, stats, monkeypatch):
    directory = tmp_path / "killed"
    run = subprocess.run([sys.executable, "-c", KILLER.format(repo=str(REPO), directory=str(directory),
                                                        threads=torch.get_num_threads())],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == -9, run.stderr[-2000:]
    assert len(read_manifest(directory)["batches"]) == 2
    assert (directory / "work" / "0003").is_dir()  # the finished value chunks of batch 3

    calls = []
    real = editors_module.compute_edit

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr("kedit_core.session.compute_edit", counting)
    model = fresh()
    session = EditSession.open(directory, model)
    session.add_stream(STREAM, "alphaedit", 2, stats=stats, progress=False, **ALPHA)
    assert len(calls) == 1 and len(session.batches) == 3
    assert not (directory / "work" / "0003").exists()
    result = session.batches[-1]
    resumed = json.loads((directory / "batches" / "0003" / "result.json").read_text())["info"]["values_resumed"]
    # batch 3's values all came back from the killed run's work directory
    assert resumed["batches_loaded"] >= 1 and resumed["batches_computed"] == 0, resumed

    monkeypatch.setattr("kedit_core.session.compute_edit", real)
    straight, straight_model = create(tmp_path, "straight")
    straight.add_stream(STREAM, "alphaedit", 2, stats=stats, progress=False, **ALPHA)
    assert_bit_identical(model, state_snapshot(straight_model))
    assert result["files"]["deltas.safetensors"] == straight.batches[-1]["files"]["deltas.safetensors"]


def test_bad_inputs_are_one_line_errors_that_change_nothing(tmp_path, stats):
    session, model = create(tmp_path)
    session.add(STREAM[:2], "alphaedit", stats=stats, progress=False, **ALPHA)
    session.add(STREAM[2:4], "memit", stats=stats, progress=False, **MEMIT)
    after = state_snapshot(model)
    files = tree_digest(tmp_path / "s")

    def fails(match, fn, *args, **kwargs):
        with pytest.raises(KeditError, match=match) as info:
            fn(*args, **kwargs)
        assert "\n" not in str(info.value)
        assert tree_digest(tmp_path / "s") == files

    fails("is empty", session.add, [], "memit", stats=stats)
    fails("keeps no direction", session.add, STREAM[4:], "alphaedit", stats=stats, progress=False,
          **{**ALPHA, "nullspace_threshold": 1e-9})
    assert_bit_identical(model, after)

    other = tiny_model("gpt2", num_layers=4, hidden_size=64, seed=1)
    before_other = state_snapshot(other)
    fails("session of another model", EditSession.open, tmp_path / "s", other)
    assert_bit_identical(other, before_other)

    deltas = tmp_path / "s" / "batches" / "0002" / "deltas.safetensors"
    data = bytearray(deltas.read_bytes())
    data[-5] ^= 0xFF
    deltas.write_bytes(bytes(data))
    files = tree_digest(tmp_path / "s")
    base_model = fresh()
    base = state_snapshot(base_model)
    fails(r"batches/0002/deltas.safetensors: batch 2's file is corrupt", EditSession.open, tmp_path / "s", base_model)
    assert_bit_identical(base_model, base)
    fails("not an editing session", EditSession.open, tmp_path, base_model)


def test_cli_session_verbs(tmp_path, stats, capsys):
    """create / add --batch-size / status / rollback / apply through `kedit session`, and a one-line error."""
    import json

    from kedit_core.cli.main import main
    from kedit_core.testing import save_tiny_model

    model_dir = save_tiny_model("gpt2", tmp_path / "model", num_layers=4, hidden_size=64)
    requests = tmp_path / "requests.json"
    requests.write_text(json.dumps([r.to_dict() for r in STREAM[:4]]))
    templates = tmp_path / "templates.json"
    templates.write_text(json.dumps(TEMPLATES))
    cov = []
    for layer in (1, 2):
        from safetensors.torch import save_file

        path = tmp_path / f"c{layer}.safetensors"
        save_file({"mom2": stats.moment(None, layer).mom2.contiguous()}, str(path))
        cov += ["--cov", f"{layer}={path}"]
    s = str(tmp_path / "sess")
    assert main(["session", "create", s, "--model", str(model_dir), "--context-templates", str(templates)]) == 0
    settings = [f"--set={k}={v}" for k, v in TINY.items()]
    assert main(["session", "add", s, "--method", "alphaedit", "--requests", str(requests), "--batch-size", "2",
                 "--layers", "1,2", "--no-progress", *settings, *cov]) == 0
    capsys.readouterr()
    assert main(["session", "status", s, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["batches"] == 2 and status["edits"] == 4 and status["editors"] == ["alphaedit", "alphaedit"]
    assert main(["session", "rollback", s, "1"]) == 0
    out = tmp_path / "edited"
    assert main(["session", "apply", s, "--save-model", str(out)]) == 0
    session_model = fresh()
    session = EditSession.open(s, __import__("kedit_core").load_model(str(model_dir), device="cpu"))
    saved = __import__("kedit_core").load_model(str(out), device="cpu")
    assert saved.fingerprint() == session.batches[-1]["fingerprint_after"] and len(session.batches) == 1
    del session_model
    capsys.readouterr()
    assert main(["session", "add", s, "--method", "memit", "--requests", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kedit: error:") and "\n" not in err
