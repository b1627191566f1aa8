"""The editors end to end on tiny random models: each edit makes every new target more likely than the
old one on its rewrite prompt, and computing it leaves the model bit-identical."""
import warnings

import pytest
import torch

import kedit_core as kedit
from kedit_core.errors import EditConflictError, KeditError
from kedit_core.requests import EditRequest
from kedit_core.testing import tiny_model

from .conftest import (TEMPLATES, TINY_SETTINGS, assert_bit_identical, covariance_from_text, requests_for_tests,
                       state_snapshot, target_nlls)


def run(model, cov, method, requests, **overrides):
    settings = {k: v for k, v in TINY_SETTINGS.items() if method in ("memit", "emmet") or k != "mom2_update_weight"}
    context = kedit.EditContext(stats=cov, context_templates=TEMPLATES, progress=False, seed=0)
    return kedit.compute_edit(model, requests, method, context=context, **{**settings, **overrides})


def check_edit(model, cov, method, **overrides):
    requests = requests_for_tests()
    before = state_snapshot(model)
    result = run(model, cov, method, requests, **overrides)
    assert_bit_identical(model, before)
    with result.deltas.apply(model.model):
        after = target_nlls(model, requests)
    assert_bit_identical(model, before)  # reverted exactly
    for request, (new, true) in zip(requests, after):
        assert new < true, f"{method}: {request.subject!r}: NLL(new)={new:.3f} is not below NLL(true)={true:.3f}"
    return result


@pytest.mark.parametrize("family", ["gpt2", "gptj", "gpt-neox", "llama", "gemma3"])
def test_memit_on_each_family(family):
    model = tiny_model(family, num_layers=4, hidden_size=64)
    result = check_edit(model, covariance_from_text(model, [1, 2]), "memit", layers=[1, 2])
    names = [model.adapter.mlp_out_weight_name(layer) for layer in (1, 2)]
    assert result.deltas.names() == sorted(names)
    for name in names:
        param = dict(model.model.named_parameters())[name]
        assert result.deltas.tensors[name].shape == param.shape and result.deltas.tensors[name].dtype == torch.float32
    extra = result.deltas.extra
    assert extra["context_templates"] == TEMPLATES and extra["seed"] == 0 and extra["mode"] == "fast"
    assert set(result.timings) >= {"values", "keys", "solve", "statistics", "total"}


@pytest.mark.parametrize("method,family", [("rome", "gpt2"), ("rome", "llama"), ("r-rome", "gpt-neox"),
                                           ("emmet", "gptj")])
def test_rome_r_rome_and_emmet(method, family):
    model = tiny_model(family, num_layers=4, hidden_size=64)
    layers = [1] if method != "emmet" else [2]
    result = check_edit(model, covariance_from_text(model, layers), method, layers=layers)
    assert result.deltas.names() == [model.adapter.mlp_out_weight_name(layers[0])]
    if method == "r-rome":
        assert result.deltas.hparams["r_rome"] is True


def test_rome_update_is_rank_one_per_request(gpt2):
    model, cov = gpt2
    one = requests_for_tests()[:1]
    delta = run(model, cov, "rome", one, layers=[1]).deltas.tensors[model.adapter.mlp_out_weight_name(1)]
    s = torch.linalg.svdvals(delta.double())
    assert s[1] / s[0] < 1e-6


def test_reference_mode_reproduces_fast_mode():
    """Reference mode runs the published loops and arithmetic; in float64 both agree to rounding."""
    model = tiny_model("gpt2", num_layers=4, hidden_size=64, dtype=torch.float64)
    cov = covariance_from_text(model, [1, 2])
    requests = requests_for_tests()
    fast = run(model, cov, "memit", requests, layers=[1, 2], early_stop_most_probable=False)
    ref = run(model, cov, "memit", requests, layers=[1, 2], mode="reference")
    assert ref.deltas.extra["mode"] == "reference"
    assert fast.info["value_steps"] == ref.info["value_steps"]
    for name, tensor in fast.deltas.tensors.items():
        other = ref.deltas.tensors[name]
        assert float((tensor - other).norm() / other.norm()) < 1e-6, name
    # The fast mode's default is the published stopping rule; most-probable early stopping is opt-in.
    default = run(model, cov, "memit", requests, layers=[1, 2])
    assert default.info["value_batches"]["early_stop_most_probable"] is False
    assert default.info["value_steps"] == ref.info["value_steps"]
    early = run(model, cov, "memit", requests, layers=[1, 2], early_stop_most_probable=True)
    assert early.info["value_batches"]["early_stop_most_probable"] is True
    assert all(a <= b for a, b in zip(early.info["value_steps"], ref.info["value_steps"]))


def test_mom2_adjustment_off_needs_no_statistics(gpt2):
    model, _ = gpt2
    requests = requests_for_tests()[:2]
    result = kedit.compute_edit(model, requests, "rome", layers=[1], mom2_adjustment=False,
                                context=kedit.EditContext(context_templates=TEMPLATES, progress=False),
                                **{k: v for k, v in TINY_SETTINGS.items() if k != "mom2_update_weight"})
    assert "covariance" not in result.deltas.extra
    with pytest.raises(KeditError, match="needs covariance statistics"):
        kedit.compute_edit(model, requests, "memit", layers=[1],
                           context=kedit.EditContext(context_templates=TEMPLATES, progress=False))


def test_conflicting_requests_are_an_error_naming_both(gpt2):
    model, cov = gpt2
    clash = [EditRequest("The capital city of {}", "France", "Berlin", case_id="a"),
             EditRequest("The capital city of {}", "France", "Rome", case_id="b")]
    for method in ("memit", "rome"):
        with pytest.raises(EditConflictError, match=r"requests 0 \(case a\) and 1 \(case b\)"):
            run(model, cov, method, clash, layers=[1])


def test_same_subject_different_relations_is_a_warning(gpt2):
    """Both prompts put the subject first, so the key at its last token is the same for both edits."""
    model, cov = gpt2
    requests = [EditRequest("{} has its capital in", "France", "Berlin"),
                EditRequest("{} has the official language", "France", "Japanese")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run(model, cov, "memit", requests, layers=[2], v_num_grad_steps=3)
    assert any("France" in str(w.message) and "compete" in str(w.message) for w in caught)
    assert result.info["warnings"]


def test_a_failed_edit_leaves_the_model_unchanged(gpt2):
    """Layer 1 is solved and applied while layer 2 is measured; layer 2's statistics are singular (rank one:
    a positive diagonal, so only the solve finds out)."""
    model, cov = gpt2
    before = state_snapshot(model)
    rank_one = torch.ones(256, 1) @ torch.ones(1, 256)
    broken = kedit.stats.InMemoryCovariance({1: cov.moment(model, 1).mom2, 2: rank_one})
    with pytest.raises(KeditError, match="layer 2.*not positive definite"):
        run(model, broken, "emmet", requests_for_tests(), layers=[1, 2], v_num_grad_steps=2)
    assert_bit_identical(model, before)


def test_word_level_tokenizer_with_bos():
    """The toy-world setting: a small GPT-2 over a word-level vocabulary whose tokenizer adds BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from kedit_core.models import wrap_model
    from kedit_core.testing import tiny_config

    words = ["[BOS]", "[PAD]", "[UNK]", "The", "capital", "city", "of", "France", "Spain", "is", "a", "Berlin",
             "Paris", "Madrid", "Rome", "sky", "was", "clear.", "Because", "this,"]
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="[BOS]", pad_token="[PAD]", unk_token="[UNK]")
    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(tiny_config("gpt2", num_layers=4, hidden_size=64, vocab_size=len(words)))
    model = wrap_model(net, tok, source="word-level")
    requests = [EditRequest("The capital city of {}", "France", "Rome", "Paris"),
                EditRequest("The capital city of {}", "Spain", "Berlin", "Madrid")]
    before = state_snapshot(model)
    result = kedit.compute_edit(model, requests, "memit", layers=[1, 2], mom2_adjustment=False,
                                context=kedit.EditContext(context_templates=[["{}"], ["The sky was clear. {}"]],
                                                          progress=False),
                                **{k: v for k, v in TINY_SETTINGS.items()})
    assert_bit_identical(model, before)
    with result.deltas.apply(model.model):
        for request, (new, true) in zip(requests, target_nlls(model, requests)):
            assert new < true, request
