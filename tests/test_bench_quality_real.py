"""bench/quality_real.py's summary: models measured by parallel processes (one ``--models`` each) all stay in
``quality.json``, whichever process writes last."""
import json

from tests.conftest import load_bench_script


def _summary(model: str, es_after: float) -> dict:
    row = {"dataset": "counterfact", "edits": 100, "pre": {"ES": 20.0, "PS": 20.0, "NS": 70.0, "Score": 30.0},
           "post": {"ES": es_after, "PS": 90.0, "NS": 65.0, "Score": 80.0}, "goals": []}
    return {"command": f"python bench/quality_real.py --models {model}", "method": "memit",
            "machine": {"threads": 1}, "models": {model: {"command": f"--models {model}", "runs": [row]}}}


def test_parallel_runs_keep_each_others_models(tmp_path):
    quality = load_bench_script("quality_real")
    # both processes started before either wrote: each summary holds only its own model
    first, second = _summary("smollm2-135m", 100.0), _summary("gemma3-270m", 99.0)
    quality.save_summary(first, ["smollm2-135m"], tmp_path, final=False)
    quality.save_summary(second, ["gemma3-270m"], tmp_path, final=False)
    updated = _summary("smollm2-135m", 98.0)  # the first process finishes a later dataset and writes again
    quality.save_summary(updated, ["smollm2-135m"], tmp_path, final=True)

    written = json.loads((tmp_path / "quality.json").read_text())
    assert list(written["models"]) == ["smollm2-135m", "gemma3-270m"]  # rows keep their place
    assert written["models"]["smollm2-135m"]["runs"][0]["post"]["ES"] == 98.0
    assert written["models"]["gemma3-270m"]["runs"][0]["post"]["ES"] == 99.0
    table = (tmp_path / "quality.md").read_text()
    assert "| gemma3-270m | counterfact | 100 |" in table and "| smollm2-135m | counterfact | 100 |" in table
    assert (tmp_path / "quality.png").read_bytes()[:4] == b"\x89PNG"


def test_another_methods_summary_is_not_merged(tmp_path):
    quality = load_bench_script("quality_real")
    quality.save_summary(_summary("smollm2-135m", 100.0), ["smollm2-135m"], tmp_path, final=False)
    other = _summary("gemma3-270m", 99.0)
    other["method"] = "emmet"
    quality.save_summary(other, ["gemma3-270m"], tmp_path, final=False)
    assert list(json.loads((tmp_path / "quality.json").read_text())["models"]) == ["gemma3-270m"]


def test_a_reloaded_row_keeps_the_load_and_machine_it_was_measured_under(tmp_path):
    quality = load_bench_script("quality_real")
    measured = _summary("smollm2-135m", 100.0)
    old_row = measured["models"]["smollm2-135m"]["runs"][0]
    old_row.update(timings={"edit": 843.0}, load_average_at_start=[1.9, 2.1, 2.0], machine={"platform": "first"})
    measured["models"]["smollm2-135m"].update(fingerprint="sha256:abc", seconds={"counterfact": 4483.8})
    quality.save_summary(measured, ["smollm2-135m"], tmp_path, final=False)

    before = quality.previous_entry(tmp_path, "memit", "smollm2-135m", "sha256:abc")
    assert before["seconds"] == {"counterfact": 4483.8}
    assert quality.previous_entry(tmp_path, "memit", "smollm2-135m", "sha256:other") == {}  # other weights
    assert quality.previous_entry(tmp_path, "emmet", "smollm2-135m", "sha256:abc") == {}     # other method

    now = {**old_row, "load_average_at_start": [0.5, 0.5, 0.5], "machine": {"platform": "second"}}
    kept = quality.keep_provenance(now, before)  # same timings: reloaded from the finished phases
    assert kept["load_average_at_start"] == [1.9, 2.1, 2.0] and kept["machine"] == {"platform": "first"}
    assert kept["reloaded"] is True
    remeasured = {**now, "timings": {"edit": 850.0}}
    assert quality.keep_provenance(remeasured, before) == remeasured
