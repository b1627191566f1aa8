"""Causal tracing: the batched engine against ROME's per-cell loop, the limiting cases (restore all ->
clean, restore nothing -> corrupted), a planted association peaking at its layer, fact files, noise,
resumable runs and the ``kedit trace`` command."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from kedit_core.causal_trace import (KINDS, FactTracer, Restore, TracedFact, TraceSettings, average_effects,
                                     fact_noise, heatmap_cells, load_facts, rome_forward_count, run_trace,
                                     subject_embedding_std, suggest_layers, trace_fact, window_layers)
from kedit_core.causal_trace import run as run_module
from kedit_core.editing.positions import encode_prompts
from kedit_core.errors import KeditError, RecordError
from kedit_core.testing import tiny_model
from kedit_core.tracing import TraceDict

from .conftest import DATA


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Tiny models: one intra-op thread (``one_thread`` in tests/conftest.py)."""


TEMPLATE, SUBJECT = "The mother tongue of {} is the language of", "Danielle Darrieux"


def _subject(tokenizer, template=TEMPLATE, subject=SUBJECT):
    first = encode_prompts(tokenizer, [template], [subject], fact_token="subject_first")[0]
    last = encode_prompts(tokenizer, [template], [subject], fact_token="subject_last")[0]
    return first.ids, first.index, last.index


def _tracer(model, *, samples=3, scale=0.5, max_tokens=64, template=TEMPLATE, answer=None):
    ids, first, last = _subject(model.tokenizer, template)
    noise = fact_noise(0, 0, samples, last - first + 1, model.adapter.hidden_size, scale).to(model.dtype)
    tracer = FactTracer(model, ids, (first, last), 0, noise, max_tokens=max_tokens)
    _, predicted = tracer.run_clean()
    tracer.answer_id = predicted if answer is None else answer
    tracer.run_clean()  # p_clean of the chosen answer
    tracer.run_corrupted()
    return tracer


def test_window_layers_follow_rome():
    assert list(window_layers(0, 10, 30)) == [0, 1, 2, 3, 4]
    assert list(window_layers(7, 10, 30)) == list(range(2, 12))
    assert list(window_layers(28, 10, 30)) == list(range(23, 30))
    assert list(window_layers(4, 1, 30)) == [4]
    assert list(window_layers(4, 3, 30)) == [3, 4, 5]
    cells = heatmap_cells("mlp", 4, range(2), 3)
    assert len(cells) == 8 and cells[5] == (Restore("mlp", 0, 1), Restore("mlp", 1, 1), Restore("mlp", 2, 1))
    assert rome_forward_count(10, 30) == 3 * (10 * 30 + 2)


def _model(family: str, num_layers: int = 4):
    """A tiny float64 model; ``gemma3-wide`` is Gemma 3 with a sliding window longer than the prompt (the
    keys/values of the prefix are reused; with the tiny default window of 8 they cannot be)."""
    if family != "gemma3-wide":
        return tiny_model(family, num_layers=num_layers, dtype=torch.float64)
    from transformers import AutoModelForCausalLM

    from kedit_core.models import wrap_model
    from kedit_core.testing import test_tokenizer, tiny_config

    config = tiny_config("gemma3", num_layers=num_layers)
    config.sliding_window = 64
    torch.manual_seed(0)
    return wrap_model(AutoModelForCausalLM.from_config(config).double(), test_tokenizer(add_bos=True))


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt-neox", "gptj", "qwen2", "gemma3", "gemma3-wide"])
def test_batched_engine_equals_rome_per_cell_loop(family):
    model = _model(family)
    tracer = _tracer(model, max_tokens=100_000)
    assert (tracer._corrupted_kv is None) == (family == "gemma3")  # a window shorter than the prompt
    T = tracer.num_tokens
    cells = [c for kind in KINDS for c in heatmap_cells(kind, 4, range(T), 3)]
    before = tracer.forwards
    batched = tracer.restored_probabilities(cells)
    batched_forwards = tracer.forwards - before
    reference = tracer.restored_probabilities_per_cell(cells)
    assert tracer.forwards - before - batched_forwards == len(cells)
    torch.testing.assert_close(batched, reference, rtol=0, atol=1e-12)
    # the restorations matter (the comparison is not between two constant tables)
    assert (reference - tracer.p_corrupted).abs().max() > 1e-7
    # with room for every cell: one forward per restored token from the subject on (one in all when the
    # prefix's keys and values cannot be reused)
    assert batched_forwards == (1 if family == "gemma3" else T - tracer.subject[0])


def test_pack_size_does_not_change_the_result():
    model = tiny_model("llama", num_layers=4, dtype=torch.float64)
    small, large = _tracer(model, max_tokens=1), _tracer(model, max_tokens=100_000)
    cells = [c for kind in KINDS for c in heatmap_cells(kind, 4, range(small.num_tokens), 2)]
    torch.testing.assert_close(small.restored_probabilities(cells), large.restored_probabilities(cells),
                               rtol=0, atol=1e-12)


def _minimal_block_tokens(tracer, cells) -> int:
    """(row × position) tokens summed over blocks when every cell computes from its own first block on."""
    from kedit_core.causal_trace.engine import _cell_first_block, _cell_first_token

    total = 0
    for cell in cells:
        if max(r.token for r in cell) < tracer.subject[0]:
            continue
        first = _cell_first_token(cell) if tracer._corrupted_kv is not None else 0
        total += tracer.samples * (tracer.num_tokens - first) * (tracer.num_layers - _cell_first_block(cell))
    return total


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt-neox", "gptj", "qwen2", "gemma3", "gemma3-wide"])
def test_rows_joining_at_their_first_block_equal_rome_per_cell_loop(family):
    # 6 layers; packs of about 10 cells (3 samples × ~12 positions each), spanning many first blocks, with
    # several packs per first token
    model = _model(family, num_layers=6)
    L = model.adapter.num_layers
    tracer = _tracer(model, max_tokens=400)
    cells = [c for kind in KINDS for c in heatmap_cells(kind, L, range(tracer.num_tokens), 3)]
    joined = tracer.restored_probabilities(cells)
    assert tracer.row_join_fallback is None  # every family's blocks run on a subset of rows
    torch.testing.assert_close(joined, tracer.restored_probabilities_per_cell(cells), rtol=0, atol=1e-12)
    # no block computes a row below its cell's first changed block (the packs span several first blocks:
    # computing every row from its pack's lowest first block costs more)
    assert tracer.block_tokens == _minimal_block_tokens(tracer, cells)
    tracer.row_join, tracer.block_tokens = False, 0
    torch.testing.assert_close(tracer.restored_probabilities(cells), joined, rtol=0, atol=1e-12)
    assert tracer.block_tokens > _minimal_block_tokens(tracer, cells)


def test_rows_joining_compute_less_and_allow_fewer_forwards():
    model = tiny_model("llama", num_layers=6, dtype=torch.float64)
    runs = {}
    for join in (False, True):
        for max_tokens in (100, 100_000):
            tracer = _tracer(model, max_tokens=max_tokens)
            tracer.row_join = join
            cells = [c for kind in KINDS for c in heatmap_cells(kind, 6, range(tracer.num_tokens), 3)]
            before = tracer.forwards
            probs = tracer.restored_probabilities(cells)
            runs[join, max_tokens] = (tracer.forwards - before, tracer.block_tokens, probs)
    minimal = _minimal_block_tokens(tracer, cells)
    for max_tokens in (100, 100_000):
        old, new = runs[False, max_tokens], runs[True, max_tokens]
        torch.testing.assert_close(new[2], old[2], rtol=0, atol=1e-12)
        assert new[0] == old[0]  # the same packs for the same budget ...
        assert new[1] == minimal < old[1]  # ... without the blocks computed below a cell's first block
    # the old packing pays for a larger budget in wasted blocks; joined rows do not, so the budget can grow:
    # fewer forwards than the old engine at the small budget, and fewer block computations too
    assert runs[False, 100_000][1] > 1.2 * runs[False, 100][1]
    assert runs[True, 100_000][0] == tracer.num_tokens - tracer.subject[0] < runs[False, 100][0] / 3
    assert runs[True, 100_000][1] == minimal < runs[False, 100][1]


def test_blocks_that_cannot_run_on_a_subset_of_rows_fall_back_to_the_old_packing():
    """A block mixing the batch's rows gives other values on a subset: found by the check, then every
    row of a pack computes from the pack's lowest block (the same numbers as without row joins)."""
    model = tiny_model("llama", num_layers=4, dtype=torch.float64)
    block = model.adapter.module(model.adapter.layer_name(2))
    original = block.forward

    def mixing(hidden_states, *args, **kwargs):
        return original(hidden_states, *args, **kwargs) + 1e-2 * hidden_states.mean(dim=0, keepdim=True)

    block.forward = mixing
    try:
        reference = _tracer(model, max_tokens=100_000)
        reference.row_join = False
        cells = [c for kind in KINDS for c in heatmap_cells(kind, 4, range(reference.num_tokens), 2)]
        expected = reference.restored_probabilities(cells)
        tracer = _tracer(model, max_tokens=100_000)
        with pytest.warns(RuntimeWarning, match="differs from the whole batch"):
            probs = tracer.restored_probabilities(cells)
        assert "block 2" in tracer.row_join_fallback
        torch.testing.assert_close(probs, expected, rtol=0, atol=1e-12)
        assert block.forward is mixing  # the joining wrapper is gone
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # remembered for the model: no second try
            torch.testing.assert_close(_tracer(model, max_tokens=100_000).restored_probabilities(cells), expected,
                                       rtol=0, atol=1e-12)
    finally:
        del block.forward


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_restoring_everything_gives_clean_and_nothing_gives_corrupted(family):
    model = tiny_model(family, num_layers=4, dtype=torch.float64)
    tracer = _tracer(model, scale=1.0)
    T, L = tracer.num_tokens, tracer.num_layers
    assert abs(tracer.p_clean - tracer.p_corrupted) > 1e-6  # the noise does something
    every_state = tuple(Restore("hidden", layer, t) for layer in range(L) for t in range(T))
    last_layer = tuple(Restore("hidden", L - 1, t) for t in range(T))
    first_layer = tuple(Restore("hidden", 0, t) for t in range(T))
    for method in (tracer.restored_probabilities, tracer.restored_probabilities_per_cell):
        probs = method([every_state, last_layer, first_layer, ()])
        assert probs[:3].tolist() == pytest.approx([tracer.p_clean] * 3, rel=1e-9)
        assert probs[3].item() == pytest.approx(tracer.p_corrupted, rel=1e-12)
    # a restored token before the subject changes nothing
    before_subject = heatmap_cells("hidden", L, [0], 1)
    assert tracer.restored_probabilities(before_subject).tolist() == [tracer.p_corrupted] * L


def _plant_fact(model, template: str, subject: str, target_id: int, layer: int) -> None:
    """Make MLP ``layer`` map the subject's last-token key to the target's unembedding direction (a
    rank-one association, as ROME writes one), and sharpen the output so that p(target) is near 1."""
    ids, _, last = _subject(model.tokenizer, template, subject)
    name = model.adapter.mlp_out_name(layer)
    with TraceDict(model.model, [name], retain_input=True, retain_output=False) as td:
        model.model(torch.tensor([ids]))
    key = td[name].input[0, last]
    direction = model.adapter.unembedding.weight[target_id]
    delta = torch.outer(5.0 * direction / direction.norm(), key) / key.dot(key)
    with torch.no_grad():
        model.adapter.mlp_out_weight(layer).add_(model.adapter.to_param_layout(delta))
        model.adapter.unembedding.weight.mul_(30.0)


@pytest.mark.parametrize("layer", [1, 3])
def test_planted_association_peaks_at_its_layer(layer):
    # The subject ends the prompt: a random model cannot move a fact from a mid-prompt token to the last
    # position (tests/editing/conftest.py says the same for the editors).
    template, subject = "The mother tongue of {}", SUBJECT
    model = tiny_model("llama", num_layers=5, dtype=torch.float64)
    target = model.tokenizer(" French", add_special_tokens=False)["input_ids"][0]
    _plant_fact(model, template, subject, target, layer)
    fact = TracedFact(template=template, subject=subject, target=" French", index=0)
    std = subject_embedding_std(model, [fact])
    record = trace_fact(model, fact, TraceSettings(samples=10, window=1), 3 * std)
    assert record["status"] == "traced" and record["p_clean"] > 0.99 and record["p_corrupted"] < 0.9
    summary = run_module.summarise([record], TraceSettings(samples=10, window=1, suggest_size=1),
                                   noise_scale=3 * std, measured_std=std, num_layers=5)
    mlp = np.asarray(summary["average_indirect_effect"]["subject_last"]["mlp"])
    assert int(np.argmax(mlp)) == layer
    assert mlp[layer] > 0.5 * (record["p_clean"] - record["p_corrupted"])
    assert np.delete(mlp, layer).max() < 0.5 * mlp[layer]
    assert summary["suggestion"]["layers"] == [layer] and summary["suggestion"]["peak_layer"] == layer
    # with a 3-layer window the peak window still holds the planted layer
    wide = trace_fact(model, fact, TraceSettings(samples=10, window=3), 3 * std)
    curve = np.asarray(wide["scores"]["mlp"][wide["subject_range"][1] - 1]) - wide["p_corrupted"]
    assert layer in window_layers(int(np.argmax(curve)), 3, 5)


def test_suggest_layers_and_average_effects():
    assert suggest_layers([0, 1, 5, 4, 0, 3], 2) == [2, 3]
    assert suggest_layers([0, 1, 5, 4, 0, 3], 10) == [0, 1, 2, 3, 4, 5]
    assert suggest_layers([1, 1, 1], 2) == [0, 1]
    records = [{"status": "traced", "subject_range": [0, 2], "tokens": ["a", "b", "c"], "p_corrupted": 0.1,
                "scores": {"mlp": [[0, 0], [0.3, 0.5], [0.1, 0.2]]}},
               {"status": "traced", "subject_range": [1, 2], "tokens": ["a", "b", "c"], "p_corrupted": 0.2,
                "scores": {"mlp": [[0, 0], [0.2, 0.6], [0.4, 0.2]]}},
               {"status": "not_predicted"}]
    effects = average_effects(records, ["mlp"])
    assert effects["subject_last"]["mlp"] == pytest.approx([0.1, 0.4])
    assert effects["last"]["mlp"] == pytest.approx([0.1, 0.05])


def test_noise_is_seeded_per_fact():
    a = fact_noise(0, 7, 4, 2, 8, 1.0)
    assert torch.equal(a, fact_noise(0, 7, 4, 2, 8, 1.0))
    assert not torch.equal(a, fact_noise(0, 8, 4, 2, 8, 1.0)) and not torch.equal(a, fact_noise(1, 7, 4, 2, 8, 1.0))
    torch.testing.assert_close(fact_noise(0, 7, 4, 2, 8, 3.0), 3 * a)


def test_subject_embedding_std_is_measured_at_the_subject_tokens():
    model = tiny_model("llama", num_layers=2)
    facts = [TracedFact("{} is in", "Paris", " France", 0), TracedFact("The home of {} is", "Ulm", " Germany", 1)]
    ids = []
    for fact in facts:
        tokens, first, last = _subject(model.tokenizer, fact.template, fact.subject)
        ids += tokens[first:last + 1]
    expected = model.adapter.embedding.weight[ids].double().std().item()
    assert subject_embedding_std(model, facts) == pytest.approx(expected)


# -- fact files -----------------------------------------------------------------------------------

def test_load_facts_reads_known_1000_counterfact_and_plain(tmp_path):
    known = load_facts(DATA / "known_1000.json")
    assert len(known) == 1209
    assert known[0] == TracedFact("{} is located in the continent of", "Vinson Massif", " Antarctica", 0,
                                  fact_id=0, relation_id="P30")
    assert known[0].prompt == "Vinson Massif is located in the continent of"
    cf = load_facts(DATA / "counterfact_dev.json")
    raw = json.loads((DATA / "counterfact_dev.json").read_text())[0]["requested_rewrite"]
    assert cf[0].target == " " + raw["target_true"]["str"] and cf[0].subject == raw["subject"]
    plain = tmp_path / "plain.jsonl"
    plain.write_text('{"prompt": "{} plays", "subject": "LeBron James", "target_new": "football"}\n'
                     '{"prompt": "{} plays", "subject": "Messi", "target_new": "golf", "target_true": "soccer"}\n')
    assert [f.target for f in load_facts(plain)] == [" football", " soccer"]


@pytest.mark.parametrize("record, field", [
    ({"subject": "Paris", "attribute": "France", "prompt": "Berlin is in"}, "prompt"),
    ({"subject": "Paris", "attribute": "", "prompt": "Paris is in"}, "attribute"),
    ({"requested_rewrite": {"prompt": "{} is", "subject": "X", "target_new": {"str": "a"}}, "case_id": 3},
     "requested_rewrite.target_new"),
])
def test_bad_fact_records_name_file_record_and_field(tmp_path, record, field):
    good = {"subject": "Paris", "attribute": "France", "prompt": "Paris is in"}
    path = tmp_path / "facts.json"
    path.write_text(json.dumps([good, record]))
    if field == "requested_rewrite.target_new":
        record["requested_rewrite"]["target_new"]["str"] = ""
        path.write_text(json.dumps([good, record]))
    with pytest.raises(RecordError) as err:
        load_facts(path)
    assert str(path) in str(err.value) and "record 1" in str(err.value) and f"field '{field}'" in str(err.value)


# -- runs ------------------------------------------------------------------------------------------

TOY_SETTINGS = TraceSettings(samples=3, window=2, suggest_size=2)


@pytest.fixture(scope="module")
def toy_facts(tmp_path_factory):
    """Toy-world facts (CounterFact records) with one the toy model cannot predict (its target swapped)."""
    from kedit_core import toyworld

    records = toyworld.make_records(toyworld.load_world(), 4)
    rr = records[1]["requested_rewrite"]
    rr["target_true"] = rr["target_new"]
    path = tmp_path_factory.mktemp("facts") / "toy.json"
    toyworld.write_records(records, path)
    return path


class _Killed(Exception):
    """Stands for the process dying in the middle of a fact."""


def test_run_trace_skips_unpredicted_facts_and_resumes(toy, toy_facts, tmp_path, monkeypatch):
    facts = load_facts(toy_facts)
    full = run_trace(toy, facts, TOY_SETTINGS, tmp_path / "full", progress=False)
    assert full["counts"]["traced"] == 3 and full["counts"]["not_predicted"] == 1
    assert full["counts"]["not_predicted_ids"] == [facts[1].fact_id]
    assert len(full["suggestion"]["layers"]) == 2 and full["forward_passes"]["rome_over_ours"] > 1
    for name in ("trace.json", "average_effects.png", "heatmaps/00000.png", "facts/00001.json"):
        assert (tmp_path / "full" / name).exists(), name

    # interrupted after the first fact, then resumed: the finished fact is not traced again
    calls, kill_at = [], {1}
    real = run_module.trace_fact

    def interrupted(model, fact, *args, **kwargs):
        calls.append(fact.index)
        if fact.index in kill_at:
            raise _Killed
        return real(model, fact, *args, **kwargs)

    monkeypatch.setattr(run_module, "trace_fact", interrupted)
    with pytest.raises(_Killed):
        run_trace(toy, facts, TOY_SETTINGS, tmp_path / "resumed", progress=False, noise_facts=facts)
    assert sorted(p.name for p in (tmp_path / "resumed" / "facts").iterdir()) == ["00000.json"]
    calls.clear()
    kill_at.clear()
    resumed = run_trace(toy, facts, TOY_SETTINGS, tmp_path / "resumed", progress=False)
    assert calls == [1, 2, 3]
    assert resumed["average_indirect_effect"] == full["average_indirect_effect"]
    assert resumed["suggestion"] == full["suggestion"]

    # --n: the first N predicted facts, skipping the unpredicted one
    limited = run_trace(toy, facts, TOY_SETTINGS, None, limit=2, progress=False)
    assert limited["counts"]["traced"] == 2 and limited["counts"]["facts_examined"] == 3

    with pytest.raises(KeditError, match="other settings"):
        run_trace(toy, facts, TraceSettings(samples=4, window=2), tmp_path / "full", progress=False)


def test_settings_are_validated():
    for bad in (dict(samples=0), dict(noise=-1.0), dict(window=0), dict(kinds=("mlp", "nope")),
                dict(mode="fast"), dict(suggest_size=0)):
        with pytest.raises(KeditError):
            TraceSettings(**bad).validate()


def test_kedit_trace_command(toy_facts, tmp_path, capsys):
    from kedit_core.cli.main import main

    out = tmp_path / "out"
    code = main(["trace", "--model", "toy", "--facts", str(toy_facts), "--n", "1", "--samples", "2",
                 "--window", "2", "--suggest-size", "1", "--out", str(out), "--no-progress"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    summary = json.loads((out / "trace.json").read_text())
    assert summary["counts"]["traced"] == 1 and summary["settings"]["samples"] == 2
    assert summary["model"]["num_layers"] == 4 and len(summary["suggestion"]["layers"]) == 1
    assert "suggested layers to edit: [" in printed.out and (out / "heatmaps" / "00000.png").exists()

    assert main(["trace", "--model", "toy", "--facts", str(toy_facts), "--window", "0", "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == "kedit: error: window: expected a positive number of layers; got 0"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"subject": "X", "attribute": "Y", "prompt": "Z is"}]))
    assert main(["trace", "--model", "toy", "--facts", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kedit: error: {bad}, record 0, field 'prompt'") and "Traceback" not in err


def test_a_run_resumes_when_the_noise_scale_differs_only_in_its_last_bits(tmp_path):
    """The measured noise scale is a sum over threads: another thread count changes its last bits, which
    must not stop a resume; a different scale (or setting) still does."""
    expected = {"model": "m", "settings": {"samples": 10, "noise_scale": 0.349400744918614, "kinds": ["hidden"]}}
    run_module._check_resume(tmp_path, expected, fresh=False)            # writes settings.json
    nudged = json.loads(json.dumps(expected))
    nudged["settings"]["noise_scale"] = 0.3494007449186143
    run_module._check_resume(tmp_path, nudged, fresh=False)
    for key, value in (("noise_scale", 0.35), ("samples", 11), ("kinds", ["mlp"])):
        other = json.loads(json.dumps(expected))
        other["settings"][key] = value
        with pytest.raises(KeditError, match="other settings"):
            run_module._check_resume(tmp_path, other, fresh=False)
