"""Delta files, statistics caches and covariance files that are damaged, tampered with, made for another
model or crafted to escape a directory or exhaust memory (docs/RELIABILITY.md, "Statistics caches",
"Delta files", "Security")."""
import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import save_file

from kedit_core import Deltas
from kedit_core.errors import FingerprintMismatchError, KeditError, TensorFileError
from kedit_core.stats import CachedCovariance, read_cache_file, read_moment_file
from kedit_core.stats.cache import CacheFileError
from kedit_core.tensorfile import TensorFile, atomic_save_safetensors, open_tensor_file
from kedit_core.testing import tiny_model

from .conftest import edit, weights_sha256

TEXTS = ["The quick brown fox jumps over the lazy dog near the river bank.",
         "Paris is the capital of France and Berlin the capital of Germany.",
         "A tiny model reads a tiny corpus; statistics are cheap to compute here."] * 4


def raw_safetensors(path, tensors: dict, metadata: dict | None = None, *, claimed_size: int | None = None):
    """A safetensors file written by hand: ``tensors`` maps name -> (dtype, shape, bytes or None). With
    ``claimed_size`` the file is extended sparsely to that many data bytes (no disk, no memory used)."""
    header, offset, blobs = {}, 0, []
    for name, (dtype, shape, data) in tensors.items():
        size = len(data) if data is not None else claimed_size
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
        blobs.append(data or b"")
    if metadata is not None:
        header["__metadata__"] = {"kedit": json.dumps(metadata)}
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for blob in blobs:
            f.write(blob)
        f.truncate(8 + len(head) + offset)
    return path


@pytest.fixture
def no_tensor_read(monkeypatch):
    """Fails the test if any tensor of a tensor file is read (so 'rejected before allocation' is checked)."""
    def refuse(self, name):
        raise AssertionError(f"tensor {name!r} of {self.path} was read")

    monkeypatch.setattr(TensorFile, "get", refuse)


# -- delta files -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved_deltas(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("deltas") / "edit.safetensors"
    edit(tiny).deltas.save(path)
    return path


def test_a_saved_delta_file_round_trips_and_records_tensor_hashes(saved_deltas, tiny):
    deltas = Deltas.load(saved_deltas, model=tiny.model)
    assert deltas.editor == "memit" and deltas.names() == ["transformer.h.1.mlp.c_proj.weight"]


def test_a_tampered_tensor_no_longer_matches_its_hash(saved_deltas, tmp_path):
    data = bytearray(saved_deltas.read_bytes())
    data[-5] ^= 0x01                                  # one bit of the last float; the header is intact
    (tmp_path / "t.safetensors").write_bytes(bytes(data))
    with pytest.raises(TensorFileError, match=r"tensor 'transformer.h.1.mlp.c_proj.weight': its bytes do not match "
                                              r"the sha256 recorded when the file was written"):
        Deltas.load(tmp_path / "t.safetensors")


@pytest.mark.parametrize("change, words", [
    ({"editor": 5}, r"metadata field 'editor' is 5; expected str"),
    ({"format": "kedit-deltas/9"}, r"not a kedit delta file \(metadata format='kedit-deltas/9'"),
    ({"tensors_sha256": None}, r"metadata field 'tensors_sha256' is None; expected dict"),
    ({"tensors_sha256": {"other.weight": "0"}}, r"the recorded tensor hashes name \['other.weight'\]"),
    ({"hparams": "../../etc"}, r"metadata field 'hparams'"),
    ({"requests_sha256": ...}, r"metadata field 'requests_sha256' is missing"),   # found by the fuzzer
])
def test_tampered_metadata_is_refused(saved_deltas, tmp_path, change, words):
    loaded = Deltas.load(saved_deltas)
    with open_tensor_file(saved_deltas) as f:
        meta = {k: v for k, v in {**f.meta, **change}.items() if v is not ...}
    atomic_save_safetensors(loaded.tensors, tmp_path / "m.safetensors", meta)
    with pytest.raises(TensorFileError, match=words):
        Deltas.load(tmp_path / "m.safetensors")


def test_deltas_for_another_model_or_dtype_are_refused(saved_deltas, tiny):
    deltas = Deltas.load(saved_deltas)
    other = tiny_model("gpt2", num_layers=2, hidden_size=32, context_length=64, seed=1)
    for model in (other, tiny_model("gpt2", num_layers=2, hidden_size=32, context_length=64, dtype=torch.bfloat16)):
        before = weights_sha256(model.model)
        with pytest.raises(FingerprintMismatchError, match="were computed for the model with fingerprint"):
            deltas.apply(model.model)
        assert weights_sha256(model.model) == before
    bf16 = model
    with deltas.apply(bf16.model, check_fingerprint=False):   # forced: added in float32, rounded once to bf16
        assert weights_sha256(bf16.model) != before
    assert weights_sha256(bf16.model) == before


def test_path_like_tensor_names_are_refused_before_reading(tmp_path, no_tensor_read):
    for name in ("../../etc/passwd", "/abs/path", "a/../b", "x..y", ""):
        path = raw_safetensors(tmp_path / "p.safetensors", {name: ("F32", [1], b"\0\0\0\0")},
                               {"format": "kedit-deltas/1"})
        with pytest.raises(TensorFileError, match=r"tensor name .* is not a plain dotted name"):
            Deltas.load(path)


def test_absurd_shapes_are_refused_before_allocation(tmp_path, no_tensor_read):
    # 2^20 x 2^20 float32 claims 4 TiB: a sparse file of that size takes no disk; reading it would end the test
    path = raw_safetensors(tmp_path / "huge.safetensors", {"w.weight": ("F32", [1 << 20, 1 << 20], None)},
                           {"format": "kedit-deltas/1"}, claimed_size=4 << 40)
    with pytest.raises(TensorFileError, match=r"claims shape \[1048576, 1048576\], beyond what kedit reads"):
        Deltas.load(path)


def test_a_delta_of_the_wrong_shape_for_the_model_is_refused_before_reading(saved_deltas, tmp_path, tiny):
    deltas = Deltas.load(saved_deltas)
    name = deltas.names()[0]
    wrong = Deltas({name: torch.zeros(3, 3)}, editor="memit")
    wrong.save(tmp_path / "w.safetensors")
    with pytest.raises(KeditError, match=rf"the delta for {name} has shape \[3, 3\]; the model's parameter has"):
        Deltas.load(tmp_path / "w.safetensors", model=tiny.model)


def test_integer_nan_and_truncated_deltas(saved_deltas, tmp_path):
    Deltas({"w.weight": torch.ones(2, dtype=torch.int64)}).save(tmp_path / "i.safetensors")
    with pytest.raises(TensorFileError, match="has dtype I64; deltas are floating point"):
        Deltas.load(tmp_path / "i.safetensors")
    Deltas({"w.weight": torch.tensor([1.0, float("nan")])}).save(tmp_path / "n.safetensors")
    with pytest.raises(TensorFileError, match="holds NaN or infinite values"):
        Deltas.load(tmp_path / "n.safetensors")
    good = saved_deltas.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(TensorFileError, match="is not a readable safetensors delta file"):
        Deltas.load(tmp_path / "cut.safetensors")


# -- statistics caches ---------------------------------------------------------------------------------

def source(tmp_path, **kw):
    return CachedCovariance(TEXTS, tmp_path / "stats", tokens=200, progress=False, **kw)


@pytest.fixture
def cached(tiny, tmp_path):
    first = source(tmp_path)
    first.prepare(tiny, [0, 1])
    return first, first.path_for(tiny, 1)


def rewritten(path, **meta_changes):
    mom2, count, meta = read_cache_file(path)
    atomic_save_safetensors({"mom2": meta_changes.pop("mom2", mom2), "count": torch.tensor([count])}, path,
                            {**meta, **meta_changes})


def recomputes(tiny, tmp_path, words):
    again = source(tmp_path)
    with pytest.warns(RuntimeWarning, match=words):
        again.prepare(tiny, [1])
    assert again.last_report[1]["status"] == "computed"
    return again


def test_a_file_of_another_layer_is_not_used(tiny, tmp_path, cached):
    first, path = cached
    shutil.copyfile(first.path_for(tiny, 0), path)
    recomputes(tiny, tmp_path, r"made with other settings \(layer, module\)")


def test_a_file_of_another_model_is_not_used(tiny, tmp_path, cached):
    first, path = cached
    rewritten(path, model_fingerprint="sha256:" + "0" * 64)
    recomputes(tiny, tmp_path, r"other settings \(model_fingerprint\)")


def test_nan_inside_is_not_used_even_with_a_matching_hash(tiny, tmp_path, cached):
    from kedit_core.tensorfile import tensor_sha256

    _, path = cached
    mom2, _, _ = read_cache_file(path)
    mom2[0, 0] = float("nan")
    rewritten(path, mom2=mom2, mom2_sha256=tensor_sha256(mom2))
    recomputes(tiny, tmp_path, "corrupt or truncated.*mom2 contains NaN or infinite values.*recomputing")


@pytest.mark.parametrize("change, words", [({"kedit_version": "99.0.0"}, r"other settings \(kedit_version\)"),
                                           ({"format": "kedit-stats/2"}, r"not a kedit statistics file")])
def test_a_file_from_a_newer_kedit_is_not_used(tiny, tmp_path, cached, change, words):
    rewritten(cached[1], **change)
    recomputes(tiny, tmp_path, words)


def test_path_like_module_name_in_metadata_is_refused(tiny, tmp_path, cached):
    rewritten(cached[1], module="../../../etc/passwd")
    with pytest.raises(CacheFileError, match="module name in the metadata '../../../etc/passwd' is not a plain"):
        read_cache_file(cached[1])
    recomputes(tiny, tmp_path, "is not a plain dotted name")


def test_an_absurd_shape_in_a_cache_header_is_refused_before_allocation(tiny, tmp_path, cached, no_tensor_read):
    _, path = cached
    n = 100_000                                              # 80 GB of float64, claimed by a sparse file
    raw_safetensors(path, {"count": ("I64", [1], struct.pack("<q", 5)), "mom2": ("F64", [n, n], None)},
                    {"format": "kedit-stats/1", "layer": 1, "module": "transformer.h.1.mlp.c_proj"},
                    claimed_size=8 * n * n)
    with pytest.raises(CacheFileError, match=rf"claims shape \[{n}, {n}\]|mom2 is {n}x{n}"):
        read_cache_file(path, expected_dim=tiny.adapter.key_size)
    recomputes(tiny, tmp_path, r"corrupt or truncated.*claims shape \[100000, 100000\]")


# -- covariance files given with --cov ------------------------------------------------------------------

@pytest.mark.parametrize("tensors, words", [
    ({"mom2": torch.eye(4)}, r"'mom2' is 4x4 but the model's keys have dimension 128"),
    ({"mom2": torch.zeros(128, 64)}, r"'mom2' must be a square matrix; got shape \[128, 64\]"),
    ({"cov": torch.eye(128)}, r"expected a tensor named 'mom2'; found \['cov'\]"),
    ({"mom2": torch.full((128, 128), float("nan"))}, r"'mom2' contains NaN or infinite values"),
    ({"mom2": torch.eye(128, dtype=torch.int32)}, r"'mom2' has dtype I32"),
    ({"mom2": torch.eye(128), "count": torch.zeros(0)}, r"'count' has shape \[0\]; expected one number"),
])
def test_bad_covariance_files(tmp_path, tensors, words):
    save_file(tensors, tmp_path / "c.safetensors")
    with pytest.raises(KeditError, match=words):
        read_moment_file(tmp_path / "c.safetensors", expected_dim=128)
