"""Hyper-parameters: the published files are accepted as they are, their module names are checked
against the model, unknown keys are errors, and the shipped defaults are found by model."""
import json
from importlib import resources
from pathlib import Path
from types import SimpleNamespace

import pytest

from kedit_core.editors import get_editor, resolve_hparams
from kedit_core.errors import HyperParamsError
from kedit_core.testing import tiny_model

# hparams/MEMIT/EleutherAI_gpt-j-6B.json and hparams/MEMIT/gpt2-xl.json of kmeng01/memit (data, verbatim).
GPTJ_MEMIT = {"layers": [3, 4, 5, 6, 7, 8], "clamp_norm_factor": 0.75, "layer_selection": "all",
              "fact_token": "subject_last", "v_num_grad_steps": 25, "v_lr": 5e-1, "v_loss_layer": 27,
              "v_weight_decay": 0.5, "kl_factor": 0.0625, "mom2_adjustment": True, "mom2_update_weight": 15000,
              "rewrite_module_tmp": "transformer.h.{}.mlp.fc_out", "layer_module_tmp": "transformer.h.{}",
              "mlp_module_tmp": "transformer.h.{}.mlp", "attn_module_tmp": "transformer.h.{}.attn",
              "ln_f_module": "transformer.ln_f", "lm_head_module": "lm_head", "mom2_dataset": "wikipedia",
              "mom2_n_samples": 100000, "mom2_dtype": "float32"}
GPT2XL_MEMIT = {**GPTJ_MEMIT, "layers": [13, 14, 15, 16, 17], "v_num_grad_steps": 20, "v_loss_layer": 47,
                "mom2_update_weight": 20000, "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj",
                "lm_head_module": "transformer.wte"}


def write(tmp_path, data, name="h.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def gptj():
    return tiny_model("gptj", num_layers=4, hidden_size=64)


def test_published_file_is_accepted_and_checked(tmp_path, gptj):
    memit = get_editor("memit")
    path = write(tmp_path, GPTJ_MEMIT)
    hp = memit.HParams.from_json(path)
    assert hp.layers == [3, 4, 5, 6, 7, 8] and hp.mom2_update_weight == 15000.0
    with pytest.raises(HyperParamsError, match=r"layer\(s\) \[4, 5, 6, 7, 8\] do not exist"):
        resolve_hparams(memit, gptj, path)
    with pytest.raises(HyperParamsError, match="v_loss_layer = 27"):
        resolve_hparams(memit, gptj, path, layers=[1, 2])
    hp = resolve_hparams(memit, gptj, path, layers=[1, 2], v_loss_layer=None)  # module names match GPT-J's
    assert hp.rewrite_module_tmp == "transformer.h.{}.mlp.fc_out"


def test_architecture_strings_must_match_the_adapter(tmp_path, gptj):
    memit = get_editor("memit")
    gpt2_file = write(tmp_path, {**GPT2XL_MEMIT, "layers": [1, 2], "v_loss_layer": 3})
    with pytest.raises(HyperParamsError, match=r"names 'transformer.h.1.mlp.c_proj'.*'transformer.h.1.mlp.fc_out'"):
        resolve_hparams(memit, gptj, gpt2_file)
    gpt2 = tiny_model("gpt2", num_layers=4, hidden_size=64)
    with pytest.raises(HyperParamsError, match="lm_head_module = 'transformer.wte' is not this model's unembedding"):
        resolve_hparams(memit, gpt2, gpt2_file)  # the tiny model does not tie lm_head to wte
    gpt2.model.lm_head.weight = gpt2.model.transformer.wte.weight  # tied, as in GPT-2 XL
    assert resolve_hparams(memit, gpt2, gpt2_file).lm_head_module == "transformer.wte"


def test_unknown_keys_are_errors_bookkeeping_keys_are_not(tmp_path):
    memit = get_editor("memit")
    with pytest.raises(HyperParamsError, match=r"unknown key\(s\) \['v_lrr'\]"):
        memit.HParams.from_json(write(tmp_path, {**GPTJ_MEMIT, "v_lrr": 0.1}))
    assert memit.HParams.from_json(write(tmp_path, {**GPTJ_MEMIT, "model_name": "Llama3-8B"})).v_lr == 0.5
    with pytest.raises(HyperParamsError, match="fact_token"):
        memit.HParams.from_dict({"fact_token": "last"})
    with pytest.raises(HyperParamsError, match="expected one of"):
        memit.HParams.from_dict({"mode": "turbo"})


def fake_model(config_cls, **attrs):
    import transformers

    config = getattr(transformers, config_cls)(**attrs)
    return SimpleNamespace(model=SimpleNamespace(config=config), source="/models/some-local-copy",
                           adapter=SimpleNamespace(num_layers=attrs.get("n_layer", attrs.get("num_hidden_layers"))))


def test_published_defaults_are_found_by_model():
    gpt2xl = fake_model("GPT2Config", n_layer=48, n_embd=1600, n_head=25)
    llama3 = fake_model("LlamaConfig", num_hidden_layers=32, hidden_size=4096, vocab_size=128256)
    gptj = fake_model("GPTJConfig", n_layer=28, n_embd=4096)
    neox = fake_model("GPTNeoXConfig", num_hidden_layers=44, hidden_size=6144, num_attention_heads=64)
    memit, rome, emmet = get_editor("memit"), get_editor("rome"), get_editor("emmet")
    assert memit.default_hparams(gpt2xl).layers == [13, 14, 15, 16, 17]
    assert memit.default_hparams(gpt2xl).mom2_update_weight == 20000
    assert memit.default_hparams(gptj).layers == [3, 4, 5, 6, 7, 8]
    assert memit.default_hparams(llama3).v_lr == 0.1
    assert memit.default_hparams(neox).mom2_update_weight == 6000
    assert rome.default_hparams(gptj).layers == [5] and rome.default_hparams(gptj).clamp_norm_factor == 4
    assert rome.default_hparams(llama3).mom2_adjustment is False
    assert get_editor("r-rome").default_hparams(gpt2xl).r_rome is True
    assert emmet.default_hparams(gpt2xl).mom2_update_weight == 1000 and emmet.default_hparams(gptj).layers == [5]
    small = fake_model("GPT2Config", n_layer=12, n_embd=768)
    assert memit.default_hparams(small).layers == [2, 3, 4]  # inferred: ends near 30% of the depth


def test_published_defaults_are_found_by_name_too():
    memit = get_editor("memit")
    by_name = SimpleNamespace(model=SimpleNamespace(config=None), source="meta-llama/Meta-Llama-3-8B",
                              adapter=SimpleNamespace(num_layers=32))
    assert memit.default_hparams(by_name).layers == [4, 5, 6, 7, 8]


def test_every_shipped_file_validates():
    for name in ("memit", "rome", "emmet"):
        editor = get_editor(name)
        root = resources.files(f"kedit_plugins.{name}").joinpath("hparams")
        index = json.loads(root.joinpath("index.json").read_text())
        assert {e["model"] for e in index["models"]} >= {"GPT-2 XL", "GPT-J 6B", "GPT-NeoX-20B", "Llama-3-8B"}
        for entry in index["models"]:
            hp = editor.HParams.from_json(root.joinpath(entry["file"]))
            assert hp.rewrite_module_tmp is None and entry["source"]


def test_the_toy_model_gets_its_own_settings(toy):
    hp = get_editor("memit").default_hparams(toy)
    assert hp.layers == [0, 1] and hp.mom2_update_weight == 100.0 and hp.v_loss_layer == 3
    assert get_editor("rome").default_hparams(toy).layers == [0]


SMOLLM2_MEMIT_LAYERS, SMOLLM2_MEMIT_LAMBDA = [3, 4, 5, 6, 7], 2000
SMOLLM2_FT = {"layers": [5], "lr": 0.005}
SMOLLM2_FTL = {"layers": [5], "norm_constraint": 0.05}
SMOLLM2 = dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, vocab_size=49152,
               num_attention_heads=9, num_key_value_heads=3)
GEMMA3 = dict(num_hidden_layers=18, hidden_size=640, intermediate_size=2048, vocab_size=262144,
              num_attention_heads=4, num_key_value_heads=1, head_dim=256)


def test_the_real_models_get_their_swept_settings():
    """The settings chosen by the sweeps on SmolLM2-135M and Gemma-3-270m are found by architecture (a copy
    of the model under any name), and each index entry names the sweep's command and results file."""
    smollm2 = fake_model("LlamaConfig", **SMOLLM2)
    memit, rome, emmet, alphaedit = (get_editor(n) for n in ("memit", "rome", "emmet", "alphaedit"))
    assert memit.default_hparams(smollm2).layers == SMOLLM2_MEMIT_LAYERS
    assert memit.default_hparams(smollm2).mom2_update_weight == SMOLLM2_MEMIT_LAMBDA
    assert rome.default_hparams(smollm2).layers == [7]
    assert get_editor("r-rome").default_hparams(smollm2).layers == [7]
    assert emmet.default_hparams(smollm2).layers == [5, 6, 7, 8, 9]
    assert memit.default_hparams(smollm2).v_num_grad_steps == 40  # zsRE needs them (memit-zsre-steps)
    assert memit.default_hparams(smollm2).clamp_norm_factor == 1.5
    assert alphaedit.default_hparams(smollm2).layers == SMOLLM2_MEMIT_LAYERS
    gemma3 = fake_model("Gemma3TextConfig", **GEMMA3)
    gemma_memit = memit.default_hparams(gemma3)
    # the post-norm sweeps' choice: Gemma's large residual stream needs a larger value step than the published 0.5,
    # and its layers 6-8 do not tell subjects apart (memit-layers-postnorm*/: 1-5 keeps neighbours best)
    assert gemma_memit.layers == [1, 2, 3, 4, 5] and gemma_memit.mom2_update_weight == 4000
    assert gemma_memit.v_lr == 2.0 and gemma_memit.v_loss_layer == 17
    # EMMET and AlphaEdit optimise the same values; their own sweeps (emmet/, alphaedit/) were at layers 4-8
    for editor in (emmet, alphaedit):
        hp = editor.default_hparams(gemma3)
        assert hp.layers == [4, 5, 6, 7, 8] and hp.v_lr == 2.0 and hp.v_loss_layer == 17, editor.name
    for editor in (rome, get_editor("r-rome")):
        hp = editor.default_hparams(gemma3)
        assert hp.layers == [3] and hp.clamp_norm_factor == 0.75 and hp.v_lr == 2.0, editor.name
    # a Llama of another size does not get SmolLM2's settings
    other = fake_model("LlamaConfig", **{**SMOLLM2, "num_hidden_layers": 24})
    assert memit.default_hparams(other).mom2_update_weight != SMOLLM2_MEMIT_LAMBDA
    repo = Path(__file__).resolve().parents[2]
    for name in ("memit", "rome", "emmet", "alphaedit"):
        root = resources.files(f"kedit_plugins.{name}").joinpath("hparams")
        index = json.loads(root.joinpath("index.json").read_text())
        for entry in index["models"]:
            if entry["file"] in ("smollm2-135m.json", "gemma3-270m.json"):
                assert "bench/sweep_real.py" in entry["source"] or "bench/sequential.py" in entry["source"], entry
                results = [w.rstrip(".;,)") for w in entry["source"].split() if w.startswith("bench/results/")]
                assert results and all((repo / r).exists() for r in results), (name, results)


def test_the_fine_tuning_family_finds_smollm2_settings_by_its_alias():
    # as loaded from the zoo: the cached checkpoint's directory has the GGUF hash in its name
    model = SimpleNamespace(model=SimpleNamespace(config=None), source="/cache/models/smollm2-135m-b179c9523d0e",
                            info={"alias": "smollm2-135m"}, adapter=SimpleNamespace(num_layers=30))
    ft, ftl = get_editor("ft").default_hparams(model), get_editor("ft-l").default_hparams(model)
    assert ft.layers == SMOLLM2_FT["layers"] and ft.lr == SMOLLM2_FT["lr"]
    assert ftl.layers == SMOLLM2_FTL["layers"] and ftl.norm_constraint == SMOLLM2_FTL["norm_constraint"]


def test_the_fine_tuning_family_finds_gemma3_settings_by_its_alias():
    # the Gemma sweep (ft/, ft-refine/, ft-l/ under bench/results/hparams/gemma3-270m): ~10x smaller lr and δ
    # than SmolLM2's, because Gemma's MLP output weights are ~10x smaller
    model = SimpleNamespace(model=SimpleNamespace(config=None), source="/cache/models/gemma3-270m-a5fd3b62230a",
                            info={"alias": "gemma3-270m"}, adapter=SimpleNamespace(num_layers=18))
    ft, ftl = get_editor("ft").default_hparams(model), get_editor("ft-l").default_hparams(model)
    assert ft.layers == [1] and ft.lr == 1.5e-4
    assert ftl.layers == [1] and ftl.lr == 1.5e-4 and ftl.norm_constraint == 2e-3
