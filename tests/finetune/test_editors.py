"""The four fine-tuning editors on tiny models: each raises its targets' probabilities, touches only the
parameters it trains, returns exact deltas and leaves the model bit-identical; FT-L's bound holds to
the last element; FT-Mix mixes seeded unmodified facts at its ratio."""
import pytest
import torch

import kedit_core as kedit
from kedit_core import EditContext
from kedit_core.errors import KeditError
from kedit_plugins.finetune.lora import structure_snapshot
from kedit_plugins.finetune.selection import select_parameters
from kedit_plugins.finetune.training import Example, MixedBatches, linf_ball

from .helpers import COUNTERFACT, applied_weights, assert_bit_identical, snapshot, target_nll

QUIET = dict(progress=False)
# Settings that move a tiny random model's targets measurably in a few dozen Adam steps.
EDITOR_SETTINGS = {
    "ft": dict(lr=5e-3, num_steps=10),
    "ft-l": dict(lr=2e-2, num_steps=10, norm_constraint=5e-3, layers=[0, 1], module="mlp"),
    "ft-mix": dict(lr=5e-3, num_steps=10, mix_ratio=1.0),
    "f-learning": dict(forget_num_steps=3, learn_num_steps=10, learn_lr=5e-3, layers=[0, 1], module="mlp"),
}


def run(model, requests, method, seed=0, options=None, **hparams):
    context = EditContext(seed=seed, progress=False, options=options or {})
    if method == "ft-mix" and "unmodified_facts" not in hparams and "unmodified_facts" not in (options or {}):
        hparams["unmodified_facts"] = str(COUNTERFACT)
    return kedit.compute_edit(model, requests, method, context=context, **hparams)


@pytest.mark.parametrize("method", list(EDITOR_SETTINGS))
def test_each_editor_raises_its_targets_probabilities_and_leaves_the_model_as_it_was(model, requests_cf, method):
    before_weights = snapshot(model.model)
    before_structure = structure_snapshot(model.model)
    nll_before = target_nll(model, requests_cf)
    result = run(model, requests_cf, method, **EDITOR_SETTINGS[method])
    # computing changed nothing: weights, modules, flags, gradients
    assert_bit_identical(model.model, before_weights)
    assert structure_snapshot(model.model) == before_structure
    assert all(p.grad is None for p in model.model.parameters())
    # every target is more likely after applying the deltas
    with result.deltas.apply(model.model):
        nll_after = target_nll(model, requests_cf)
    assert_bit_identical(model.model, before_weights)
    for i, (b, a) in enumerate(zip(nll_before, nll_after)):
        assert a < b - 0.05, f"request {i}: target NLL {b:.3f} -> {a:.3f}"
    d = result.deltas
    assert d.editor == method and d.extra["seed"] == 0 and d.extra["stages"]
    assert set(d.tensors) == set(d.extra["trained_parameters"])
    params = dict(model.model.named_parameters())
    for n, t in d.tensors.items():
        assert t.shape == params[n].shape and t.dtype == torch.float64  # wide enough to be exact
        assert t.abs().max() > 0


def test_deltas_reproduce_the_trained_weights_exactly(gpt2, requests_cf):
    result = run(gpt2, requests_cf, "ft", lr=1e-2, num_steps=3, early_stop_loss=None)
    params = dict(gpt2.model.named_parameters())
    name = gpt2.adapter.mlp_out_weight_name(0)
    # retrain by hand with the same loop: the trained weights equal original + delta bit for bit
    from kedit_plugins.finetune.training import FixedBatches, TrainSettings, train
    from kedit_core.deltas import preserved_weights
    with preserved_weights(gpt2.model, [name, name.replace("weight", "bias")]):
        sel = {n: params[n] for n in (name, name.replace("weight", "bias"))}
        train(gpt2, sel, FixedBatches([Example(r.filled_prompt, r.target_new) for r in requests_cf], 64),
              TrainSettings(3, 1e-2, early_stop_loss=None), progress=False)
        trained = params[name].detach().clone()
    assert torch.equal(applied_weights(gpt2, result.deltas)[name], trained)


@pytest.mark.parametrize("fixture", ["gpt2", "llama", "gpt2_bf16"])
def test_ft_l_respects_its_bound_to_the_last_element_and_touches_only_its_parameters(request, fixture, requests_cf):
    model = request.getfixturevalue(fixture)
    radius = 3e-3 + 1e-9  # not a round number in any float format
    hp = dict(layers=[0, 1], module="mlp", lr=2e-2, num_steps=8, norm_constraint=radius, early_stop_loss=None)
    result = run(model, requests_cf, "ft-l", **hp)
    trained = set(select_parameters(model, layers=[0, 1], module="mlp", params=[]))
    assert set(result.deltas.tensors) == trained
    original = snapshot(model.model)
    edited = applied_weights(model, result.deltas)
    at_bound = 0
    for n, w in edited.items():
        change = (w.double() - original[n].double()).abs()
        if n in trained:
            assert float(change.max()) <= radius, f"{n}: moved {float(change.max())!r} > {radius!r}"
            at_bound += int((change > 0.5 * radius).sum())
        else:
            assert torch.equal(w, original[n]), f"{n} is not trained but changed"
    assert at_bound > 100  # the projection was active, so the bound was really tested
    assert result.deltas.extra["max_abs_change"] <= radius


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_linf_ball_is_exact_and_tight_where_naive_rounding_is_not(dtype):
    theta0 = torch.tensor([1.0, -1.0, 0.3, 1e-3, 0.0, 7.5], dtype=dtype)
    radius = 0.006 if dtype != torch.float32 else 6e-8
    naive_hi = (theta0.double() + radius).to(dtype)
    assert ((naive_hi.double() - theta0.double()) > radius).any()  # the trap this guards against
    lo, hi = linf_ball(theta0, radius)
    t64 = theta0.double()
    assert ((t64 - lo.double()) <= radius).all() and ((hi.double() - t64) <= radius).all()
    assert (lo <= theta0).all() and (theta0 <= hi).all()
    # tight: one representable step further out leaves the ball
    assert ((t64 - torch.nextafter(lo, torch.full_like(lo, -float("inf"))).double()) > radius).all()
    assert ((torch.nextafter(hi, torch.full_like(hi, float("inf"))).double() - t64) > radius).all()


def test_mixed_batches_hold_the_ratio_and_are_seeded():
    modified = [Example(f"m{i}", " x") for i in range(5)]
    unmodified = [Example(f"u{i}", " y") for i in range(7)]
    mixed = MixedBatches(modified, unmodified, batch_size=2, mix_ratio=2.0, seed=3)
    batches = list(mixed.pass_batches(0)) + list(mixed.pass_batches(1))
    assert [sum(e.prompt.startswith("m") for e in b) for b in batches] == [2, 2, 1] * 2
    assert [sum(e.prompt.startswith("u") for e in b) for b in batches] == [4, 4, 2] * 2
    drawn = [e.prompt for b in batches for e in b if e.prompt.startswith("u")]
    assert sorted(drawn[:7]) == sorted(u.prompt for u in unmodified)  # each once before any repeats
    again = MixedBatches(modified, unmodified, batch_size=2, mix_ratio=2.0, seed=3)
    assert [e.prompt for b in list(again.pass_batches(0)) + list(again.pass_batches(1)) for e in b] == \
        [e.prompt for b in batches for e in b]
    other = MixedBatches(modified, unmodified, batch_size=2, mix_ratio=2.0, seed=4)
    assert [e.prompt for e in next(other.pass_batches(0))] != [e.prompt for e in batches[0]]


def test_ft_mix_takes_its_facts_from_a_file_or_the_context_and_is_seeded(gpt2, requests_cf):
    hp = dict(lr=5e-3, num_steps=3, mix_ratio=2.0)
    from_file = run(gpt2, requests_cf, "ft-mix", unmodified_facts=str(COUNTERFACT), **hp)
    from_context = run(gpt2, requests_cf, "ft-mix", options={"unmodified_facts": str(COUNTERFACT)}, **hp)
    records = kedit.load_requests(COUNTERFACT)[4:30]
    from_objects = run(gpt2, requests_cf, "ft-mix", options={"unmodified_facts": records}, **hp)
    other_seed = run(gpt2, requests_cf, "ft-mix", seed=1, unmodified_facts=str(COUNTERFACT), **hp)
    plain_ft = run(gpt2, requests_cf, "ft", lr=5e-3, num_steps=3)
    name = gpt2.adapter.mlp_out_weight_name(0)
    assert torch.equal(from_file.deltas.tensors[name], from_context.deltas.tensors[name])
    assert not torch.equal(from_file.deltas.tensors[name], other_seed.deltas.tensors[name])
    assert not torch.equal(from_file.deltas.tensors[name], plain_ft.deltas.tensors[name])
    facts = from_file.deltas.extra["unmodified_facts"]
    # the 4 edited cases are dropped from the pool: their prompts are being rewritten
    assert facts["excluded_as_edited"] == 4 and facts["count"] == len(kedit.load_requests(COUNTERFACT)) - 4
    assert from_file.deltas.extra["mix"]["mix_ratio"] == 2.0
    assert from_objects.deltas.extra["unmodified_facts"]["count"] == 26
    with pytest.raises(KeditError, match="given twice"):
        run(gpt2, requests_cf, "ft-mix", options={"unmodified_facts": records}, unmodified_facts=str(COUNTERFACT))
    with pytest.raises(KeditError, match="none were given"):
        kedit.compute_edit(gpt2, requests_cf, "ft-mix", context=EditContext(progress=False))


def test_progress_is_shown(gpt2, requests_cf, capsys):
    kedit.compute_edit(gpt2, requests_cf[:1], "ft", context=EditContext(progress=True), num_steps=2)
    assert "ft:" in capsys.readouterr().err


def test_micro_batches_bound_the_padded_tokens_and_keep_every_example_in_order(llama):
    from kedit_plugins.finetune.training import micro_batches
    examples = [Example(f"Fact number {i} is about" + " very" * (i % 5), " something") for i in range(40)]
    parts = micro_batches(llama, examples, max_tokens=60)
    assert len(parts) > 1 and [e for part in parts for e in part] == examples
    for part in parts:
        longest = max(len(llama.tokenizer(e.prompt + e.target)["input_ids"]) for e in part)
        assert len(part) == 1 or len(part) * longest <= 60
    assert micro_batches(llama, examples, max_tokens=10_000) == [examples]


@pytest.mark.parametrize("method", ["ft", "ft-mix"])
def test_a_mini_batch_split_into_micro_batches_trains_to_the_same_weights(monkeypatch, llama, requests_cf, method):
    """Splitting a mini-batch bounds memory only: the same gradient (float rounding) and the same steps."""
    import kedit_plugins.finetune.training as training
    whole = run(llama, requests_cf, method, num_steps=3, lr=1e-2, early_stop_loss=None)
    calls = []
    original = training.batch_loss
    monkeypatch.setattr(training, "MICRO_BATCH_TOKENS", 12)   # a few examples per micro-batch

    def counting(model, examples):
        calls.append(len(examples))
        return original(model, examples)

    monkeypatch.setattr(training, "batch_loss", counting)
    split = run(llama, requests_cf, method, num_steps=3, lr=1e-2, early_stop_loss=None)
    assert max(calls) < len(requests_cf) * (2 if method == "ft-mix" else 1)   # really split
    assert whole.deltas.extra["stages"][0]["optimizer_steps"] == split.deltas.extra["stages"][0]["optimizer_steps"]
    assert whole.deltas.names() == split.deltas.names()
    for name, delta in whole.deltas.tensors.items():
        torch.testing.assert_close(split.deltas.tensors[name], delta, rtol=1e-4, atol=1e-6)
