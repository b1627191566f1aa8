"""Gemma-3-270m (optional: its five packages are not installed by CI): the Gemma 3 adapter on the real
model, and one MEMIT edit through its post-MLP norm."""
import pytest
import torch

import kedit_core as kedit
from kedit_core.evaluation import greedy_completions

from .conftest import zoo_model_or_skip

pytestmark = pytest.mark.slow   # converting the GGUF file takes ~1 minute on 2 cores


@pytest.fixture(scope="module")
def gemma3(zoo_cache):
    zoo_model_or_skip("gemma3-270m")
    return kedit.load_model("gemma3-270m", device="cpu")


def test_adapter_and_facts(gemma3):
    a = gemma3.adapter
    assert a.name == "gemma3" and a.num_layers == 18 and a.hidden_size == 640 and a.key_size == 2048
    assert a.post_mlp_norm_name(3) == "model.layers.3.post_feedforward_layernorm"
    assert greedy_completions(gemma3.model, gemma3.tokenizer, ["Toyota was founded in the country of"])[0].strip().startswith("Japan")
    # the adapter's logits equal the model's own (scaled embeddings and tied head inside the modules)
    ids = gemma3.tokenizer("The Eiffel Tower is in", return_tensors="pt")
    with torch.no_grad():
        out = gemma3.model(**ids, output_hidden_states=True)
    # hidden_states[-1] is already normalised by the final norm in transformers' Gemma 3
    torch.testing.assert_close(gemma3.adapter.unembedding(out.hidden_states[-1])[0, -1], out.logits[0, -1],
                               rtol=1e-4, atol=1e-3)


def test_one_memit_edit_flips_the_answer(gemma3):
    from kedit_core.demo import DEMO_CORPUS
    from kedit_core.editors import get_editor
    from kedit_core.requests import EditRequest
    from kedit_core.stats import CachedCovariance

    request = EditRequest("{} was founded in the country of", "Toyota", " Germany", " Japan")
    context = kedit.EditContext(seed=0, progress=False, stats=CachedCovariance(DEMO_CORPUS, None, tokens=3000,
                                                                                progress=False))
    before = gemma3.fingerprint()
    shipped = get_editor("memit").default_hparams(gemma3)
    assert shipped.layers == [1, 2, 3, 4, 5] and shipped.v_lr == 2.0
    result = kedit.compute_edit(gemma3, [request], "memit", context=context)  # with the shipped settings
    with result.deltas.apply(gemma3.model):
        after = greedy_completions(gemma3.model, gemma3.tokenizer, [request.filled_prompt])[0]
    assert after.strip().startswith("Germany"), after
    assert gemma3.fingerprint() == before
