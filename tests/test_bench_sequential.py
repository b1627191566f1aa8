"""bench/sequential.py end to end on a tiny model: one editor, two batches of two edits; JSON/CSV/PNG
written with one row per editor and batch, the sessions left on disk, and a second run reuses every
measurement (nothing recomputed)."""
import csv
import json
import subprocess
import sys

import pytest

from kedit_core.testing import save_tiny_model

from .conftest import DATA, REPO, load_bench_script

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
        # four distinct subjects: every edit still stands
        assert row["superseded"] == 0 and row["edited_standing"] == pytest.approx(row["edited"], abs=1e-3)
        assert row["edited_superseded"] is None
    assert len(result["base"]["edited_by_batch"]) == 3 and result["base"]["perplexity"] > 1
    rows = list(csv.DictReader((out / "sequential.csv").open()))
    assert {r["editor"] for r in rows} == {"unedited", "alphaedit"}
    assert {"overwritten", "standing_ES", "overwritten_ES"} <= set(rows[0])
    assert "stream_metrics" not in result["base"] and len(result["base"]["standing_by_batch"]) == 3
    assert (out / "sequential.png").read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads((out / "sessions" / "alphaedit" / "session.json").read_text())["batches"]) == 2

    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "computed" not in again.stderr and "measuring the unedited model" not in again.stderr
    assert json.loads((out / "sequential.json").read_text())["rows"] == result["rows"]


def run_bench(args, tmp_path, timeout=600):
    return subprocess.run([sys.executable, str(REPO / "bench" / "sequential.py"),
                           "--data", str(DATA / "counterfact_dev.json"), "--batches", "1", "--batch-size", "2",
                           "--unedited", "1", "--corpus", str(DATA / "wikitext-2-raw" / "wiki.test.raw"),
                           "--stats-dir", str(tmp_path / "stats"), "--ppl-tokens", "600", "--threads", "1",
                           "--no-progress", *args], capture_output=True, text=True, timeout=timeout)


def test_sequential_bench_rejects_c0_that_overlaps_the_held_out_text(tmp_path):
    editors = tmp_path / "editors.json"
    editors.write_text(json.dumps(EDITORS))
    common = ["--model", str(tmp_path / "never-loaded"), "--editors", str(editors), "--out", str(tmp_path / "out")]
    missing = run_bench([*common, "--stats-tokens", "500"], tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip() == ("sequential: error: --stats-tokens needs --held-out-from "
                                      "(the first document of the held-out text)")
    overlap = run_bench([*common, "--stats-docs", "100", "--held-out-from", "50"], tmp_path)
    assert overlap.returncode == 2
    assert overlap.stderr.strip() == "sequential: error: --held-out-from 50 overlaps C0's first 100 documents"
    assert not (tmp_path / "out").exists()


def test_sequential_bench_draws_c0_from_after_the_held_out_text(tmp_path):
    """--stats-tokens: C0 comes from the documents after the held-out text (recorded in the settings),
    so the perplexity curve scores text the projector never saw."""
    model = save_tiny_model("gpt2", tmp_path / "model", num_layers=4, hidden_size=64)
    editors = tmp_path / "editors.json"
    editors.write_text(json.dumps(EDITORS))
    out = tmp_path / "out"
    done = run_bench(["--model", str(model), "--editors", str(editors), "--out", str(out),
                      "--stats-tokens", "800", "--held-out-from", "30"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    settings = json.loads((out / "sequential.json").read_text())["settings"]
    assert settings["held_out"]["documents_from"] == 30
    stats = settings["stats"]
    assert stats["tokens"] == 800 and "docs" not in stats
    from transformers import AutoTokenizer

    from kedit_core.evaluation import documents_covering
    from kedit_core.stats import open_corpus

    documents = list(open_corpus(str(DATA / "wikitext-2-raw" / "wiki.test.raw")).documents())
    covered = documents_covering(AutoTokenizer.from_pretrained(model), documents[30:], 600)
    assert covered > 2 and stats["documents_from"] == 30 + covered


def test_overwritten_edits_are_scored_apart_from_standing_ones():
    """zsRE dev edits one subject several times: an earlier edit that a later one of the same subject
    overwrote is aggregated apart, and measurements without per-record metrics give no split."""
    from types import SimpleNamespace

    from kedit_core import EditRequest

    sequential = load_bench_script("sequential")
    stream = [SimpleNamespace(request=EditRequest(prompt, subject, target)) for prompt, subject, target in [
        ("Which company built {}?", "USS Leedstown", "Boeing"), ("Who was {} born to?", "Ada", "Zeus"),
        ("Who made {}?", "USS Leedstown", "Airbus"), ("Where is {}?", "Rome", "Spain")]]
    metrics = [{"efficacy": 0.0, "paraphrase": 10.0, "specificity": 50.0},
               {"efficacy": 100.0, "paraphrase": 80.0, "specificity": 40.0},
               {"efficacy": 90.0, "paraphrase": 70.0, "specificity": 30.0},
               {"efficacy": 80.0, "paraphrase": 60.0, "specificity": 20.0}]
    split = sequential.split_by_standing(metrics, stream, "zsre")
    assert split["superseded"] == 1
    assert split["edited_superseded"]["efficacy"] == 0.0 and split["edited_superseded"]["num_records"] == 1
    assert split["edited_standing"]["efficacy"] == 90.0 and split["edited_standing"]["num_records"] == 3
    assert split["edited_standing"]["specificity"] == 30.0
    # the first two edits alone: nothing overwritten yet
    first_two = sequential.split_by_standing(metrics[:2], stream[:2], "zsre")
    assert first_two["superseded"] == 0 and first_two["edited_superseded"] is None
    assert first_two["edited_standing"]["efficacy"] == 50.0
    assert sequential.split_by_standing(None, stream, "zsre") == {"superseded": 1, "edited_standing": None,
                                                                   "edited_superseded": None}


def test_a_stream_of_another_shape_is_refused_on_the_same_out(tmp_path):
    out = tmp_path / "out"
    (out / "partial").mkdir(parents=True)
    (out / "partial" / "stream.json").write_text(json.dumps(
        {"data": str(DATA / "counterfact_dev.json"), "batches": 3, "batch_size": 2, "unedited": 1}))
    editors = tmp_path / "editors.json"
    editors.write_text(json.dumps(EDITORS))
    before = sorted(p.name for p in (out / "partial").iterdir())
    other = run_bench(["--model", str(tmp_path / "never-loaded"), "--editors", str(editors), "--out", str(out),
                       "--stats-docs", "100"], tmp_path)
    assert other.returncode == 2
    assert other.stderr.strip() == (f"sequential: error: {out} holds measurements of another stream "
                                    "(batches 3 -> 1); use another --out")
    assert sorted(p.name for p in (out / "partial").iterdir()) == before


def test_every_editor_line_gets_its_own_colour():
    """Two variants of one method (``memit`` and ``memit-v15``) and a label the table does not know once
    fell back to matplotlib's cycle and drew two editors in one orange."""
    bench = load_bench_script("sequential")
    colors = bench.editor_colors({"alphaedit-t1e-2": "alphaedit", "memit-v15": "memit", "ft-l": "ft-l",
                                  "emmet": "emmet", "memit": "memit", "rome": "rome"})
    assert len(set(colors.values())) == 6
    assert colors["memit-v15"] == bench.COLORS["memit"] and colors["emmet"] == bench.COLORS["emmet"]
    assert colors["memit"] != colors["memit-v15"]
