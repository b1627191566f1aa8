"""Seeded top-k generation: reproducible per prompt, independent of batching, equal to a plain loop."""
import pytest
import torch

from kedit_core.evaluation import GenerationSettings, load_cases, prompt_seed, sample_ids, sample_texts
from kedit_core.evaluation.counterfact import counterfact_generation
from kedit_core.evaluation.generation import top_k_choice, uniform_draws
from kedit_core.text import encode

PROMPTS = ["Danielle Darrieux was born in", "Paris is", "Danielle Darrieux was born in", "Where is the Eiffel Tower?"]


def plain_loop(m, prompt, seed, settings):
    """No batching, no KV cache: the full sequence through the model at every step."""
    ids = encode(m.tokenizer, prompt)
    u = uniform_draws(seed, settings.max_length)
    step = 0
    while len(ids) < settings.max_length:
        with torch.no_grad():
            logits = m.model(torch.tensor([ids])).logits[:, -1]
        ids.append(int(top_k_choice(logits, u[step:step + 1], settings.top_k)))
        step += 1
    return ids


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batched_cached_generation_equals_plain_loop(family, request):
    m = request.getfixturevalue(family)
    settings = GenerationSettings(max_length=14, top_k=5, max_batch=3)
    seeds = [11, 12, 13, 14]
    got = sample_ids(m.model, m.tokenizer, PROMPTS, seeds, settings)
    for prompt, seed, ids in zip(PROMPTS, seeds, got):
        assert len(ids) == settings.max_length
        assert ids[: len(encode(m.tokenizer, prompt))] == encode(m.tokenizer, prompt)
        assert ids == plain_loop(m, prompt, seed, settings)


def test_seeds_make_texts_reproducible_and_batch_independent(gpt2):
    settings = GenerationSettings(max_length=16)
    a = sample_texts(gpt2.model, gpt2.tokenizer, PROMPTS, [1, 2, 3, 4], settings)
    b = sample_texts(gpt2.model, gpt2.tokenizer, PROMPTS[2:3], [3], settings)
    assert a[2] == b[0]  # alone or batched with others
    assert a[0] != a[2]  # same prompt, other seed
    assert a == sample_texts(gpt2.model, gpt2.tokenizer, PROMPTS, [1, 2, 3, 4], GenerationSettings(max_length=16,
                                                                                                   max_batch=1))
    assert all(t.startswith(p) for t, p in zip(a, PROMPTS))


def test_top_k_sampling_distribution_and_greedy_limit():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04]]))
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    picks = top_k_choice(logits.expand(len(u), -1), u, top_k=2)
    share = (picks == 0).float().mean().item()
    assert share == pytest.approx(0.5 / 0.8, abs=0.02) and set(picks.tolist()) == {0, 1}
    assert set(top_k_choice(logits.expand(100, -1), u[:100], top_k=1).tolist()) == {0}


def test_counterfact_generation_seeds_by_case_and_prompt(gpt2, counterfact_path):
    _, cases = load_cases(counterfact_path, limit=2)
    settings = GenerationSettings(max_length=18, seed=3)
    out = counterfact_generation(gpt2.model, gpt2.tokenizer, cases, settings)
    assert [len(o["texts"]) for o in out] == [len(c.generation_prompts) for c in cases]
    again = counterfact_generation(gpt2.model, gpt2.tokenizer, cases[1:], settings)
    assert again[0]["texts"] == out[1]["texts"]
    assert out[0]["metrics"]["GE"] > 0 and out[0]["metrics"]["RS"] is None
    assert prompt_seed(3, 0, 1) != prompt_seed(3, 1, 0) and prompt_seed(3, 0, 1) == prompt_seed(3, 0, 1)


def test_generation_is_capped_at_the_model_context():
    from kedit_core.testing import tiny_model

    m = tiny_model("gpt2", num_layers=1, hidden_size=32, context_length=12)
    (ids,) = sample_ids(m.model, m.tokenizer, [" ".join(["word"] * 20)], [0], GenerationSettings(max_length=100))
    assert len(ids) == 12
    (ids,) = sample_ids(m.model, m.tokenizer, ["Paris is"], [0], GenerationSettings(max_length=100))
    prompt = encode(m.tokenizer, "Paris is")
    assert len(ids) == 12 and ids[:len(prompt)] == prompt
