"""F-Learning and LoRA: the stage-1 subtraction θ' = θ − λ(θ_old − θ) is exact elementwise (full and
LoRA forgetting), the LoRA delta is exactly B·A·scaling in the weight's layout, peft's wrapping is
fully undone, and every combination of full/LoRA stages learns the new facts."""
import dataclasses

import pytest
import torch

import kedit_core as kedit
from kedit_core import EditContext
from kedit_core.errors import RecordError
from kedit_plugins.finetune.lora import lora_adapters, lora_target_modules, structure_snapshot
from kedit_plugins.finetune.selection import select_parameters
from kedit_plugins.finetune.training import Example, FixedBatches, TrainSettings, train

from .helpers import applied_weights, assert_bit_identical, snapshot, target_nll

SELECTION = dict(layers=[0, 1], module="mlp")


def f_learning(model, requests, seed=0, **hparams):
    return kedit.compute_edit(model, requests, "f-learning", context=EditContext(seed=seed, progress=False),
                              **dict(SELECTION, **hparams))


@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_full_forgetting_subtracts_exactly(model, requests_cf, scale):
    steps, lr = 4, 1e-2
    # θ_old: plain FT on the old facts with the same parameters and settings
    old_as_new = [dataclasses.replace(r, target_new=r.target_true) for r in requests_cf]
    ft = kedit.compute_edit(model, old_as_new, "ft", context=EditContext(progress=False), num_steps=steps, lr=lr,
                            early_stop_loss=None, **SELECTION)
    theta = snapshot(model.model)
    theta_old = applied_weights(model, ft.deltas)
    # F-Learning with no learning steps: its deltas are θ' − θ
    result = f_learning(model, requests_cf, forget_method="full", forget_num_steps=steps, forget_lr=lr,
                        forget_scale=scale, learn_num_steps=0)
    theta_prime = applied_weights(model, result.deltas)
    # with learning, the stage-1 model is still available on request, and is the same θ'
    full = kedit.compute_edit(model, requests_cf, "f-learning", context=EditContext(
        progress=False, options={"keep_stage_deltas": True}), forget_method="full", forget_num_steps=steps,
        forget_lr=lr, forget_scale=scale, learn_num_steps=2, **SELECTION)
    stage_one = applied_weights(model, full.info["forget_deltas"])
    assert all(torch.equal(w, theta_prime[n]) for n, w in stage_one.items())
    assert not all(torch.equal(w, theta_prime[n]) for n, w in applied_weights(model, full.deltas).items())
    trained = select_parameters(model, params=[], **SELECTION)
    assert set(result.deltas.tensors) == set(trained)
    for n in theta:
        if n in trained:
            expected = (theta[n].double() - scale * (theta_old[n].double() - theta[n].double())).to(theta[n].dtype)
            assert torch.equal(theta_prime[n], expected), n
            assert not torch.equal(theta_prime[n], theta[n])
        else:
            assert torch.equal(theta_prime[n], theta[n]), n


@pytest.mark.parametrize("fixture", ["gpt2", "llama"])
def test_lora_delta_is_b_a_scaling_in_the_weight_layout(request, fixture):
    """peft's merge read out in float64 equals B·A·scaling by hand (transposed for GPT-2's Conv1D), and
    the adapted forward equals the forward with that delta added to the weights."""
    model = request.getfixturevalue(fixture)
    params = select_parameters(model, params=[], **SELECTION)
    targets = lora_target_modules(model.model, params)
    assert targets == [n.rpartition(".")[0] for n, p in params.items() if p.dim() == 2]  # every MLP matrix
    rank, alpha = 4, 12.0
    ids = model.tokenizer("The mother tongue of Danielle Darrieux is", return_tensors="pt")["input_ids"]
    before = structure_snapshot(model.model)
    g = torch.Generator().manual_seed(0)
    with lora_adapters(model.model, targets, rank=rank, alpha=alpha, seed=0) as adapters:
        for p in adapters.trainable_parameters().values():  # B starts at 0: give both factors values
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        deltas = adapters.weight_deltas()
        with torch.no_grad():
            adapted_logits = model.model(input_ids=ids).logits
        for name, layer in adapters.layers().items():
            a = layer.lora_A["kedit"].weight.double()
            b = layer.lora_B["kedit"].weight.double()
            by_hand = (b @ a) * (alpha / rank)
            if layer.fan_in_fan_out:
                by_hand = by_hand.T
            weight = layer.get_base_layer().weight
            assert deltas[name + ".weight"].dtype == torch.float64
            assert deltas[name + ".weight"].shape == weight.shape
            assert torch.equal(deltas[name + ".weight"], by_hand), name
    assert structure_snapshot(model.model) == before
    with torch.no_grad(), kedit.temporarily_applied(model.model, deltas):
        merged_logits = model.model(input_ids=ids).logits
    torch.testing.assert_close(merged_logits, adapted_logits, rtol=1e-5, atol=1e-5)


def test_lora_forgetting_subtracts_b_a_scaling_exactly(gpt2, requests_cf):
    steps, lr, rank, alpha, scale, seed = 3, 1e-2, 4, 8.0, 0.8, 5
    result = f_learning(gpt2, requests_cf, seed=seed, forget_method="lora", forget_num_steps=steps, forget_lr=lr,
                        forget_scale=scale, lora_rank=rank, lora_alpha=alpha, learn_num_steps=0)
    theta = snapshot(gpt2.model)
    theta_prime = applied_weights(gpt2, result.deltas)
    # the same LoRA training by hand (same seed, data and settings), then θ − λ·B·A·scaling
    params = select_parameters(gpt2, params=[], **SELECTION)
    targets = lora_target_modules(gpt2.model, params)
    old = FixedBatches([Example(r.filled_prompt, r.target_true) for r in requests_cf], 64)
    with lora_adapters(gpt2.model, targets, rank=rank, alpha=alpha, seed=seed) as adapters:
        train(gpt2, adapters.trainable_parameters(), old, TrainSettings(steps, lr, early_stop_loss=None),
              progress=False)
        by_hand = {}
        for name, layer in adapters.layers().items():
            ba = (layer.lora_B["kedit"].weight.double() @ layer.lora_A["kedit"].weight.double()) * (alpha / rank)
            by_hand[name + ".weight"] = ba.T if layer.fan_in_fan_out else ba
    assert set(by_hand) <= set(result.deltas.tensors)  # (the full learn stage, 0 steps here, lists all it trains)
    for n in theta:
        if n in by_hand:
            expected = (theta[n].double() - scale * by_hand[n]).to(theta[n].dtype)
            assert torch.equal(theta_prime[n], expected), n
            assert by_hand[n].abs().max() > 0
        else:
            assert torch.equal(theta_prime[n], theta[n]), n


@pytest.mark.parametrize("forget,learn", [("lora", "full"), ("full", "full"), ("full", "lora"), ("lora", "lora")])
def test_every_stage_combination_learns_the_new_facts_and_restores_the_model(model, requests_cf, forget, learn):
    before = snapshot(model.model)
    structure = structure_snapshot(model.model)
    nll_before = target_nll(model, requests_cf)
    result = f_learning(model, requests_cf, forget_method=forget, learn_method=learn, forget_num_steps=2,
                        learn_num_steps=8, learn_lr=1e-2 if learn == "lora" else 5e-3)
    assert_bit_identical(model.model, before)
    assert structure_snapshot(model.model) == structure
    assert not any("lora" in n for n, _ in model.model.named_parameters())
    assert not hasattr(model.model, "peft_config")
    with result.deltas.apply(model.model):
        nll_after = target_nll(model, requests_cf)
    for i, (b, a) in enumerate(zip(nll_before, nll_after)):
        assert a < b - 0.05, f"request {i}: target NLL {b:.3f} -> {a:.3f}"
    stages = result.deltas.extra["stages"]
    assert [s["method"] for s in stages] == [forget, learn] and [s["seed"] for s in stages] == [0, 1]


def test_peft_is_unloaded_when_training_fails(gpt2):
    before = structure_snapshot(gpt2.model)
    weights = snapshot(gpt2.model)
    targets = [gpt2.adapter.mlp_out_name(0)]
    with pytest.raises(RuntimeError, match="boom"):
        with lora_adapters(gpt2.model, targets, rank=2, alpha=4.0, seed=0):
            assert any("lora" in n for n, _ in gpt2.model.named_parameters())
            raise RuntimeError("boom")
    assert structure_snapshot(gpt2.model) == before
    assert_bit_identical(gpt2.model, weights)


def test_a_request_without_its_old_fact_is_named(gpt2, requests_cf):
    broken = list(requests_cf)
    broken[2] = dataclasses.replace(broken[2], target_true=None)
    with pytest.raises(RecordError, match=r"record 2, field 'target_true'.*needs target_true"):
        f_learning(gpt2, broken)
