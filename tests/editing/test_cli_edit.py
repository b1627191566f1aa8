"""``kedit edit``: deterministic delta files, a loadable edited checkpoint, clear errors."""
import json

import pytest
import torch
from safetensors.torch import save_file

from kedit_core import Deltas, load_model
from kedit_core.cli.commands.edit import parse_layers
from kedit_core.cli.main import main
from kedit_core.errors import KeditError
from kedit_core.testing import save_tiny_model

from .conftest import TEMPLATES, covariance_from_text


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit")
    save_tiny_model("gpt2", root / "model", num_layers=4, hidden_size=64)
    model = load_model(root / "model", device="cpu")
    cov = covariance_from_text(model, [1, 2])
    for layer in (1, 2):
        save_file({"mom2": cov.moment(model, layer).mom2.contiguous()}, str(root / f"c{layer}.safetensors"))
    (root / "requests.json").write_text(json.dumps([
        {"prompt": "The sport played by {}", "subject": "LeBron James", "target_new": "football"},
        {"prompt": "The capital city of {}", "subject": "France", "target_new": "Berlin"}]))
    (root / "templates.json").write_text(json.dumps(TEMPLATES))
    return root


def args(root, *extra):
    return ["edit", "--model", str(root / "model"), "--method", "memit", "--requests", str(root / "requests.json"),
            "--layers", "1,2", "--cov", f"1={root / 'c1.safetensors'}", "--cov", f"2={root / 'c2.safetensors'}",
            "--context-templates", str(root / "templates.json"), "--set", "mom2_update_weight=1",
            "--set", "clamp_norm_factor=4", "--set", "v_num_grad_steps=8", "--seed", "5", "--no-progress",
            "--device", "cpu", *extra]


def test_two_runs_give_identical_delta_files(workdir, capsys):
    one, two = workdir / "one.safetensors", workdir / "two.safetensors"
    assert main(args(workdir, "--save-deltas", str(one))) == 0
    out = capsys.readouterr().out
    assert "transformer.h.1.mlp.c_proj.weight" in out and "time per phase" in out and "layers: 1, 2" in out
    assert main(args(workdir, "--save-deltas", str(two), "--json")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert one.read_bytes() == two.read_bytes()
    deltas = Deltas.load(one)
    assert deltas.editor == "memit" and deltas.extra["seed"] == 5 and deltas.extra["context_templates"] == TEMPLATES
    assert deltas.hparams["layers"] == [1, 2] and deltas.hparams["mom2_update_weight"] == 1.0
    assert summary["delta_norms"] == pytest.approx(deltas.norms())
    sidecar = json.loads((workdir / "one.safetensors.hparams.json").read_text())
    assert sidecar["hparams"] == deltas.hparams and sidecar["seed"] == 5


def test_save_model_writes_the_edited_checkpoint(workdir, capsys):
    out = workdir / "edited"
    assert main(args(workdir, "--save-model", str(out), "--save-deltas", str(workdir / "d.safetensors"))) == 0
    base = load_model(workdir / "model", device="cpu")
    edited = load_model(out, device="cpu")
    deltas = Deltas.load(workdir / "d.safetensors")
    with deltas.apply(base.model):
        expected = base.model.state_dict()
        got = edited.model.state_dict()
        for name in deltas.names():
            assert torch.equal(got[name], expected[name]), name
    assert json.loads((out / "kedit_edit.json").read_text())["editor"] == "memit"


def test_user_errors_are_one_line(workdir, capsys):
    bad = args(workdir)
    bad[bad.index("--cov", bad.index("--cov") + 1):bad.index("--cov", bad.index("--cov") + 1) + 2] = []
    assert main(bad) == 2
    assert "no covariance file given for layer(s) [2]" in capsys.readouterr().err
    assert main(args(workdir, "--set", "v_lrr=1")) == 2
    assert "unknown key 'v_lrr'" in capsys.readouterr().err
    wrong = [a if a != "memit" else "memitt" for a in args(workdir)]
    assert main(wrong) == 2
    assert "no editor named 'memitt'" in capsys.readouterr().err


def test_parse_layers():
    assert parse_layers("3,4,5") == [3, 4, 5] and parse_layers("3-5,8") == [3, 4, 5, 8]
    with pytest.raises(KeditError, match="--layers"):
        parse_layers("a")


def test_work_dir_keeps_the_values_and_a_rerun_gives_the_same_file(workdir, capsys):
    work, first, second = workdir / "work", workdir / "w1.safetensors", workdir / "w2.safetensors"
    assert main(args(workdir, "--work-dir", str(work), "--save-deltas", str(first))) == 0
    # 2 requests: the first alone (what it holds sizes the batches), then the other
    assert len(list(work.glob("values-*.pt"))) == 2 and len(list(work.glob("plan-*.json"))) == 1
    capsys.readouterr()
    assert main(args(workdir, "--work-dir", str(work), "--save-deltas", str(second))) == 0
    assert "resumed: 2 batch(es) of values loaded" in capsys.readouterr().err
    assert first.read_bytes() == second.read_bytes()
