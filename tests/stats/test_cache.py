"""The statistics cache: reuse only on a full match, corrupt files recomputed with a warning, the
lookup-only mode, and the shared CLI options."""
import argparse
import json
import warnings

import pytest
import torch
from safetensors import safe_open

from kedit_core.deltas import apply_deltas, Deltas
from kedit_core.errors import KeditError
from kedit_core.stats import (CachedCovariance, FileCovariance, add_stats_arguments, collect_second_moments,
                              read_cache_file, source_from_args)
from kedit_core.stats import cache as cache_module
from kedit_core.testing import tiny_model

from .conftest import relative_error

LAYERS = [1, 2]


@pytest.fixture(scope="module")
def model():
    return tiny_model("gpt2", num_layers=4, hidden_size=32, context_length=32)


def make_source(corpus, stats_dir, **kw):
    kw.setdefault("batch_tokens", 128)
    return CachedCovariance(corpus, stats_dir, tokens=kw.pop("tokens", 400), progress=False, **kw)


def forbid_computing(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("statistics were recomputed although the cache should have been used")
    monkeypatch.setattr(cache_module, "collect_second_moments", fail)


def test_computes_all_missing_layers_in_one_pass_then_reuses_the_files(model, small_corpus, tmp_path, monkeypatch):
    passes = []
    real = cache_module.collect_second_moments

    def counting(model_, layers, *a, **k):
        passes.append(list(layers))
        return real(model_, layers, *a, **k)

    monkeypatch.setattr(cache_module, "collect_second_moments", counting)
    source = make_source(small_corpus, tmp_path)
    source.prepare(model, LAYERS)
    assert passes == [LAYERS]
    direct = collect_second_moments(model, LAYERS, small_corpus, tokens=400, progress=False)
    paths = {layer: source.path_for(model, layer) for layer in LAYERS}
    for layer in LAYERS:
        assert paths[layer].exists() and source.moment(model, layer).origin == str(paths[layer])
        mom2, count, meta = read_cache_file(paths[layer])
        assert count == 400 and mom2.dtype == torch.float32
        assert relative_error(mom2, direct.moment(layer)) < 1e-6
        assert meta["layer"] == layer and meta["module"] == model.adapter.mlp_out_name(layer)
        assert meta["model_fingerprint"] == model.fingerprint() and meta["tokens"] == 400
        assert meta["corpus"]["kind"] == "texts" and meta["kedit_version"] and meta["mom2_dtype"] == "float32"
        with safe_open(str(paths[layer]), framework="pt") as f:
            assert list(f.metadata()) == ["kedit"]  # one JSON key: byte-deterministic files
    assert not list(tmp_path.rglob(".partial-*")), "the checkpoint is removed once the cache is written"

    # A new source finds both layers in the cache and computes only the new one, alone.
    again = make_source(small_corpus, tmp_path)
    again.prepare(model, [0, 1, 2])
    assert passes == [LAYERS, [0]]
    assert {again.last_report[layer]["status"] for layer in LAYERS} == {"cached"}
    forbid_computing(monkeypatch)
    third = make_source(small_corpus, tmp_path)
    third.prepare(model, [0, 1, 2])
    assert torch.equal(third.moment(model, 2).mom2, source.moment(model, 2).mom2)


def test_files_are_byte_identical_when_recomputed(model, small_corpus, tmp_path):
    a = make_source(small_corpus, tmp_path / "a")
    b = make_source(small_corpus, tmp_path / "b")
    a.prepare(model, [1])
    b.prepare(model, [1])
    assert a.path_for(model, 1).read_bytes() == b.path_for(model, 1).read_bytes()


def test_a_different_budget_corpus_or_dtype_is_not_reused(model, small_corpus, tmp_path):
    base = make_source(small_corpus, tmp_path)
    base.prepare(model, [1])
    others = [make_source(small_corpus, tmp_path, tokens=300), make_source(small_corpus[1:], tmp_path),
              make_source(small_corpus, tmp_path, mom2_dtype="float64")]
    for other in others:
        other.prepare(model, [1])
        assert other.last_report[1]["status"] == "computed"
        assert other.path_for(model, 1) != base.path_for(model, 1)
    assert others[2].moment(model, 1).mom2.dtype == torch.float64
    other_model = tiny_model("gpt2", num_layers=4, hidden_size=32, context_length=32, seed=1)
    assert base.path_for(other_model, 1) != base.path_for(model, 1)


@pytest.mark.parametrize("damage", ["truncate", "flip-a-byte", "garbage"])
def test_a_corrupt_cache_file_is_recomputed_with_a_warning(model, small_corpus, tmp_path, damage):
    source = make_source(small_corpus, tmp_path)
    source.prepare(model, [1])
    path = source.path_for(model, 1)
    good = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(good[: len(good) - 100])
    elif damage == "flip-a-byte":
        data = bytearray(good)
        data[-9] ^= 0x40  # inside mom2's data, far from the header
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(b"not a safetensors file")
    again = make_source(small_corpus, tmp_path)
    with pytest.warns(RuntimeWarning, match="corrupt or truncated.*recomputing"):
        again.prepare(model, [1])
    assert again.last_report[1]["status"] == "computed"
    assert path.read_bytes() == good  # rewritten, identical to the first computation


def test_a_file_with_other_metadata_is_not_trusted(model, small_corpus, tmp_path):
    source = make_source(small_corpus, tmp_path)
    source.prepare(model, [1])
    path = source.path_for(model, 1)
    mom2, count, meta = read_cache_file(path)
    meta["tokens"] = 999
    from kedit_core.deltas import atomic_save_safetensors

    atomic_save_safetensors({"mom2": mom2, "count": torch.tensor([count])}, path, meta)
    again = make_source(small_corpus, tmp_path)
    with pytest.warns(RuntimeWarning, match=r"other settings \(tokens\)"):
        again.prepare(model, [1])
    assert again.last_report[1]["status"] == "computed"


def test_lookup_only_mode_finds_what_kedit_stats_computed(model, small_corpus, tmp_path):
    with pytest.raises(KeditError, match="no cached statistics for layer 1.*kedit stats"):
        CachedCovariance(None, tmp_path, progress=False).prepare(model, [1])
    make_source(small_corpus, tmp_path).prepare(model, [1])
    found = CachedCovariance(None, tmp_path, progress=False)
    assert found.moment(model, 1).count == 400
    make_source(small_corpus, tmp_path, tokens=300).prepare(model, [1])
    with pytest.raises(KeditError, match="several cached statistics fit layer 1"):
        CachedCovariance(None, tmp_path, progress=False).prepare(model, [1])
    assert CachedCovariance(None, tmp_path, tokens=300, progress=False).moment(model, 1).count == 300


def test_moments_stay_pinned_to_the_model_as_prepared(model, small_corpus, tmp_path):
    source = make_source(small_corpus, tmp_path)
    before = source.moment(model, 1).mom2.clone()
    name = model.adapter.mlp_out_weight_name(1)
    param = dict(model.model.named_parameters())[name]
    with apply_deltas(model.model, Deltas({name: torch.full_like(param, 0.01)})):
        assert torch.equal(source.moment(model, 1).mom2, before)  # no recomputation for the edited model


def parse(argv):
    parser = argparse.ArgumentParser()
    add_stats_arguments(parser)
    return parser.parse_args(argv)


def test_cli_options_cov_files_and_the_cache_as_fallback(model, small_corpus, tmp_path):
    # --cov alone: exactly the old behaviour.
    cov_file = tmp_path / "l2.safetensors"
    from safetensors.torch import save_file

    save_file({"mom2": torch.eye(128)}, str(cov_file))
    only_files = source_from_args(parse(["--cov", f"2={cov_file}"]))
    assert isinstance(only_files, FileCovariance) and only_files.fallback is None
    with pytest.raises(KeditError, match=r"no covariance file given for layer\(s\) \[1\]"):
        only_files.prepare(model, [1, 2])

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(small_corpus))
    args = parse(["--cov", f"2={cov_file}", "--corpus", str(corpus), "--tokens", "400", "--stats-dir",
                  str(tmp_path / "stats"), "--stats-batch-tokens", "128"])
    source = source_from_args(args)
    assert isinstance(source.fallback, CachedCovariance) and source.fallback.tokens == 400
    source.prepare(model, [1, 2])
    assert torch.equal(source.moment(model, 2).mom2, torch.eye(128))
    assert source.moment(model, 1).count == 400
    assert source.fallback.last_report[1]["status"] == "computed" and 2 not in source.fallback.last_report


def test_tokenizer_fingerprint_is_stable_and_tells_tokenizers_apart():
    from kedit_core.stats.collect import tokenizer_fingerprint
    from kedit_core.testing import test_tokenizer

    tok = test_tokenizer()
    before = tokenizer_fingerprint(tok)
    tok(["a long text " * 50], truncation=True, max_length=8)  # sets truncation state on the backend
    assert tokenizer_fingerprint(tok) == before
    assert tokenizer_fingerprint(test_tokenizer(add_bos=True)) != before


def test_a_copy_of_the_model_elsewhere_reuses_the_files(small_corpus, tmp_path, monkeypatch):
    """The cache is keyed by the weights' fingerprint, not the model's name or path."""
    from kedit_core.models import load_model
    from kedit_core.testing import save_tiny_model

    first = save_tiny_model("llama", tmp_path / "here", num_layers=3, hidden_size=32, context_length=32)
    source = make_source(small_corpus, tmp_path / "stats")
    model = load_model(first, device="cpu")
    source.prepare(model, [1])
    import shutil

    copy = load_model(shutil.copytree(first, tmp_path / "elsewhere" / "renamed"), device="cpu")
    assert copy.source != model.source and copy.fingerprint() == model.fingerprint()
    forbid_computing(monkeypatch)
    again = make_source(small_corpus, tmp_path / "stats")
    again.prepare(copy, [1])
    assert again.path_for(copy, 1) == source.path_for(model, 1)
