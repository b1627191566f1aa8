"""Hyper-parameters of the fine-tuning editors (defaults, files, flags, reference files) and the
selection of trained parameters through the model adapter."""
import json
from types import SimpleNamespace

import pytest

import kedit_core as kedit
from kedit_core.errors import HyperParamsError
from kedit_core.hparams import find_model_defaults, parse_assignments
from kedit_plugins.finetune import (
    ConstrainedFineTune, ConstrainedFTHParams, FineTune, FineTuneHParams, FLearning, FLearningHParams, MixedFineTune,
)
from kedit_plugins.finetune.editors import DEFAULTS_DIR, EDITORS
from kedit_plugins.finetune.selection import select_parameters


def test_the_four_editors_are_registered_through_the_plugin():
    editors = kedit.list_editors()
    for cls in EDITORS:
        assert editors[cls.name] is cls


def test_class_defaults_are_the_reference_settings():
    hp = FineTuneHParams()
    assert (hp.num_steps, hp.lr, hp.early_stop_loss, hp.weight_decay) == (25, 5e-4, 1e-2, 0.0)
    assert hp.layers == [0] and hp.module == "mlp_out" and hp.params == []
    assert ConstrainedFTHParams().norm_constraint == 5e-4


@pytest.mark.parametrize("source,editor,layers,delta", [
    ("gpt2-xl", ConstrainedFineTune, [0], 5e-4),
    ("openai-community/gpt2-xl", ConstrainedFineTune, [0], 5e-4),
    ("/models/gpt2-xl/", ConstrainedFineTune, [0], 5e-4),
    ("EleutherAI/gpt-j-6B", ConstrainedFineTune, [0], 5e-5),
    ("gpt2-xl", FineTune, [1], None),
    ("EleutherAI/gpt-j-6B", FineTune, [21], None),
])
def test_published_defaults_are_picked_by_model_name(source, editor, layers, delta):
    hp = editor.default_hparams(SimpleNamespace(source=source))
    assert hp.layers == layers and hp.module == "mlp_out"
    assert (hp.num_steps, hp.lr, hp.early_stop_loss) == (25, 5e-4, 1e-2)
    if delta is not None:
        assert hp.norm_constraint == delta


def test_a_model_without_published_defaults_gets_the_class_defaults(gpt2):
    assert find_model_defaults(DEFAULTS_DIR / "ft-l", gpt2) is None
    assert ConstrainedFineTune.default_hparams(gpt2) == ConstrainedFTHParams()
    assert MixedFineTune.default_hparams(SimpleNamespace(source="gpt2-xl")) == MixedFineTune.HParams()


def test_every_shipped_defaults_file_validates():
    by_name = {cls.name: cls for cls in EDITORS}
    files = sorted(DEFAULTS_DIR.glob("*/*.json"))
    assert len(files) >= 4
    for path in files:
        by_name[path.parent.name].HParams.from_json(path)


def test_unknown_keys_and_bad_values_are_errors(tmp_path):
    with pytest.raises(HyperParamsError, match=r"unknown key\(s\) \['norm_constraint'\]"):
        FineTuneHParams.from_dict({"norm_constraint": 1e-3})
    with pytest.raises(HyperParamsError, match="norm_constraint.*must be positive"):
        ConstrainedFTHParams(norm_constraint=0.0)
    with pytest.raises(HyperParamsError, match="forget_method"):
        FLearningHParams.from_dict({"forget_method": "qlora"})
    path = tmp_path / "hp.json"
    path.write_text(json.dumps({"lr": 1e-3, "module": "mlp"}))
    assert FineTuneHParams.from_json(path) == FineTuneHParams(lr=1e-3, module="mlp")


def test_hyper_parameters_from_flags(gpt2):
    overrides = parse_assignments(ConstrainedFTHParams, ["lr=1e-3", "layers=[0,1]", "module=attn",
                                                         "early_stop_loss=null", "norm_constraint=2e-4"])
    hp = kedit.resolve_hparams(ConstrainedFineTune, gpt2, None, **overrides)
    assert (hp.lr, hp.layers, hp.module, hp.early_stop_loss, hp.norm_constraint) == (1e-3, [0, 1], "attn", None, 2e-4)
    with pytest.raises(HyperParamsError, match="unknown key 'lrate'"):
        parse_assignments(FineTuneHParams, ["lrate=1"])
    with pytest.raises(HyperParamsError, match="expected a number"):
        parse_assignments(FineTuneHParams, ["lr=fast"])
    with pytest.raises(HyperParamsError, match="KEY=VALUE"):
        parse_assignments(FineTuneHParams, ["lr"])
    with pytest.raises(HyperParamsError, match="out of range"):
        kedit.resolve_hparams(FineTune, gpt2, None, layers=[5])


REFERENCE_CONSTR = {  # the shape of kmeng01/rome hparams/FT/gpt2-xl_constr.json
    "layers": [0], "num_steps": 25, "lr": 5e-4, "weight_decay": 0, "kl_factor": 0, "norm_constraint": 5e-4,
    "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj", "layer_module_tmp": "transformer.h.{}",
    "mlp_module_tmp": "transformer.h.{}.mlp", "attn_module_tmp": "transformer.h.{}.attn",
    "ln_f_module": "transformer.ln_f", "lm_head_module": "transformer.wte"}


def test_a_reference_ft_file_is_accepted_and_checked_against_the_model(tmp_path, gpt2, llama):
    constr = tmp_path / "gpt2-xl_constr.json"
    constr.write_text(json.dumps(REFERENCE_CONSTR))
    hp = ConstrainedFTHParams.from_json(constr)
    assert hp.params == ["transformer.h.0.mlp.c_proj.*"] and hp.norm_constraint == 5e-4
    # the same parameters the adapter-based selection picks
    assert list(select_parameters(gpt2, layers=None, module="all", params=hp.params)) == \
        list(select_parameters(gpt2, layers=[0], module="mlp_out", params=[]))
    with pytest.raises(HyperParamsError, match="matches no parameter"):
        kedit.resolve_hparams(ConstrainedFineTune, llama, constr)
    with pytest.raises(HyperParamsError, match="use the 'ft-l' editor"):
        FineTuneHParams.from_json(constr)
    unconstr = tmp_path / "gpt2-xl_unconstr.json"
    unconstr.write_text(json.dumps(dict(REFERENCE_CONSTR, norm_constraint=False, layers=[1])))
    assert FineTuneHParams.from_json(unconstr).params == ["transformer.h.1.mlp.c_proj.*"]
    kl = tmp_path / "kl.json"
    kl.write_text(json.dumps(dict(REFERENCE_CONSTR, kl_factor=0.5)))
    with pytest.raises(HyperParamsError, match="kl_factor"):
        ConstrainedFTHParams.from_json(kl)


@pytest.mark.parametrize("module,expected", [
    ("mlp_out", {"gpt2": ["transformer.h.1.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.bias"],
                 "llama": ["model.layers.1.mlp.down_proj.weight"]}),
    ("attn", {"gpt2": ["transformer.h.1.attn.c_attn.weight", "transformer.h.1.attn.c_attn.bias",
                       "transformer.h.1.attn.c_proj.weight", "transformer.h.1.attn.c_proj.bias"],
              "llama": [f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkvo"]}),
])
def test_selection_by_layer_and_module_goes_through_the_adapter(model, module, expected):
    family = "gpt2" if "GPT2" in type(model.model).__name__ else "llama"
    names = list(select_parameters(model, layers=[1], module=module, params=[]))
    assert sorted(names) == sorted(expected[family])


def test_selection_of_blocks_globs_and_biases(gpt2):
    block = select_parameters(gpt2, layers=[0], module="block", params=[])
    assert block and all(n.startswith("transformer.h.0.") for n in block)
    assert "transformer.h.0.ln_1.weight" in block and "transformer.h.0.mlp.c_fc.weight" in block
    every_block = select_parameters(gpt2, layers=None, module="block", params=[])
    assert {n.split(".")[2] for n in every_block} == {"0", "1"}
    no_bias = select_parameters(gpt2, layers=[0], module="mlp", params=[], include_biases=False)
    assert sorted(no_bias) == ["transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight"]
    globbed = select_parameters(gpt2, layers=None, module="mlp_out", params=["transformer.h.*.mlp.c_fc.weight"])
    assert sorted(globbed) == ["transformer.h.0.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.weight"]
    everything = select_parameters(gpt2, layers=None, module="all", params=[])
    assert list(everything) == [n for n, _ in gpt2.model.named_parameters()]
    with pytest.raises(HyperParamsError, match="out of range"):
        select_parameters(gpt2, layers=[2], module="mlp", params=[])
    with pytest.raises(HyperParamsError, match="matches no parameter"):
        select_parameters(gpt2, layers=None, module="mlp", params=["model.layers.0.*"])


def test_lora_stages_need_linear_layers(gpt2):
    with pytest.raises(HyperParamsError, match="LoRA stage needs linear layers"):
        kedit.resolve_hparams(FLearning, gpt2, None, params=["transformer.ln_f.*"])
    kedit.resolve_hparams(FLearning, gpt2, None, params=["transformer.ln_f.*"], forget_method="full")
