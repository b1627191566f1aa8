"""Behavioural tests: do the editors actually change what the toy model knows, and nothing else?

These are the tests that tell us an editor works, so they hold it to bars it can miss (and
``test_a_broken_solver_fails_the_bars`` shows they do miss them when the update is zeroed). Every
outcome is written to ``$KEDIT_BEHAVIOUR_OUT`` (when set) so the measured numbers can be read."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import kedit_core
from kedit_core.toyworld.editing import EditBars, edit_and_measure, toy_statistics

MEMIT_BARS = EditBars(es=95, ps=80, ns=80)
ROME_BARS = EditBars(es=90, ns=80)
SCALING_BARS = EditBars(es=90)


@pytest.fixture(scope="module")
def stats(world, tmp_path_factory):
    return toy_statistics(world, tmp_path_factory.mktemp("toy-stats"))


def record(outcome: dict, name: str) -> dict:
    out = os.environ.get("KEDIT_BEHAVIOUR_OUT")
    if out:
        path = Path(out) / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(outcome, indent=1, default=str))
    return outcome


# Measured on the committed toy model (4 layers, 3 facts per subject; layers 0-1, lambda 100, see
# plugins/memit/hparams/kedit-toy.json): ES 98.5, PS 86.9, NS 85.4. What the toy cannot show is locality at
# this scale: the recall of the 3,400 untouched facts falls 99.6 -> 39.2, because the toy subjects' keys
# span too few directions for 200 edits (bench/results/README.md, toy_keys/, toy_sweep_cpu/). Locality is
# judged on the real models (README: "Editing quality on real models").
def test_memit_200_edits(toy, world, stats):
    outcome = record(edit_and_measure(toy, world, "memit", 200, stats=stats), "memit_200")
    assert outcome["pre"]["ES"] <= 5 and outcome["recall"]["before"] >= 98   # the model knew the old facts
    assert MEMIT_BARS.failures(outcome) == []


def test_a_single_memit_edit_is_clean(toy, world, stats):
    """One edit rewrites its fact and leaves the rest of what the model knows in place."""
    outcome = record(edit_and_measure(toy, world, "memit", 1, stats=stats), "memit_1")
    assert outcome["post"]["ES"] == 100 and outcome["post"]["NS"] >= 90
    assert outcome["recall"]["drop"] <= 1.0, outcome["recall"]


# Measured on the committed toy model (layer 0): ES 100, PS 92.5, NS 96.0 (the bars: ES >= 90, NS >= 80);
# the recall of untouched facts falls 99.6 -> 88.1 (not barred for ROME).
def test_rome_10_sequential_edits(toy, world, stats):
    outcome = record(edit_and_measure(toy, world, "rome", 10, stats=stats), "rome_10")
    assert ROME_BARS.failures(outcome) == []


# Measured on the committed toy model (2m48s on 2 cores): 10 edits ES 100, NS 98.0 (recall of untouched
# facts 99.6 -> 95.7); 100 edits ES 99.0, NS 92.0 (-> 60.0); 1000 edits ES 58.2, PS 50.0, NS 79.4 (-> 20.6):
# beyond ~200 edits the toy's 512-unit MLPs run out of key directions (a copy widened to 4,096 units reaches
# ES 99.1 at 1000: bench/toy_widen.py), so 1000 edits are recorded, not barred.
@pytest.mark.slow   # 1,110 edits and their evaluation: several minutes on 2 cores
def test_memit_scaling(toy, world, stats):
    outcomes = [record(edit_and_measure(toy, world, "memit", n, stats=stats), f"memit_scaling_{n}")
                for n in (10, 100, 1000)]
    for outcome in outcomes[:2]:
        assert SCALING_BARS.failures(outcome) == [], outcome["num_edits"]
    assert outcomes[2]["post"]["ES"] > outcomes[2]["pre"]["ES"] + 40   # still mostly written at 1000
    ns = [o["post"]["NS"] for o in outcomes]
    assert all(0 <= v <= 100 for v in ns)


def test_a_broken_solver_fails_the_bars(toy, world, stats, monkeypatch):
    # Zero the weight update MEMIT's solver returns: the same harness and bars must then fail.
    import kedit_plugins.memit as memit_plugin

    real_solve = memit_plugin.memit_solve
    monkeypatch.setattr(memit_plugin, "memit_solve", lambda *a, **k: real_solve(*a, **k) * 0)
    outcome = edit_and_measure(toy, world, "memit", 20, stats=stats)
    missed = MEMIT_BARS.failures(outcome)
    assert any(m.startswith("ES") for m in missed), outcome["post"]
    # The untouched facts split into the edited subjects' other facts and the other subjects' facts;
    # a zero update moves neither.
    recall = outcome["recall"]
    groups = [recall["edited_subjects_other_facts"], recall["unedited_subjects"]]
    assert sum(g["num_facts"] for g in groups) == recall["num_facts"]
    assert groups[0]["num_facts"] > 0 and all(g["drop"] == 0 for g in groups)


def test_any_plugin_editor_runs_through_the_same_harness(toy, world):
    # An editor registered through a plugin (here the hook, as an installed package would) is run by
    # name; this one raises the new target's logit through the unembedding only.
    from dataclasses import dataclass

    import torch

    from kedit_core import Deltas, EditResult, Editor, HyperParams
    from kedit_core.plugins import registered_plugin

    @dataclass(frozen=True)
    class BoostHParams(HyperParams):
        strength: float = 30.0

    class TargetBoost(Editor):
        name = "test-target-boost"
        summary = "adds the final hidden state to the target's unembedding row"
        HParams = BoostHParams

        def compute(self, model, requests, context):
            weight = model.adapter.unembedding.weight
            delta = torch.zeros_like(weight)
            for req in requests:
                ids = model.tokenizer(req.filled_prompt, return_tensors="pt")
                with torch.no_grad():
                    h = model.model(**ids, output_hidden_states=True).hidden_states[-1][0, -1]
                target = model.tokenizer(req.target_new, add_special_tokens=False)["input_ids"][0]
                delta[target] += self.hparams.strength * h / h.dot(h)
            return EditResult(Deltas({model.adapter.unembedding_name + ".weight": delta}))

    class Plugin:
        @kedit_core.hookimpl
        def register_editors(self, register):
            register(TargetBoost)

    before = toy.fingerprint()
    with registered_plugin(Plugin(), name="behaviour-test-plugin"):
        outcome = edit_and_measure(toy, world, "test-target-boost", 20)
    assert outcome["method"] == "test-target-boost" and outcome["hparams"] == {"strength": 30.0}
    assert outcome["post"]["ES"] > outcome["pre"]["ES"] + 50
    assert toy.fingerprint() == before
