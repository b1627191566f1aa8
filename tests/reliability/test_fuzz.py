"""Property-based fuzzing (hypothesis) of the readers of everything a user hands kedit: request and
evaluation files, hyper-parameters (files, dicts and --set flags), delta files, statistics caches and
covariance files. Any input either loads or raises kedit's own error type (KeditError), never another
exception, and never hangs (a deadline per example).

The examples are derandomised, so CI runs the same ones every time, and bounded (about 20 s in all on
the 2-core CI machine, far under the 60 s budget). KEDIT_FUZZ_SCALE=20 runs twenty times as many, with
fresh randomness, for a longer local search."""
import json
import os
import struct
from datetime import timedelta

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kedit_core import Deltas
from kedit_core.errors import HyperParamsError, KeditError
from kedit_core.evaluation.datasets import cases_from_records
from kedit_core.hparams import parse_assignments
from kedit_core.requests import load_requests, requests_from_records
from kedit_core.stats import read_cache_file, read_moment_file
from kedit_core.tensorfile import atomic_save_safetensors, tensor_sha256

SCALE = int(os.environ.get("KEDIT_FUZZ_SCALE", "1"))


def fuzz(examples: int):
    return settings(max_examples=examples * SCALE, deadline=timedelta(seconds=5), derandomize=SCALE == 1,
                    database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# JSON values, with the keys and shapes the loaders look for mixed in so the search gets past the first check
KEYS = ["prompt", "subject", "target_new", "target_true", "requested_rewrite", "src", "loc", "loc_ans", "answers",
        "alt", "rephrase", "paraphrase_prompts", "neighborhood_prompts", "case_id", "relation_id", "str", "id"]
TEXT = st.one_of(st.text(max_size=30), st.sampled_from(["{}", "{} plays", "LeBron James", " ", "", "\u200b",
                                                         "The {} of {}", "nq question: who"]))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), TEXT)
JSON = st.recursive(SCALARS, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)),
                                                    children, max_size=6)), max_leaves=25)


def loads_or_kedit_error(call):
    try:
        return call()
    except KeditError:
        return None


@fuzz(300)
@given(records=st.lists(JSON, max_size=5), fmt=st.sampled_from(["auto", "counterfact", "zsre", "plain", "nope"]))
def test_request_records(records, fmt):
    loads_or_kedit_error(lambda: requests_from_records(records, fmt, source="fuzz.json"))
    loads_or_kedit_error(lambda: cases_from_records(records, fmt if fmt != "plain" else "auto", source="fuzz.json"))


@fuzz(150)
@given(content=st.one_of(st.binary(max_size=200), JSON.map(lambda v: json.dumps(v).encode()),
                         st.lists(JSON, max_size=4).map(lambda v: "\n".join(map(json.dumps, v)).encode())),
       suffix=st.sampled_from([".json", ".jsonl"]))
def test_request_files(tmp_path_factory, content, suffix):
    path = tmp_path_factory.mktemp("req") / f"requests{suffix}"
    path.write_bytes(content)
    loads_or_kedit_error(lambda: load_requests(path))


@pytest.fixture(scope="module")
def hparams_classes():
    from kedit_core.editors import list_editors

    return [cls.HParams for cls in list_editors().values()]


HP_KEYS = st.sampled_from(["layers", "v_lr", "v_num_grad_steps", "mom2_update_weight", "clamp_norm_factor", "mode",
                           "solver", "fact_token", "rewrite_module_tmp", "kl_factor", "lr", "num_steps",
                           "norm_constraint", "mom2_adjustment", "value_batch_size", "emmet_lambda", "unknown"])


@fuzz(300)
@given(data=st.dictionaries(HP_KEYS, JSON, max_size=5), which=st.integers(0, 20))
def test_hyper_parameter_dicts(hparams_classes, data, which):
    cls = hparams_classes[which % len(hparams_classes)]
    loads_or_kedit_error(lambda: cls.from_dict(data, source="fuzz.json"))


@fuzz(200)
@given(flags=st.lists(st.one_of(st.text(max_size=20), st.tuples(HP_KEYS, st.one_of(
    st.text(max_size=12), JSON.map(json.dumps))).map("=".join)), max_size=3), which=st.integers(0, 20))
def test_hyper_parameter_flags(hparams_classes, flags, which):
    cls = hparams_classes[which % len(hparams_classes)]
    try:
        overrides = parse_assignments(cls, flags)
        cls().replace(**overrides)
    except HyperParamsError:
        pass


# -- tensor files: mutations of valid files, and headers written by hand ---------------------------------

@pytest.fixture(scope="module")
def valid_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("valid")
    Deltas({"transformer.h.1.mlp.c_proj.weight": torch.randn(8, 4)}, editor="memit").save(root / "d.safetensors")
    mom2 = torch.eye(4, dtype=torch.float32) * 2
    meta = {"format": "kedit-stats/1", "layer": 1, "module": "transformer.h.1.mlp.c_proj", "count": 10,
            "mom2_sha256": tensor_sha256(mom2)}
    atomic_save_safetensors({"mom2": mom2, "count": torch.tensor([10])}, root / "s.safetensors", meta)
    return {"delta": (root / "d.safetensors").read_bytes(), "stats": (root / "s.safetensors").read_bytes()}


def mutated(data: bytes, edits) -> bytes:
    buf = bytearray(data)
    for kind, position, value in edits:
        position %= max(len(buf), 1)
        if kind == "flip" and buf:
            buf[position] ^= 1 << (value % 8)
        elif kind == "set" and buf:
            buf[position] = value % 256
        elif kind == "cut":
            del buf[position:]
        elif kind == "insert":
            buf[position:position] = bytes([value % 256]) * (1 + value % 7)
    return bytes(buf)


EDITS = st.lists(st.tuples(st.sampled_from(["flip", "set", "cut", "insert"]), st.integers(0, 1 << 16),
                           st.integers(0, 255)), min_size=1, max_size=4)


def read_all(path, kind):
    if kind == "delta":
        loads_or_kedit_error(lambda: Deltas.load(path))
    else:
        loads_or_kedit_error(lambda: read_cache_file(path, expected_dim=4))
        loads_or_kedit_error(lambda: read_moment_file(path, expected_dim=4))


@fuzz(300)
@given(kind=st.sampled_from(["delta", "stats"]), edits=EDITS)
def test_mutated_tensor_files(tmp_path_factory, valid_files, kind, edits):
    path = tmp_path_factory.mktemp("mut") / "f.safetensors"
    path.write_bytes(mutated(valid_files[kind], edits))
    read_all(path, kind)


DTYPE_SIZES = {"F32": 4, "F64": 8, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "BOOL": 1, "U8": 1}
NAMES = st.one_of(st.sampled_from(["mom2", "count", "transformer.h.1.mlp.c_proj.weight", "../x", "a/b", "x..y"]),
                  st.text(max_size=10))
META_FIELDS = st.fixed_dictionaries({}, optional={
    "format": st.sampled_from(["kedit-deltas/1", "kedit-stats/1", "kedit-stats-partial/1", "other"]),
    "editor": JSON, "hparams": JSON, "extra": JSON, "requests_sha256": JSON, "base_fingerprint": JSON,
    "tensors_sha256": st.one_of(JSON, st.dictionaries(NAMES, st.text(max_size=64), max_size=3)),
    "layer": JSON, "module": st.one_of(NAMES, JSON), "count": JSON, "mom2_sha256": JSON})


@fuzz(300)
@given(tensors=st.dictionaries(NAMES, st.tuples(st.sampled_from(sorted(DTYPE_SIZES)),
                                                st.lists(st.integers(0, 5), max_size=3)), max_size=3),
       meta=st.one_of(META_FIELDS, JSON), raw_meta=st.booleans(), data=st.binary(min_size=0, max_size=16),
       length_delta=st.sampled_from([0, 0, 0, -1, 1, 8]), kind=st.sampled_from(["delta", "stats"]))
def test_hand_written_headers(tmp_path_factory, tensors, meta, raw_meta, data, length_delta, kind):
    """Headers that are valid safetensors with any names, dtypes, shapes and kedit metadata (or not quite
    valid: a header length off by a little), as a careless or hostile writer could make them."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        size = DTYPE_SIZES[dtype]
        for dim in shape:
            size *= dim
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"kedit": json.dumps(meta) if not raw_meta else str(meta)[:50]}
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    body = (data * (offset // max(len(data), 1) + 1))[:offset] if data else bytes(offset)
    path = tmp_path_factory.mktemp("hdr") / "f.safetensors"
    path.write_bytes(struct.pack("<Q", max(len(head) + length_delta, 0)) + head + body)
    read_all(path, kind)
