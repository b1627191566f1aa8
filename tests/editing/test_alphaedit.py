"""AlphaEdit: the fast r x r solve in the null-space basis gives the published full-projector float32 solve's
deltas (same values and keys, <= 1e-4 relative), the update leaves C0's principal directions and earlier
edits' keys alone, edits work end to end, and a threshold that keeps nothing fails before any work."""
import json
from importlib import resources
from types import SimpleNamespace

import pytest
import torch

import kedit_core as kedit
from kedit_core.editing import CovarianceFactors, FactorCache, alphaedit_solve
from kedit_core.editors import get_editor
from kedit_core.errors import KeditError
from kedit_core.testing import tiny_model

from .conftest import (TEMPLATES, assert_bit_identical, covariance_from_text, requests_for_tests, state_snapshot,
                       target_nlls)

# Tiny models' keys are ~100x smaller than a real model's: the published threshold (2e-2) and ridge (10)
# scale down with them.
TINY = {"clamp_norm_factor": 4.0, "v_weight_decay": 1e-3, "nullspace_threshold": 1e-3, "L2": 1e-3}


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def edit(model, cov, requests, **overrides):
    context = kedit.EditContext(stats=cov, context_templates=TEMPLATES, progress=False, seed=0,
                                **overrides.pop("context", {}))
    return kedit.compute_edit(model, requests, "alphaedit", context=context, **{**TINY, **overrides})


@pytest.fixture(scope="module")
def gpt2():
    model = tiny_model("gpt2", num_layers=4, hidden_size=64)
    return model, covariance_from_text(model, [1, 2])


def gap_threshold(mom2: torch.Tensor) -> float:
    """A threshold in the widest relative gap of the middle half of C0's spectrum, so that a float32 SVD
    and a float64 eigh keep the same directions."""
    values = torch.linalg.eigvalsh(mom2.double())
    n = len(values)
    ratios = values[n // 4 + 1: 3 * n // 4] / values[n // 4: 3 * n // 4 - 1]
    i = n // 4 + int(ratios.argmax())
    return float((values[i] * values[i + 1]).sqrt())


def test_fast_and_reference_give_the_same_deltas_for_the_same_values_and_keys(gpt2):
    model, cov = gpt2
    requests = requests_for_tests()
    first = edit(model, cov, requests[:2], layers=[1, 2])
    second = edit(model, cov, requests[2:], layers=[1, 2])
    assert set(first.keys) == {1, 2} and first.keys[1].shape == (2, model.adapter.key_size)
    threshold = gap_threshold(cov.moment(model, 1).mom2)
    factors = CovarianceFactors(model, cov, [1], cache=FactorCache())
    factors.prepare()
    keys = torch.cat([first.keys[1], second.keys[1]]).double().T            # [d_k, 3]
    preserved = second.keys[1].double().T @ second.keys[1].double()          # as if batch 2 came first
    residual = torch.randn(model.adapter.hidden_size, keys.shape[1], dtype=torch.float64,
                           generator=torch.Generator().manual_seed(0)) * 0.1
    for l2 in (1e-3, 10.0):
        deltas = {method: residual @ alphaedit_solve(factors, 1, keys, threshold=threshold, l2=l2,
                                                     preserved_gram=preserved, method=method).T
                  for method in ("fast", "reference")}
        assert rel(deltas["fast"], deltas["reference"]) <= 1e-4, l2
    rank = factors.nullspace(1, threshold).shape[1]
    assert 0 < rank < model.adapter.key_size
    assert abs(float(factors.reference_projector(1, threshold).double().trace()) - rank) < 1e-3  # tr P = rank P


def test_reference_mode_end_to_end_matches_fast_mode():
    """The published loops (reference mode) and kedit's fast mode in float64: same deltas to 1e-4."""
    model = tiny_model("gpt2", num_layers=4, hidden_size=64, dtype=torch.float64)
    cov = covariance_from_text(model, [1, 2])
    threshold = gap_threshold(cov.moment(model, 1).mom2)
    fast = edit(model, cov, requests_for_tests(), layers=[1, 2], nullspace_threshold=threshold)
    ref = edit(model, cov, requests_for_tests(), layers=[1, 2], nullspace_threshold=threshold, mode="reference")
    assert ref.deltas.extra["mode"] == "reference"
    for name, tensor in fast.deltas.tensors.items():
        assert rel(tensor, ref.deltas.tensors[name]) <= 1e-4, name


def test_update_spares_the_principal_directions_of_c0_and_the_earlier_keys(gpt2):
    model, cov = gpt2
    requests = requests_for_tests()
    before = state_snapshot(model)
    earlier = edit(model, cov, requests[:1], layers=[1, 2])
    preserved = {layer: k.double().T @ k.double() for layer, k in earlier.keys.items()}
    alone = edit(model, cov, requests[1:], layers=[1, 2])
    kept = edit(model, cov, requests[1:], layers=[1, 2], context={"preserved_keys": preserved})
    assert_bit_identical(model, before)
    name = model.adapter.mlp_out_weight_name(2)
    for result in (alone, kept):
        delta = model.adapter.from_param_layout(result.deltas.tensors[name].double())   # [d, d_k]
        values, vectors = torch.linalg.eigh(cov.moment(model, 2).mom2.double())
        principal = vectors[:, values >= TINY["nullspace_threshold"]]
        assert float((delta @ principal).norm() / delta.norm()) < 1e-5
    earlier_key = earlier.keys[2].double().T                                   # [d_k, 1]
    moved = {tag: float((model.adapter.from_param_layout(r.deltas.tensors[name].double()) @ earlier_key).norm())
             for tag, r in (("alone", alone), ("kept", kept))}
    assert moved["kept"] < 0.2 * moved["alone"], moved
    assert kept.info["preserved_layers"] == [1, 2] and alone.info["preserved_layers"] == []


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_edits_take_effect_and_leave_the_model_unchanged(family):
    model = tiny_model(family, num_layers=4, hidden_size=64)
    cov = covariance_from_text(model, [1, 2])
    requests = requests_for_tests()
    before = state_snapshot(model)
    result = edit(model, cov, requests, layers=[1, 2])
    assert_bit_identical(model, before)
    assert result.deltas.editor == "alphaedit" and set(result.info["nullspace_dims"]) == {1, 2}
    with result.deltas.apply(model.model):
        for request, (new, true) in zip(requests, target_nlls(model, requests)):
            assert new < true, request.subject
    assert_bit_identical(model, before)


def test_a_threshold_that_keeps_no_direction_fails_before_any_work(gpt2, monkeypatch):
    model, cov = gpt2
    import kedit_core.editing.batch as batch

    def no_values(*args, **kwargs):
        raise AssertionError("values were optimised before the threshold was checked")

    monkeypatch.setattr(batch, "optimise_values_across_ranks", no_values)
    before = state_snapshot(model)
    with pytest.raises(KeditError, match=r"nullspace_threshold = 1e-09 keeps no direction of C0") as info:
        edit(model, cov, requests_for_tests(), layers=[1, 2], nullspace_threshold=1e-9)
    assert "\n" not in str(info.value)
    assert_bit_identical(model, before)


def test_nullspace_is_cached_beside_the_statistics(gpt2, tmp_path, monkeypatch):
    model, cov = gpt2
    source = SimpleNamespace(prepare=cov.prepare, moment=cov.moment, factor_cache_dir=tmp_path / "derived")
    factors = CovarianceFactors(model, source, [1])
    factors.prepare()
    basis = factors.nullspace(1, 1e-3)
    assert len(list((tmp_path / "derived").glob("factor-*.safetensors"))) == 1
    monkeypatch.setattr(torch.linalg, "eigh", lambda *a, **k: pytest.fail("recomputed instead of read"))
    again = CovarianceFactors(model, source, [1], cache=FactorCache(tmp_path / "derived"))
    again.prepare()
    assert torch.equal(again.nullspace(1, 1e-3), basis)
    assert again.nullspace(1, 1e-3) is not None and factors.nullspace(1, 1e-3).shape == basis.shape


def test_published_settings_ship_and_validate():
    editor = get_editor("alphaedit")
    root = resources.files("kedit_plugins.alphaedit").joinpath("hparams")
    index = json.loads(root.joinpath("index.json").read_text())
    for entry in index["models"]:
        hp = editor.HParams.from_json(root.joinpath(entry["file"]))
        # SmolLM2's threshold is swept (its C0's eigenvalues average ~2e-2); the others are the published one
        expected = 1e-2 if entry["file"] == "smollm2-135m.json" else 2e-2
        assert hp.nullspace_threshold == expected and hp.L2 == 10 and entry["source"]
    import transformers

    llama3 = SimpleNamespace(model=SimpleNamespace(config=transformers.LlamaConfig(
        num_hidden_layers=32, hidden_size=4096, vocab_size=128256)), source="/m/x", adapter=None)
    hp = editor.default_hparams(llama3)
    assert hp.layers == [4, 5, 6, 7, 8] and hp.v_lr == 0.1
    smol = SimpleNamespace(model=SimpleNamespace(config=transformers.LlamaConfig(
        num_hidden_layers=30, hidden_size=576, vocab_size=49152)), source="/m/y", adapter=None)
    assert editor.default_hparams(smol).layers == [3, 4, 5, 6, 7]   # MEMIT's swept SmolLM2 layers
    with pytest.raises(KeditError, match="L2"):
        editor.HParams.from_dict({"L2": 0})


def test_kept_energy_is_reported_and_a_leaky_threshold_is_named(gpt2):
    """result.info carries, per layer, the share of C0's energy inside the kept directions (the eigenvalues
    below the threshold over the trace); a threshold keeping more than 5 % of it is said, with the layer."""
    model, cov = gpt2
    requests = requests_for_tests()[:2]
    values = torch.linalg.eigvalsh(cov.moment(model, 1).mom2.double())
    messages = []
    tight = edit(model, cov, requests, layers=[1], nullspace_threshold=float(values[3]) * 1.0001,
                 context={"log": messages.append})
    expected = float(values[:4].sum() / values.sum())
    assert tight.info["nullspace_dims"] == {1: 4}
    assert tight.info["nullspace_energy"][1] == pytest.approx(expected, rel=1e-9) and expected < 0.05
    assert not [m for m in messages if "C0's energy" in m]
    loose = edit(model, cov, requests, layers=[1], nullspace_threshold=float(values[-1]) * 2,
                 context={"log": messages.append})
    assert loose.info["nullspace_energy"][1] == pytest.approx(1.0, rel=1e-9)
    assert [m for m in messages if "keeps directions holding 100 % of C0's energy at layer 1" in m]
