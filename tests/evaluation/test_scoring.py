"""kedit_core.text.score_targets: batched teacher-forced scores equal a plain forward per pair."""
import pytest
import torch

from kedit_core.text import (IGNORE, PromptTargetBatch, _shared_prefix_carriers, collate_prompt_targets, encode,
                             encode_target, labelled_logits, prompt_target_batch, score_targets)

PROMPTS = ["The mother tongue of Danielle Darrieux is", "Paris is the capital of", "Toko Yasuda, the",
           "The mother tongue of Danielle Darrieux is", "A"]
TARGETS = [" English", " France and Navarre", " guitar", " French", " b"]


def plain_scores(m, prompt, target):
    p_ids, t_ids = encode(m.tokenizer, prompt), encode_target(m.tokenizer, target)
    with torch.no_grad():
        logp = torch.log_softmax(m.model(torch.tensor([p_ids + t_ids])).logits[0].float(), -1)
    rows = [logp[len(p_ids) - 1 + j] for j in range(len(t_ids))]
    return [r[t].item() for r, t in zip(rows, t_ids)], [int(r.argmax()) for r in rows], t_ids


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batched_scores_equal_one_pair_forward(family, request):
    m = request.getfixturevalue(family)
    scores = score_targets(m.model, m.tokenizer, PROMPTS, TARGETS, max_tokens=48)
    for prompt, target, score in zip(PROMPTS, TARGETS, scores):
        logprobs, argmax, t_ids = plain_scores(m, prompt, target)
        assert score.target_ids == tuple(t_ids)
        assert score.logprobs == pytest.approx(logprobs, abs=1e-4)
        assert list(score.argmax_ids) == argmax
        assert score.nll == pytest.approx(-sum(logprobs) / len(logprobs), abs=1e-4)
        assert score.correct == all(a == t for a, t in zip(argmax, t_ids))


def test_one_at_a_time_and_full_logits_paths_agree(gpt2):
    batched = score_targets(gpt2.model, gpt2.tokenizer, PROMPTS, TARGETS)
    single = score_targets(gpt2.model, gpt2.tokenizer, PROMPTS, TARGETS, max_batch=1)
    for a, b in zip(batched, single):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4) and a.argmax_ids == b.argmax_ids
    batch = prompt_target_batch(gpt2.tokenizer, PROMPTS, TARGETS)
    with torch.no_grad():
        fast = labelled_logits(gpt2.model, batch, select=True)
        full = labelled_logits(gpt2.model, batch, select=False)
    assert fast.shape == (sum(batch.target_lengths), full.shape[-1])
    torch.testing.assert_close(fast, full, atol=1e-4, rtol=1e-4)


def test_vocabulary_projection_runs_only_on_target_positions(gpt2):
    seen = []
    hook = gpt2.adapter.unembedding.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    try:
        score_targets(gpt2.model, gpt2.tokenizer, PROMPTS, TARGETS)
    finally:
        hook.remove()
    # one row per target token of the sequences run (a pair scored from another's pass adds none)
    t_ids = [encode_target(gpt2.tokenizer, t) for t in TARGETS]
    carriers, _ = _shared_prefix_carriers([encode(gpt2.tokenizer, p) for p in PROMPTS], t_ids)
    assert sum(s[0] for s in seen) == sum(len(t_ids[c]) for c in carriers) and all(len(s) == 2 for s in seen)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_targets_after_one_prompt_share_its_pass_and_score_as_alone(family, request):
    """CounterFact scores every prompt with two objects: a target whose tokens before its last are a prefix
    of another target of the same prompt is read from that one's pass, with the scores of its own."""
    m = request.getfixturevalue(family)
    prompts = ["Paris is the capital of"] * 5 + ["Rome is in"] * 2
    targets = [" France and Navarre", " France", " France and", " Spain", " France or", " Italy", " Italy"]
    t_ids = [encode_target(m.tokenizer, t) for t in targets]
    carriers, members = _shared_prefix_carriers([encode(m.tokenizer, p) for p in prompts], t_ids)
    assert len(carriers) < len(prompts) and sorted(i for c in carriers for i in members[c]) == list(range(7))
    for c in carriers:
        for i in members[c]:
            assert prompts[i] == prompts[c] and t_ids[c][:len(t_ids[i]) - 1] == t_ids[i][:-1]
    forwards = []
    hook = m.model.register_forward_pre_hook(lambda mod, args, kwargs: forwards.append(kwargs["input_ids"].shape[0]),
                                             with_kwargs=True)
    try:
        scores = score_targets(m.model, m.tokenizer, prompts, targets, max_batch=1)
    finally:
        hook.remove()
    assert sum(forwards) == len(carriers)
    for prompt, target, score in zip(prompts, targets, scores):
        logprobs, argmax, ids = plain_scores(m, prompt, target)
        assert score.target_ids == tuple(ids) and list(score.argmax_ids) == argmax
        assert score.logprobs == pytest.approx(logprobs, abs=1e-4)


def test_batches_respect_the_token_budget(gpt2):
    sizes = []
    hook = gpt2.model.register_forward_pre_hook(lambda mod, args, kwargs: sizes.append(kwargs["input_ids"].shape),
                                                with_kwargs=True)
    try:
        score_targets(gpt2.model, gpt2.tokenizer, PROMPTS * 4, TARGETS * 4, max_tokens=40)
    finally:
        hook.remove()
    assert len(sizes) > 1 and all(b * t <= 40 for b, t in sizes)


def test_collate_matches_prompt_target_batch(gpt2):
    a = prompt_target_batch(gpt2.tokenizer, PROMPTS, TARGETS, include_last_target_token=False)
    b = collate_prompt_targets([encode(gpt2.tokenizer, p) for p in PROMPTS],
                               [encode_target(gpt2.tokenizer, t) for t in TARGETS],
                               pad_id=gpt2.tokenizer.pad_token_id, include_last_target_token=False)
    assert isinstance(b, PromptTargetBatch)
    for x, y in ((a.input_ids, b.input_ids), (a.attention_mask, b.attention_mask), (a.labels, b.labels)):
        assert torch.equal(x, y)
    # the label at a prompt's last position is the target's first token
    row = 0
    p_len = a.prompt_lengths[row]
    assert a.labels[row, p_len - 1] == encode_target(gpt2.tokenizer, TARGETS[row])[0]
    assert (a.labels[row, : p_len - 1] == IGNORE).all()


def test_empty_prompt_is_an_error(gpt2):
    with pytest.raises(ValueError, match="prompt 0"):
        score_targets(gpt2.model, gpt2.tokenizer, [""], [" x"])


def test_prompts_longer_than_the_context_keep_their_last_tokens():
    from kedit_core.testing import tiny_model

    m = tiny_model("llama", num_layers=1, hidden_size=32, context_length=16)  # BOS-adding tokenizer
    long_prompt = " ".join(["word"] * 30) + " The capital of France is"
    with pytest.warns(UserWarning, match="cut from the left"):
        (score,) = score_targets(m.model, m.tokenizer, [long_prompt], [" Paris"])
    p_ids, t_ids = encode(m.tokenizer, long_prompt), encode_target(m.tokenizer, " Paris")
    kept = p_ids[:1] + p_ids[len(p_ids) - (16 - len(t_ids)) + 1:]  # BOS, then the prompt's end
    with torch.no_grad():
        logp = torch.log_softmax(m.model(torch.tensor([kept + t_ids])).logits[0], -1)
    expected = [logp[len(kept) - 1 + j, t].item() for j, t in enumerate(t_ids)]
    assert score.logprobs == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="reads at most 16"):
        score_targets(m.model, m.tokenizer, ["x"], [" word" * 20])
