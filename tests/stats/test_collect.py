"""One pass for several layers: C0 equals the direct computation, budgets, and the early stop."""
import pytest
import torch

from kedit_core.errors import KeditError
from kedit_core.stats import collect_second_moments
from kedit_core.testing import tiny_model

from .conftest import direct_second_moments, document_ids, relative_error


@pytest.mark.parametrize("family", ["gpt2", "gptj", "gpt-neox", "llama"])
def test_one_pass_equals_direct_computation(family, small_corpus):
    # Context 32 truncates the long paragraphs; 96-token batches force padding and many batches; 200-token
    # chunks make several chunks.
    model = tiny_model(family, num_layers=4, hidden_size=32, context_length=32)
    result = collect_second_moments(model, [2, 1], small_corpus, batch_tokens=96, chunk_tokens=200, progress=False)
    expected, count = direct_second_moments(model, [1, 2], document_ids(model, small_corpus))
    assert result.count == count
    assert result.info["chunks"] > 2 and result.info["documents"] == len(small_corpus)
    for layer in (1, 2):
        mom2 = result.moment(layer)
        assert mom2.dtype == torch.float64 and torch.equal(mom2, mom2.T)
        assert relative_error(mom2, expected[layer]) < 1e-6, family


def test_token_budget_cuts_the_last_document(small_corpus):
    model = tiny_model("gpt2", num_layers=3, hidden_size=32, context_length=32)
    result = collect_second_moments(model, [1], small_corpus, tokens=301, batch_tokens=64, progress=False)
    assert result.count == 301
    expected, count = direct_second_moments(model, [1], document_ids(model, small_corpus, tokens=301))
    assert count == 301
    assert relative_error(result.moment(1), expected[1]) < 1e-6


def test_document_budget(small_corpus):
    model = tiny_model("gpt2", num_layers=3, hidden_size=32, context_length=32)
    result = collect_second_moments(model, [0], small_corpus, docs=7, progress=False)
    expected, count = direct_second_moments(model, [0], document_ids(model, small_corpus[:7]))
    assert result.count == count and result.info["documents"] == 7
    assert relative_error(result.moment(0), expected[0]) < 1e-6


def test_layers_after_the_deepest_requested_one_never_run(small_corpus):
    model = tiny_model("llama", num_layers=5, hidden_size=32, context_length=32)
    adapter = model.adapter
    ran = []
    watched = {adapter.layer_name(3): "block 3", adapter.layer_name(4): "block 4",
               adapter.final_norm_name: "final norm", adapter.unembedding_name: "lm head",
               adapter.mlp_out_name(2): "projection 2", adapter.mlp_out_name(1): "projection 1"}
    handles = [adapter.module(name).register_forward_pre_hook(lambda *a, label=label: ran.append(label))
               for name, label in watched.items()]
    try:
        collect_second_moments(model, [1, 2], small_corpus[:10], batch_tokens=64, progress=False)
    finally:
        for h in handles:
            h.remove()
    assert "projection 1" in ran and "projection 2" in ran
    assert not {"block 3", "block 4", "final norm", "lm head"} & set(ran)


def test_bad_requests_are_clear_errors(small_corpus):
    model = tiny_model("gpt2", num_layers=3, hidden_size=32)
    with pytest.raises(KeditError, match="layers 0..2"):
        collect_second_moments(model, [1, 7], small_corpus, progress=False)
    with pytest.raises(KeditError, match="token budget must be positive"):
        collect_second_moments(model, [1], small_corpus, tokens=0, progress=False)
    with pytest.raises(KeditError, match="no layers"):
        collect_second_moments(model, [], small_corpus, progress=False)
