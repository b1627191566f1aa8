"""Numerical faults and models that cannot be used: each a clear error, and after every failed edit the
model's weights are bit-identical (docs/RELIABILITY.md, "Numerical faults" and "Models")."""
import json

import pytest
import torch

import kedit_core as kedit
from kedit_core import Deltas
from kedit_core.errors import AdapterNotFoundError, KeditError, NumericalError, RecordError
from kedit_core.stats import InMemoryCovariance
from kedit_core.testing import save_tiny_model, tiny_model
from kedit_core.testing import test_tokenizer as make_test_tokenizer  # (its own name: collected as a test)

from .conftest import edit, identity_covariance, weights_sha256


def fails_unchanged(model, error, words, **kwargs):
    before = weights_sha256(model.model)
    with pytest.raises(error, match=words):
        edit(model, **kwargs)
    assert weights_sha256(model.model) == before


def test_a_value_optimisation_that_diverges_to_nan(tiny):
    # finite settings that pass validation, but steps of 1e30 overflow float32 inside the forward pass
    fails_unchanged(tiny, NumericalError, r"editor 'memit' computed NaN or infinite values for "
                                          r"transformer.h.1.mlp.c_proj.weight; nothing was applied",
                    v_lr=1e30, clamp_norm_factor=1e30)


@pytest.mark.parametrize("mode", ["fast", "reference"])
@pytest.mark.parametrize("scale", [0.0, -1.0])
def test_all_zero_or_negative_c0(tiny, mode, scale):
    fails_unchanged(tiny, NumericalError, r"layer 1 \(in memory\) are not a second moment",
                    stats=identity_covariance(tiny, scale=scale), mode=mode)


def test_singular_and_indefinite_c0_with_a_positive_diagonal(tiny):
    d = tiny.adapter.key_size
    v = torch.randn(d, 1, generator=torch.Generator().manual_seed(0))
    singular = v @ v.T                                   # rank one; C + K Kᵀ has rank <= 3 < d
    indefinite = torch.eye(d) + 2.0 * (torch.ones(d, d) - torch.eye(d)) / d * d   # eigenvalue 1 - 2 < 0
    for c0 in (singular, indefinite):
        fails_unchanged(tiny, NumericalError, r"layer 1: C \+ K Kᵀ is not positive definite",
                        stats=InMemoryCovariance({1: c0}))


def test_bf16_overflow_when_applying_deltas_leaves_the_model_unchanged():
    model = tiny_model("gpt2", num_layers=2, hidden_size=32, context_length=64, dtype=torch.bfloat16)
    name = "transformer.h.1.mlp.c_proj.weight"
    weight = dict(model.model.named_parameters())[name]
    delta = torch.zeros(weight.shape, dtype=torch.float32)
    delta[0, 0] = 3.4e38                                 # finite in float32, beyond bfloat16's range once added
    before = weights_sha256(model.model)
    with pytest.raises(NumericalError, match=rf"adding the delta to {name} gives NaN or infinite values in bfloat16"):
        Deltas({name: delta}).apply(model.model, check_fingerprint=False)
    assert weights_sha256(model.model) == before


# -- models --------------------------------------------------------------------------------------------

def test_a_missing_model_path(tmp_path):
    with pytest.raises(KeditError, match=r"could not load model '.*nope': the path does not exist"):
        kedit.load_model(tmp_path / "nope", device="cpu")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(KeditError, match=r"the path is a file, not a model directory"):
        kedit.load_model(tmp_path / "weights.bin", device="cpu")


def test_an_unsupported_architecture(tmp_path):
    from transformers import BertConfig, BertLMHeadModel

    config = BertConfig(vocab_size=4096, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, is_decoder=True)
    BertLMHeadModel(config).save_pretrained(tmp_path / "bert")
    make_test_tokenizer().save_pretrained(tmp_path / "bert")
    with pytest.raises(AdapterNotFoundError, match=r"no kedit model adapter for config class 'BertConfig'"):
        kedit.load_model(tmp_path / "bert", device="cpu")


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_or_truncated_safetensors_weights(tmp_path, damage):
    directory = save_tiny_model("gpt2", tmp_path / "m", num_layers=1, hidden_size=32)
    weights = directory / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2] if damage == "truncate" else b"\x10\x00\x00\x00" + b"garbage!" * 8)
    with pytest.raises(KeditError, match=r"could not load model .*: its weights file is corrupt or truncated"):
        kedit.load_model(directory, device="cpu")


def tiny_gguf(path):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("cut", ["half", "magic-only", "empty"])
def test_a_truncated_or_corrupt_gguf_file(tmp_path, monkeypatch, cut):
    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path / "cache"))
    data = tiny_gguf(tmp_path / "ok.gguf").read_bytes()
    content = {"half": data[: len(data) // 2], "magic-only": b"GGUF\x03\x00\x00\x00" + b"\xff" * 16, "empty": b""}[cut]
    (tmp_path / "bad.gguf").write_bytes(content)
    with pytest.raises(KeditError, match=r"bad.gguf: not a GGUF language model transformers can read"):
        kedit.load_model(tmp_path / "bad.gguf", device="cpu")
    assert not list((tmp_path / "cache").glob("models/*"))          # nothing half-built is left to be reused


def test_a_corrupt_cached_checkpoint_is_rebuilt(tmp_path, monkeypatch):
    import kedit_core.zoo as zoo

    monkeypatch.setenv("KEDIT_CACHE", str(tmp_path / "cache"))
    built = []

    def dequantize(gguf):              # stands for the slow GGUF read: a tiny model, the same each time
        built.append(gguf)
        m = tiny_model("gpt2", num_layers=1, hidden_size=32)
        return m.model, m.tokenizer

    monkeypatch.setattr(zoo, "_dequantize", dequantize)
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"stand-in for a GGUF file")
    # (taken now: transformers maps the weights file, so damaging it in place below changes this model too)
    fingerprint = kedit.load_model(gguf_file, device="cpu").fingerprint()
    directory = zoo.checkpoint_from_gguf(gguf_file)
    assert len(built) == 1
    for damage, words in (("flip", "content does not match its sha256"), ("truncate", "has \\d+ bytes, the manifest"),
                          ("escape", "names a file outside the directory")):
        weights = directory / "model.safetensors"
        if damage == "flip":
            data = bytearray(weights.read_bytes())
            data[-3] ^= 0x10
            weights.write_bytes(bytes(data))
        elif damage == "truncate":
            weights.write_bytes(weights.read_bytes()[:-100])
        else:
            manifest = json.loads((directory / zoo.MANIFEST).read_text())
            manifest["files"]["../../outside"] = {"size": 1, "sha256": "0"}
            (directory / zoo.MANIFEST).write_text(json.dumps(manifest))
        with pytest.warns(RuntimeWarning, match=rf"cached checkpoint .* is unusable \(.*{words}.*\); rebuilding"):
            again = kedit.load_model(gguf_file, device="cpu")
        assert again.fingerprint() == fingerprint
    assert len(built) == 4


def test_a_tokenizer_without_the_subjects_tokens(toy):
    before = weights_sha256(toy.model)
    for field, request in (("subject", kedit.EditRequest("{} was born in", "Zorblax Quux", "Oslo")),
                           ("target_new", kedit.EditRequest("{} was born in", toy_subject(toy), "Atlantis"))):
        with pytest.raises(RecordError, match=rf"record 0, field '{field}': the tokenizer knows none of .*: every "
                                              r"token is its unknown token '<unk>'"):
            kedit.compute_edit(toy, [request], "memit", context=kedit.EditContext(progress=False))
    assert weights_sha256(toy.model) == before


def toy_subject(toy) -> str:
    from kedit_core import toyworld

    return toyworld.load_world(toy.source).subjects[0]


def test_a_conversion_parses_each_gguf_file_once_and_restores_gguf(tmp_path):
    """transformers parses the file for the tokenizer, each config read and the weights; inside
    ``_gguf_parsed_once`` those calls share one reader (and one tensor-name map), and gguf is restored after."""
    import gguf

    import kedit_core.zoo as zoo

    from transformers import modeling_gguf_pytorch_utils as hf_gguf

    path = tiny_gguf(tmp_path / "m.gguf")
    real_reader, real_map, real_checkpoint = gguf.GGUFReader, gguf.get_tensor_name_map, hf_gguf.load_gguf_checkpoint
    with zoo._gguf_parsed_once():
        # metadata is converted once and handed out as copies a caller may change
        first = hf_gguf.load_gguf_checkpoint(str(path))
        assert set(first) >= {"config", "tokenizer"}
        first["config"] = "changed by a caller"
        assert hf_gguf.load_gguf_checkpoint(path)["config"] != "changed by a caller"
        first, second = gguf.GGUFReader(str(path)), gguf.GGUFReader(path)
        assert first is second and isinstance(first, real_reader)
        assert "token_embd.weight" in [t.name for t in first.tensors]
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
    assert gguf.GGUFReader is real_reader and gguf.get_tensor_name_map is real_map
    assert hf_gguf.load_gguf_checkpoint is real_checkpoint
    assert gguf.GGUFReader(path) is not gguf.GGUFReader(path)
    with pytest.raises(RuntimeError), zoo._gguf_parsed_once():
        raise RuntimeError("a failed conversion")
    assert gguf.GGUFReader is real_reader and gguf.get_tensor_name_map is real_map
