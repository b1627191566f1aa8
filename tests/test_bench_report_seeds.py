"""The seeds report's findings (``bench/report_seeds.py``), checked on the committed SmolLM2 report's own
results without a model: the committed verdicts follow from its rows, each rule flips when the numbers it
compares flip, and the measured reason names what the forget step actually did."""
import copy
import json

import pytest

from .conftest import REPO, load_bench_script

REPORT = REPO / "bench" / "results" / "seeds" / "smollm2-135m-full" / "seeds_report.json"


@pytest.fixture(scope="module")
def report():
    return load_bench_script("report_seeds")


@pytest.fixture(scope="module")
def committed():
    return json.loads(REPORT.read_text(encoding="utf-8"))


def _finding(items, claim_start):
    hits = [f for f in items if f["claim"].startswith(claim_start)]
    assert hits, claim_start
    return hits


def _row(results, part, run_id, **tags):
    return next(r for r in results[part]["rows"] if r["run_id"] == run_id
                and all(r["tags"].get(k) == v for k, v in tags.items()))


def test_committed_verdicts_follow_from_the_committed_rows(report, committed):
    again = report.findings("smollm2-135m", committed["results"])
    assert [(f["claim"], f["verdict"], f["numbers"], f["reason"]) for f in again] == \
           [(f["claim"], f["verdict"], f["numbers"], f["reason"]) for f in committed["findings"]]
    # Every finding that does not reproduce says why; one that reproduces needs no reason.
    for f in again:
        assert bool(f["reason"]) == (f["verdict"] == "does not reproduce"), f["claim"]


def test_the_constraint_finding_flips_with_the_numbers(report, committed):
    results = copy.deepcopy(committed["results"])
    claim = "The ℓ∞ constraint keeps much more"
    assert _finding(report.findings("m", results), claim)[0]["verdict"] == "reproduces"
    zhu = results["zhu"]
    small, layer = zhu["sizes"][0], zhu["delta_choice"]["layer"]
    ft = _row(results, "zhu", "zhu-ft", size=small, group="methods")
    ftl = next(r for r in zhu["rows"] if r["label"] == f"FT-L L{layer}" and r["tags"]["size"] == small)
    ftl["metrics"]["A_F_minus_S"] = ft["metrics"]["A_F_minus_S"] - 1
    assert _finding(report.findings("m", results), claim)[0]["verdict"] == "does not reproduce"


def test_forget_reason_names_what_the_forget_step_did(report, committed):
    results = copy.deepcopy(committed["results"])
    claim = "LoRA-forget then full-learn updates knowledge better than full FT"
    by_dataset = {f["claim"].rsplit("(", 1)[1].rstrip(")"): f for f in _finding(report.findings("m", results), claim)}
    # CounterFact: LoRA forgetting left the old facts almost where stage 0 put them.
    assert "left the old facts at 87.5% (93.8% after stage 0)" in by_dataset["counterfact"]["reason"]
    # zsRE: it removed them, and unrelated facts with them.
    assert "to 31.2%, but unrelated facts with them" in by_dataset["zsre"]["reason"]

    row = _row(results, "flearning", "fl-lora-full", dataset="counterfact")
    row["stage1"]["A_old"] = 20.0
    cf = next(f for f in _finding(report.findings("m", results), claim) if "counterfact" in f["claim"])
    assert "to 20.0%, but unrelated facts with them" in cf["reason"]

    # When F-Learning wins on two metrics without losing any, it reproduces and no reason is given.
    ft = _row(results, "flearning", "fl-ft", dataset="counterfact")
    for key in ("generality", "locality"):
        row["metrics"][key] = ft["metrics"][key] + 5
    cf = next(f for f in _finding(report.findings("m", results), claim) if "counterfact" in f["claim"])
    assert cf["verdict"] == "reproduces" and cf["reason"] is None


def test_timing_reason_only_when_the_order_is_reversed(report, committed):
    results = copy.deepcopy(committed["results"])
    claim = "F-Learning is slower than FT"
    cf = next(f for f in _finding(report.findings("m", results), claim) if "counterfact" in f["claim"])
    assert cf["verdict"] == "does not reproduce" and "per optimizer step" in cf["reason"]
    fl = _row(results, "flearning", "fl-lora-full", dataset="counterfact")
    fl["seconds"]["edit"] = _row(results, "flearning", "fl-ft", dataset="counterfact")["seconds"]["edit"] + 10
    cf = next(f for f in _finding(report.findings("m", results), claim) if "counterfact" in f["claim"])
    assert cf["verdict"] == "reproduces" and cf["reason"] is None
