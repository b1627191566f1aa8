"""Each fine-tuning editor raises its targets' probabilities on the toy world (the trained toy model,
whatever its size), leaves the model as it was, and the report script runs end to end on a tiny
configuration."""
import csv
import json

import pytest
import torch

import kedit_core as kedit
from kedit_core import EditContext, toyworld
from kedit_core.requests import requests_from_records

from ..conftest import load_bench_script
from .helpers import assert_bit_identical, snapshot, target_nll


# Settings that learn 4 toy facts in a handful of Adam steps (the published 25 steps at lr 5e-4 are
# meant for GPT-2 XL; the report records its own choice the same way).
TOY_SETTINGS = {
    "ft": dict(lr=5e-3, num_steps=8),
    "ft-l": dict(lr=5e-3, num_steps=8, norm_constraint=3e-2),
    "ft-mix": dict(lr=5e-3, num_steps=8, mix_ratio=1.0),
    "f-learning lora→full": dict(forget_method="lora", learn_method="full", forget_num_steps=2, learn_num_steps=8,
                                 learn_lr=2e-3),
    "f-learning full→full": dict(forget_method="full", learn_method="full", forget_num_steps=2, learn_num_steps=8,
                                 learn_lr=2e-3),
    "f-learning lora→lora": dict(forget_method="lora", learn_method="lora", forget_num_steps=2, learn_num_steps=8,
                                 learn_lr=1e-2),
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy_requests(world):
    return requests_from_records(toyworld.make_records(world, 4, seed=0), "counterfact", source="toy world")


@pytest.mark.parametrize("label", list(TOY_SETTINGS))
def test_each_editor_raises_its_targets_probabilities_on_the_toy_world(toy, world, toy_requests, label):
    method = label.split()[0]
    options = {}
    if method == "ft-mix":
        edited = {r.subject for r in toy_requests}
        kept = [f for f in world.facts if f.subject not in edited][:16]
        options["unmodified_facts"] = [(world.prompt(f), " " + f.object) for f in kept]
    before = snapshot(toy.model)
    nll_before = target_nll(toy, toy_requests)
    result = kedit.compute_edit(toy, toy_requests, method, context=EditContext(seed=0, progress=False, options=options),
                                **TOY_SETTINGS[label])
    assert_bit_identical(toy.model, before)
    with result.deltas.apply(toy.model):
        nll_after = target_nll(toy, toy_requests)
    assert_bit_identical(toy.model, before)
    # The toy model knows the old facts, so each new target starts very unlikely (NLL of several nats).
    for i, (b, a) in enumerate(zip(nll_before, nll_after)):
        assert b > 2.0, f"request {i}: the unedited toy model already gives its new target (NLL {b:.3f})"
        assert a < b - 1.0, f"{label}, request {i}: target NLL {b:.3f} -> {a:.3f} (probability did not rise)"
    if method == "ft-l":
        assert result.deltas.extra["max_abs_change"] <= TOY_SETTINGS[label]["norm_constraint"]


def test_the_report_script_runs_on_a_tiny_configuration(tmp_path):
    report = load_bench_script("report_finetune")
    out = tmp_path / "report"
    results = report.main(["--out", str(out), "--seeds", "0,1", "--no-defaults", "--num-modified", "4",
                           "--num-unmodified", "24", "--mix-pool", "8", "--layers", "0,1", "--deltas", "0.01,0.1",
                           "--steps", "2", "--forget-methods", "lora", "--fl-set", "forget_num_steps=1",
                           "--fl-set", "learn_num_steps=2", "--fl-set", "layers=[0]", "--threads", "1"])
    for name in ("finetune_report.json", "finetune_report.csv", "finetune_report.md", "methods.png",
                 "delta_sweep.png", "layer_sweep.png"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "finetune_report.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    runs = [r["run"] for r in rows]
    assert runs == [
        "unedited", "ft-l δ=0.01", "ft-l δ=0.1", "ft", f"ft-l (δ={results['delta_choice']['delta']:g})", "ft-mix",
        "ft (F-Learning's params)", "f-learning lora→full", "ft L0", "ft-l L0", "ft L1", "ft-l L1",
        "unedited [seed 1]", "ft [seed 1]", f"ft-l (δ={results['delta_choice']['delta']:g}) [seed 1]",
        "ft-mix [seed 1]", "ft (F-Learning's params) [seed 1]", "f-learning lora→full [seed 1]"]
    by_run = {r["run"]: r for r in rows}
    assert float(by_run["unedited"]["A_old"]) > 90 and float(by_run["unedited"]["A_M"]) < 10
    assert by_run["f-learning lora→full"]["stage1_A_old"] != ""  # the stage-1 model was measured
    assert results["delta_choice"]["delta"] in (0.01, 0.1)
    data = json.loads((out / "finetune_report.json").read_text(encoding="utf-8"))
    measured = [r for r in data["runs"] if r["method"] and "same_as" not in r]
    assert all(r["hparams"] and r["timings"]["edit_seconds"] > 0 for r in measured)  # resolved settings, timings
    assert data["seeds"]["seeds"] == [0, 1] and data["total_seconds"] > 0
    assert {e["run"] for e in data["summary_over_seeds"]} >= {"ft", "ft-mix", "f-learning lora→full"}
    assert "Across seeds" in (out / "finetune_report.md").read_text(encoding="utf-8")
