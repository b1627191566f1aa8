"""bench/sequential.py end to end on a tiny model: one editor, two batches of two edits; JSON/CSV/PNG
written with one row per editor and batch, the sessions left on disk, and a second run reuses every
measurement (nothing recomputed)."""
import csv
import json
import subprocess
import sys

from kedit_core.testing import save_tiny_model

from .conftest import DATA, REPO

EDITORS = [{"label": "alphaedit", "method": "alphaedit",
            "overrides": {"layers": [1, 2], "nullspace_threshold": 1e-3, "L2": 1e-3, "clamp_norm_factor": 4.0,
                          "v_weight_decay": 1e-3}}]


def test_sequential_bench_writes_curves_and_resumes(tmp_path):
    model = save_tiny_model("gpt2", tmp_path / "model", num_layers=4, hidden_size=64)
    editors = tmp_path / "editors.json"
    editors.write_text(json.dumps(EDITORS))
    out = tmp_path / "out"
    command = [sys.executable, str(REPO / "bench" / "sequential.py"), "--model", str(model),
               "--data", str(DATA / "counterfact_dev.json"), "--batches", "2", "--batch-size", "2", "--unedited", "2",
               "--editors", str(editors), "--corpus", str(DATA / "wikitext-2-raw" / "wiki.test.raw"),
               "--stats-docs", "100", "--stats-dir", str(tmp_path / "stats"), "--ppl-tokens", "600",
               "--out", str(out), "--threads", "1", "--no-progress"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads((out / "sequential.json").read_text())
    assert [(r["editor"], r["edits"]) for r in result["rows"]] == [("alphaedit", 2), ("alphaedit", 4)]
    for row in result["rows"]:
        assert set(row["edited"]) >= {"ES", "PS", "NS"} and row["unedited"]["num_records"] == 2
        assert row["perplexity"] > 1 and row["norm_ratio_max"] > 0
    assert len(result["base"]["edited_by_batch"]) == 3 and result["base"]["perplexity"] > 1
    rows = list(csv.DictReader((out / "sequential.csv").open()))
    assert {r["editor"] for r in rows} == {"unedited", "alphaedit"}
    assert (out / "sequential.png").read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads((out / "sessions" / "alphaedit" / "session.json").read_text())["batches"]) == 2

    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "computed" not in again.stderr and "measuring the unedited model" not in again.stderr
    assert json.loads((out / "sequential.json").read_text())["rows"] == result["rows"]
