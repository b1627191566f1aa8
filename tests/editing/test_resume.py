"""An interrupted MEMIT run resumes: finished batches of value optimisation are kept in the work
directory and loaded by the next run of the same edit, which then equals an uninterrupted run."""
import pytest
import torch

import kedit_core as kedit
import kedit_core.editing.values as values
from kedit_core.testing import tiny_model

from .conftest import TEMPLATES, TINY_SETTINGS, covariance_from_text, requests_for_tests

SETTINGS = dict(TINY_SETTINGS, layers=[1, 2], value_batch_size=1, v_num_grad_steps=4)  # 3 batches of values


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("gpt2", num_layers=4, hidden_size=64)
    return model, covariance_from_text(model, [1, 2])


def edit(model, cov, work_dir=None, **overrides):
    context = kedit.EditContext(stats=cov, context_templates=TEMPLATES, progress=False, work_dir=work_dir)
    return kedit.compute_edit(model, requests_for_tests(), "memit", context=context, **{**SETTINGS, **overrides})


REAL_CHUNK = values._optimise_chunk


class Interrupted(Exception):
    """Stands for the run being killed in the middle of the values phase."""


def counting(monkeypatch, fail_after=None):
    calls = []

    def chunk(*args, **kwargs):
        if fail_after is not None and len(calls) == fail_after:
            raise Interrupted
        calls.append(1)
        return REAL_CHUNK(*args, **kwargs)

    monkeypatch.setattr(values, "_optimise_chunk", chunk)
    return calls


def test_an_interrupted_edit_resumes_where_it_stopped(setup, tmp_path, monkeypatch):
    model, cov = setup
    uninterrupted = edit(model, cov)
    work = tmp_path / "work"
    counting(monkeypatch, fail_after=2)
    with pytest.raises(Interrupted):
        edit(model, cov, work)
    assert len(list(work.glob("values-*.pt"))) == 2 and not list(work.glob(".*tmp"))

    calls = counting(monkeypatch)
    messages = []
    context = kedit.EditContext(stats=cov, context_templates=TEMPLATES, progress=False, work_dir=work,
                                log=messages.append)
    resumed = kedit.compute_edit(model, requests_for_tests(), "memit", context=context, **SETTINGS)
    assert len(calls) == 1                                   # only the batch the interruption lost
    assert any("2 batch(es) of values loaded" in m for m in messages)
    assert resumed.deltas.names() == uninterrupted.deltas.names()
    for name in uninterrupted.deltas.names():
        assert torch.equal(resumed.deltas.tensors[name], uninterrupted.deltas.tensors[name]), name
    assert resumed.info["value_steps"] == uninterrupted.info["value_steps"]
    record = resumed.info["values_resumed"]
    assert record["batches_loaded"] == 2 and record["batches_computed"] == 1
    assert record["loaded_batches_seconds_when_computed"] > 0   # the interrupted run's clock, kept with them


def test_nothing_is_reused_when_the_edit_differs(setup, tmp_path, monkeypatch):
    model, cov = setup
    work = tmp_path / "work"
    edit(model, cov, work)
    calls = counting(monkeypatch)
    edit(model, cov, work, v_lr=0.3)                         # other settings: all three batches again
    assert len(calls) == 3
    calls.clear()
    weight = model.model.transformer.wte.weight
    original = weight[5, 0].item()
    with torch.no_grad():                                    # another model (one weight changed)
        weight[5, 0] = original + 1.0
    try:
        edit(model, cov, work)
    finally:
        with torch.no_grad():
            weight[5, 0] = original
    assert len(calls) == 3
    calls.clear()
    edit(model, cov, work)                                   # the first edit again: all loaded
    assert calls == []
