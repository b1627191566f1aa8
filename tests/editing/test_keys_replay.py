"""The fast keys path (cached lower blocks replayed, rows cut after the fact token) reads the same keys
and block outputs as a fresh forward per layer, on the model as edited so far."""
import pytest
import torch

import kedit_core as kedit
from kedit_core.deltas import temporarily_applied
from kedit_core.editing.keys import Capture, LayerByLayerKeys, collect, group_mean_weights, rows_with_bare_prompts
from kedit_core.testing import tiny_model

from .conftest import TEMPLATES, TINY_SETTINGS, covariance_from_text, requests_for_tests

FLAT = [t for group in TEMPLATES for t in group]


def captures(model, krows, bare, layer, z_layer, n):
    weights = group_mean_weights(TEMPLATES)
    template_rows = [r for r in range(len(krows)) if krows.kind[r] == "prompt"]
    keys = Capture(model.adapter.mlp_out_name(layer), "input", template_rows, [krows.owner[r] for r in template_rows],
                   [weights[krows.template[r]] for r in template_rows], n)
    return keys, Capture(model.adapter.layer_name(z_layer), "output", bare, list(range(n)), [1.0] * n, n)


class BlockCounter:
    """Counts block forwards (rows x blocks actually computed, replayed blocks excluded)."""

    def __init__(self, model):
        self.rows = 0
        self.handles = []
        for i in range(model.adapter.num_layers):
            block = model.adapter.module(model.adapter.layer_name(i))
            self.handles.append(block.register_forward_pre_hook(self.hook, with_kwargs=True))

    def hook(self, module, args, kwargs):
        if "forward" not in module.__dict__:  # a replayed block swaps its forward on the instance
            hidden = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            self.rows += hidden.shape[0] * hidden.shape[1]

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("family", ["gpt2", "gptj", "gpt-neox", "llama", "gemma3"])
@pytest.mark.parametrize("layers", [[1, 2, 3], [0, 2, 4]])
def test_replayed_keys_equal_fresh_passes(family, layers):
    model = tiny_model(family, num_layers=6, hidden_size=64, dtype=torch.float64)
    requests = requests_for_tests()
    n, z_layer = len(requests), layers[-1]
    krows, bare = rows_with_bare_prompts(model.tokenizer, requests, FLAT, fact_token="subject_last", rule="offsets")
    keys_capture, bare_capture = captures(model, krows, bare, layers[0], z_layer, n)
    post_norm = model.adapter.post_mlp_norm_name(0) is not None
    reader = LayerByLayerKeys(model, krows, keys_capture, bare_capture, layers, z_layer, max_tokens=40,
                              mlp_outputs=post_norm)
    g = torch.Generator().manual_seed(0)
    deltas = {}
    counted = {"replayed": 0, "fresh": 0}
    for i, layer in enumerate(layers):
        counter = BlockCounter(model)
        try:
            keys, current, mlp_current = reader.read(i, deltas)
        finally:
            counter.close()
        counted["replayed"] += counter.rows
        counter = BlockCounter(model)
        wanted = list(captures(model, krows, bare, layer, z_layer, n))
        if post_norm:
            wanted.append(Capture(model.adapter.mlp_name(layer), "output", bare, list(range(n)), [1.0] * n, n))
        try:
            with temporarily_applied(model.model, deltas):
                want_keys, want_current, *want_mlp = collect(model, krows, wanted,
                                                             stop_after=model.adapter.layer_name(z_layer))
        finally:
            counter.close()
        if post_norm:
            torch.testing.assert_close(mlp_current, want_mlp[0], rtol=1e-10, atol=1e-12)
        else:
            assert mlp_current is None
        counted["fresh"] += counter.rows
        torch.testing.assert_close(keys, want_keys, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(current, want_current, rtol=1e-10, atol=1e-12)
        # a random update at this layer, large enough to change every later hidden state
        name = model.adapter.mlp_out_weight_name(layer)
        weight = dict(model.model.named_parameters())[name]
        deltas[name] = 0.5 * weight.norm() * torch.randn(weight.shape, generator=g, dtype=weight.dtype) / weight.numel() ** 0.5
    assert counted["replayed"] < 0.6 * counted["fresh"], counted
    with pytest.raises(RuntimeError, match="step 0 asked for"):
        reader.read(0, {})


class FreshKeys:
    """LayerByLayerKeys' interface, computed the published way: a fresh pass per layer."""

    def __init__(self, model, rows, keys, bare, layers, z_layer, **kwargs):
        self.model, self.rows, self.keys, self.bare, self.layers, self.z_layer = model, rows, keys, bare, layers, z_layer
        self.passes = {"fresh": 0}

    def read(self, i, deltas):
        keys = Capture(self.model.adapter.mlp_out_name(self.layers[i]), "input", self.keys.rows, self.keys.segments,
                       self.keys.weights, self.keys.num_segments)
        self.passes["fresh"] += 1
        with temporarily_applied(self.model.model, deltas):
            return (*collect(self.model, self.rows, [keys, self.bare],
                             stop_after=self.model.adapter.layer_name(self.z_layer)), None)


def test_memit_deltas_with_replayed_keys_equal_fresh_passes(monkeypatch):
    model = tiny_model("llama", num_layers=5, hidden_size=64, dtype=torch.float64)
    cov = covariance_from_text(model, [1, 2, 4])
    requests = requests_for_tests()
    context = kedit.EditContext(stats=cov, context_templates=TEMPLATES, progress=False, seed=0)
    fast = kedit.compute_edit(model, requests, "memit", context=context, layers=[1, 2, 4], **TINY_SETTINGS)
    assert fast.info["keys_passes"] == {"key_rows": 3, "bare_rows": 3}
    import kedit_core.editing.batch as batch_module

    monkeypatch.setattr(batch_module, "LayerByLayerKeys", FreshKeys)
    fresh = kedit.compute_edit(model, requests, "memit", context=context, layers=[1, 2, 4], **TINY_SETTINGS)
    assert fresh.info["keys_passes"] == {"fresh": 3}
    for name, tensor in fast.deltas.tensors.items():
        other = fresh.deltas.tensors[name]
        assert float((tensor - other).norm() / other.norm()) < 1e-9, name
