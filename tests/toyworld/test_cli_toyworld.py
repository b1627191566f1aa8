import json

import pytest

import kedit_core
from kedit_core.cli.main import main
from kedit_core.toyworld import checkpoint_metadata, fact_recall, load_world, make_records, statistics_corpus


def test_records_command_writes_loadable_records(tmp_path, capsys):
    out = tmp_path / "edits.json"
    assert main(["toyworld", "records", "--out", str(out), "-n", "25", "--seed", "3"]) == 0
    requests = kedit_core.load_requests(out)
    assert len(requests) == 25
    assert json.loads(out.read_text()) == make_records(load_world(), 25, seed=3)


def test_corpus_command_writes_text_and_jsonl(tmp_path):
    docs = statistics_corpus(load_world())
    txt, jsonl = tmp_path / "c.txt", tmp_path / "c.jsonl"
    assert main(["toyworld", "corpus", "--out", str(txt)]) == 0
    assert main(["toyworld", "corpus", "--out", str(jsonl)]) == 0
    assert txt.read_text().split("\n\n") == [d for d in docs[:-1]] + [docs[-1] + "\n"]
    assert [json.loads(line)["text"] for line in jsonl.read_text().splitlines()] == docs


def test_info_reports_the_world_and_checkpoint(capsys):
    assert main(["toyworld", "info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["world"]["facts"] == len(load_world().facts)
    assert info["recorded_recall"]["worst_template"]["recall"] >= 0.98


def test_train_rejects_unknown_settings(capsys):
    assert main(["toyworld", "train", "--out", "/nonexistent/x", "--set", "learning_rate=1"]) == 2
    assert "unknown key" in capsys.readouterr().err


@pytest.mark.slow
def test_retraining_gives_a_model_that_knows_every_fact_under_every_template(tmp_path, capsys):
    # The committed checkpoint is this command's output; retraining must reproduce its quality
    # (not its exact weights: float sums depend on the thread count).
    out = tmp_path / "toy"
    assert main(["toyworld", "train", "--out", str(out), "--quiet"]) == 0
    meta = checkpoint_metadata(out)
    assert meta["world_sha256"] == load_world().sha256
    assert meta["recall"]["worst_template"]["recall"] >= 0.98
    model = kedit_core.load_model(str(out), device="cpu")
    assert fact_recall(model, load_world(out)).worst[2] >= 0.98
