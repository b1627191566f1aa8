"""Deltas: exact apply/revert, safetensors round trip with metadata, wrong-model refusal."""
import pytest
import torch

from kedit_core import Deltas, apply_deltas, temporarily_applied
from kedit_core.deltas import preserved_weights
from kedit_core.errors import FingerprintMismatchError, KeditError
from kedit_core.testing import tiny_model


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bit_identical(model, snap):
    for n, p in model.named_parameters():
        assert torch.equal(p, snap[n]) and p.dtype == snap[n].dtype, n


def random_deltas(m, scale=1e-3, seed=0):
    g = torch.Generator().manual_seed(seed)
    names = [m.adapter.mlp_out_weight_name(layer) for layer in (1, 2)]
    params = dict(m.model.named_parameters())
    return Deltas({n: torch.randn(params[n].shape, generator=g) * scale for n in names},
                  editor="test", base_fingerprint=m.fingerprint(), hparams={"lambda": 1.5})


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_then_revert_is_bit_exact(family, dtype):
    m = tiny_model(family, dtype=dtype)
    before = snapshot(m.model)
    d = random_deltas(m)
    applied = d.apply(m.model)
    changed = [n for n, p in m.model.named_parameters() if not torch.equal(p, before[n])]
    assert sorted(changed) == d.names()
    applied.revert()
    assert_bit_identical(m.model, before)


def test_round_trip_through_a_file(tmp_path):
    m = tiny_model("gpt2")
    d = random_deltas(m)
    d.extra["seed"] = 3
    path = d.save(tmp_path / "edit.safetensors")
    loaded = Deltas.load(path)
    assert loaded.names() == d.names() and loaded.editor == "test" and loaded.hparams == {"lambda": 1.5}
    assert loaded.base_fingerprint == m.fingerprint() and loaded.extra == {"seed": 3}
    for n in d.names():
        assert torch.equal(loaded.tensors[n], d.tensors[n])
    # applying the loaded deltas gives exactly what applying the in-memory ones gives
    with d.apply(m.model):
        expected = snapshot(m.model)
    with loaded.apply(m.model):
        assert_bit_identical(m.model, expected)
    # saving twice gives byte-identical files (no timestamps)
    again = d.save(tmp_path / "again.safetensors")
    assert path.read_bytes() == again.read_bytes()


def test_wrong_model_is_refused():
    a, b = tiny_model("gpt2", seed=0), tiny_model("gpt2", seed=1)
    d = random_deltas(a)
    snap = snapshot(b.model)
    with pytest.raises(FingerprintMismatchError, match="fingerprint"):
        apply_deltas(b.model, d)
    assert_bit_identical(b.model, snap)
    # an already-edited model is another model too
    with d.apply(a.model):
        with pytest.raises(FingerprintMismatchError):
            d.apply(a.model)


def test_bad_shape_leaves_model_untouched():
    m = tiny_model("gpt2")
    snap = snapshot(m.model)
    names = [m.adapter.mlp_out_weight_name(0), m.adapter.mlp_out_weight_name(1)]
    params = dict(m.model.named_parameters())
    bad = Deltas({names[0]: torch.ones_like(params[names[0]]), names[1]: torch.ones(3, 3)})
    with pytest.raises(KeditError, match="shape"):
        bad.apply(m.model, check_fingerprint=False)
    assert_bit_identical(m.model, snap)


def test_temporarily_applied_and_preserved_weights_restore_on_error():
    m = tiny_model("llama")
    snap = snapshot(m.model)
    d = random_deltas(m)
    with pytest.raises(RuntimeError):
        with temporarily_applied(m.model, d.tensors):
            assert not torch.equal(dict(m.model.named_parameters())[d.names()[0]], snap[d.names()[0]])
            raise RuntimeError("editor failed mid-way")
    assert_bit_identical(m.model, snap)
    with pytest.raises(RuntimeError):
        with preserved_weights(m.model, d.names()):
            with torch.no_grad():
                for n in d.names():
                    dict(m.model.named_parameters())[n].mul_(3)
            raise RuntimeError("fine-tuning failed")
    assert_bit_identical(m.model, snap)


def test_not_a_delta_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(KeditError, match="not a kedit delta file"):
        Deltas.load(tmp_path / "other.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    with pytest.raises(KeditError, match="not a readable safetensors"):
        Deltas.load(tmp_path / "junk.safetensors")


def test_tied_weights_answer_to_both_names():
    import kedit_core

    m = kedit_core.load_model("toy")   # GPT-2 with tied embeddings
    assert m.model.lm_head.weight is m.model.transformer.wte.weight
    before = m.model.transformer.wte.weight.detach().clone()
    delta = torch.ones_like(before)
    with Deltas({"lm_head.weight": delta}).apply(m.model):
        assert torch.equal(m.model.transformer.wte.weight, before + delta)
    assert torch.equal(m.model.transformer.wte.weight, before)
    with pytest.raises(KeditError, match="same \\(tied\\) parameter"):
        Deltas({"lm_head.weight": delta, "transformer.wte.weight": delta}).apply(m.model)
