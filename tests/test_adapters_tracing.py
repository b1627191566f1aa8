"""Adapters resolve every family; tracing captures keys, edits outputs and stops the forward."""
import pytest
import torch

from kedit_core import bind_adapter, load_model
from kedit_core.errors import AdapterNotFoundError, KeditError
from kedit_core.testing import CORE_FAMILIES, FAMILIES, save_tiny_model, tiny_model
from kedit_core.tracing import Trace, TraceDict, primary, replace_primary

EXPECTED_MLP_OUT = {
    "gpt2": "transformer.h.{}.mlp.c_proj", "gpt-neo": "transformer.h.{}.mlp.c_proj",
    "gptj": "transformer.h.{}.mlp.fc_out", "gpt-neox": "gpt_neox.layers.{}.mlp.dense_4h_to_h",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_resolves_and_describes_the_model(family):
    m = tiny_model(family, num_layers=3, hidden_size=32)
    a = m.adapter
    assert a.num_layers == 3 and a.hidden_size == 32 and a.key_size == 128
    assert a.mlp_out_name(1) == EXPECTED_MLP_OUT.get(family, "model.layers.{}.mlp.down_proj").format(1)
    assert a.context_length == 128
    w = a.mlp_out_weight(2)
    assert tuple(w.shape) == ((128, 32) if family == "gpt2" else (32, 128))  # Conv1D is in x out
    assert a.from_param_layout(w).shape == (32, 128)
    assert a.final_norm is not None and a.unembedding.weight.shape[0] == m.tokenizer.vocab_size


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_adapter_resolves_from_a_saved_directory(family, tmp_path):
    path = save_tiny_model(family, tmp_path / family, num_layers=2, hidden_size=32)
    m = load_model(path, device="cpu")
    assert m.adapter.num_layers == 2 and m.source == str(path)


def test_unknown_architecture_names_its_config_class():
    class StrangeConfig:
        model_type = "strange"

    class StrangeModel(torch.nn.Module):
        config = StrangeConfig()

    with pytest.raises(AdapterNotFoundError, match="StrangeConfig.*register_model_adapters"):
        bind_adapter(StrangeModel())


def test_layer_out_of_range_is_a_clear_error():
    m = tiny_model("gpt2", num_layers=2)
    with pytest.raises(KeditError, match="layers 0..1"):
        m.adapter.mlp_out_name(5)


def reference_keys(m, layer, inputs):
    """The MLP-projection input recomputed by hand from the MLP's own input."""
    a = m.adapter
    with Trace(m.model, a.mlp_name(layer), retain_input=True, retain_output=False) as tr:
        m.model(**inputs)
    mlp = a.module(a.mlp_name(layer))
    x = tr.input
    if hasattr(mlp, "gate_up_proj"):          # phi3 fuses gate and up
        gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
        return mlp.activation_fn(gate) * up
    if hasattr(mlp, "gate_proj"):             # llama family
        return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    first = getattr(mlp, "c_fc", None) or getattr(mlp, "fc_in", None) or getattr(mlp, "dense_h_to_4h")
    return mlp.act(first(x))


@pytest.mark.parametrize("family", FAMILIES)
def test_tracing_captures_keys_and_stops_after_a_module(family):
    torch.manual_seed(0)
    m = tiny_model(family, num_layers=4, hidden_size=32)
    a = m.adapter
    inputs = m.tokenizer(["The mother tongue of Danielle Darrieux is", "Paris is the capital of"],
                         return_tensors="pt", padding=True)
    names = [a.mlp_out_name(1), a.mlp_out_name(2)]
    ran = []
    watch = a.module(a.layer_name(3)).register_forward_pre_hook(lambda *args: ran.append(3))
    try:
        with torch.no_grad(), TraceDict(m.model, names, retain_input=True, retain_output=False,
                                        stop_after=names[-1]) as td:
            m.model(**inputs)
            pytest.fail("the forward was not stopped")
    finally:
        watch.remove()
    assert ran == [], "layer 3 ran although the forward stopped after layer 2"
    with torch.no_grad():
        for layer, name in zip((1, 2), names):
            keys = td[name].input
            assert keys.shape == (2, inputs.input_ids.shape[1], 128)
            torch.testing.assert_close(keys, reference_keys(m, layer, inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "gptj", "llama", "gpt-neo"])
def test_edit_output_of_a_block_whatever_it_returns(family):
    """Blocks return a tensor (GPT-2, Llama) or a tuple (GPT-J, GPT-Neo); editing works for both."""
    m = tiny_model(family, num_layers=3, hidden_size=32)
    ids = m.tokenizer("The capital of France is", return_tensors="pt")
    block = m.adapter.layer_name(1)
    with torch.no_grad():
        base = m.model(**ids).logits
        shift = torch.zeros(32)
        shift[0] = 50.0

        def add_shift(output, layer):
            assert layer == block
            h = primary(output)
            return replace_primary(output, h + shift)

        with Trace(m.model, block, edit_output=add_shift) as tr:
            edited = m.model(**ids).logits
        assert not torch.allclose(base, edited)
        assert primary(tr.output)[0, 0, 0] > 25.0  # the retained output is the edited one
        again = m.model(**ids).logits  # hook removed
    torch.testing.assert_close(again, base)


def test_the_kv_cache_goes_by_the_name_the_model_takes():
    """transformers 5 renamed ``past_key_values`` to ``cache`` (the old name warns, then goes); 4.x knows
    only the old name. A cached continuation must equal the full forward either way."""
    from kedit_core.text import cache_kwargs, output_cache

    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=False):
            return input_ids

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None, use_cache=False):
            return input_ids

    assert cache_kwargs(Old(), "kv") == {"past_key_values": "kv"} and cache_kwargs(New(), "kv") == {"cache": "kv"}
    model = tiny_model("llama").model
    ids = torch.tensor([[3, 5, 7, 9, 11]])
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1]
        first = model(input_ids=ids[:, :4], use_cache=True)
        assert output_cache(first) is not None
        step = model(input_ids=ids[:, 4:], use_cache=True, **cache_kwargs(model, output_cache(first))).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)
