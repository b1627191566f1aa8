"""Value batches sized from memory: the plan packs requests into batches that fit the budget, the results
do not depend on the grouping, a request that cannot fit alone is a clear error raised before the memory
is taken (the model untouched), and a resumed run groups the requests as the interrupted one did."""
import pytest
import torch

import kedit_core as kedit
from kedit_core.editing.rows import value_rows
from kedit_core.editing.values import (MEMORY_HEADROOM, Injection, ValueSettings, ValueStore, optimise_values_batched,
                                       parse_memory, plan_value_batches)
from kedit_core.errors import KeditError
from kedit_core.testing import tiny_model

from .conftest import TEMPLATES, TINY_SETTINGS, assert_bit_identical, requests_for_tests, state_snapshot

FLAT_TEMPLATES = [t for group in TEMPLATES for t in group]
SETTINGS = ValueSettings(num_steps=6, lr=0.5, weight_decay=1e-3, clamp_norm_factor=4.0, kl_factor=0.0625)
INJECTION = Injection(layer=2, site="block", nll_layer=3)


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_layers=4, hidden_size=64, dtype=torch.float64)


def rows_for(model, count):
    requests = (requests_for_tests() * ((count + 2) // 3))[:count]
    requests = [kedit.EditRequest(r.prompt, f"{r.subject} {i}", r.target_new) for i, r in enumerate(requests)]
    return value_rows(model.tokenizer, requests, FLAT_TEMPLATES, fact_token="subject_last", rule="offsets")


def test_parse_memory():
    assert parse_memory("512MiB") == 512 * 2**20
    assert parse_memory("8GB") == 8 * 10**9
    assert parse_memory("1.5g") == int(1.5 * 2**30)
    assert parse_memory(4096) == 4096
    for bad in ("lots", "8 parsecs", "0", -3):
        with pytest.raises(KeditError, match="memory size"):
            parse_memory(bad)


def test_plan_packs_consecutive_requests_within_budget():
    sizes = [10, 10, 10, 10, 10]
    per_token = 100.0
    # 2,000 bytes of budget hold 2,000 / (1.5 * 100) = 13.3 tokens: one request per batch
    assert plan_value_batches(sizes, per_token, 2000, None) == [[0], [1], [2], [3], [4]]
    assert plan_value_batches(sizes, per_token, int(MEMORY_HEADROOM * per_token * 30), None) == [[0, 1, 2], [3, 4]]
    assert plan_value_batches(sizes, per_token, 10**9, 20) == [[0, 1], [2, 3], [4]]  # the token cap
    assert plan_value_batches(sizes, per_token, 10**9, None, first=1) == [[1, 2, 3, 4]]
    with pytest.raises(KeditError, match=r"request 3 alone needs about .* GiB and .* may be used"):
        plan_value_batches([10, 10, 10, 40], per_token, int(MEMORY_HEADROOM * per_token * 30), None)


def test_grouping_does_not_change_the_values(model):
    rows, lengths = rows_for(model, 6)
    whole = optimise_values_batched(model, rows, lengths, ValueSettings(**{**SETTINGS.__dict__, "batch_requests": 6}),
                                    INJECTION)
    # Measure what one request holds, then give room for about two per batch.
    sized = optimise_values_batched(model, rows, lengths, SETTINGS, INJECTION)
    per_token = sized.plan["bytes_per_token"]
    assert sized.plan["sized_by"] == "memory" and per_token > 0 and sized.batches[0] == 1
    tokens = sum(len(rows.ids[r]) for r in rows.rows_of([1, 2]))
    budget = int(MEMORY_HEADROOM * per_token * tokens * 1.05)
    planned = optimise_values_batched(model, rows, lengths, ValueSettings(**{**SETTINGS.__dict__,
                                                                          "memory_bytes": budget}), INJECTION)
    assert planned.batches[0] == 1 and len(planned.batches) >= 3 and max(planned.batches) >= 2
    assert sum(planned.batches) == 6
    for other in (sized, planned):
        assert torch.allclose(other.target, whole.target, rtol=1e-10, atol=1e-12)
        assert other.steps == whole.steps


def test_a_request_that_cannot_fit_is_a_clear_error_and_leaves_the_model(model):
    rows, lengths = rows_for(model, 3)
    before = state_snapshot(model)
    settings = ValueSettings(**{**SETTINGS.__dict__, "memory_bytes": 20_000})
    with pytest.raises(KeditError, match=r"does not fit in memory: request 0 alone holds more than the .* GiB it may "
                                         r"use \(--max-memory\)"):
        optimise_values_batched(model, rows, lengths, settings, INJECTION)
    assert_bit_identical(model, before)
    blocks = [model.adapter.module(model.adapter.layer_name(i)) for i in range(4)]
    assert all("forward" not in b.__dict__ for b in blocks)  # the replay was undone


def test_the_editor_takes_max_memory(model):
    from .conftest import covariance_from_text

    cov = covariance_from_text(model, [1, 2])
    context = kedit.EditContext(stats=cov, context_templates=TEMPLATES, progress=False, max_memory="20KB")
    with pytest.raises(KeditError, match="does not fit in memory"):
        kedit.compute_edit(model, requests_for_tests(), "memit", context=context, layers=[1, 2], **TINY_SETTINGS)
    context = kedit.EditContext(stats=cov, context_templates=TEMPLATES, progress=False)
    result = kedit.compute_edit(model, requests_for_tests(), "memit", context=context, layers=[1, 2], **TINY_SETTINGS)
    batches = result.info["value_batches"]
    assert batches["sized_by"] == "memory" and sum(batches["requests_per_batch"]) == 3
    assert batches["early_stop_most_probable"] in (True, False)


def test_a_resumed_run_keeps_the_first_runs_grouping(model, tmp_path):
    rows, lengths = rows_for(model, 5)
    store = ValueStore(tmp_path, model.fingerprint())
    first = optimise_values_batched(model, rows, lengths, ValueSettings(**{**SETTINGS.__dict__,
                                                                        "batch_tokens": 40}), INJECTION, store=store)
    assert len(list(tmp_path.glob("plan-*.json"))) == 1 and len(first.batches) >= 3
    again = ValueStore(tmp_path, model.fingerprint())
    # Another budget now, yet the plan on disk decides: every batch is found and loaded.
    second = optimise_values_batched(model, rows, lengths, ValueSettings(**{**SETTINGS.__dict__,
                                                                         "batch_tokens": 10_000}), INJECTION, store=again)
    assert again.loaded == len(first.batches) and again.saved == 0
    assert second.batches == first.batches and torch.equal(second.target, first.target)
