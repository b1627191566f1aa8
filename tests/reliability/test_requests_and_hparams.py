"""Bad request files and bad hyper-parameters: each a one-line error naming the file, record and field
(docs/RELIABILITY.md, sections "Request files" and "Hyper-parameters")."""
import json

import pytest

import kedit_core as kedit
from kedit_core.errors import EditConflictError, HyperParamsError, RecordError
from kedit_core.hparams import parse_assignments
from kedit_core.requests import check_conflicts, load_requests

from .conftest import edit, requests, weights_sha256

GOOD = {"prompt": "The sport played by {}", "subject": "LeBron James", "target_new": "football"}


def write(tmp_path, records, name="requests.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


@pytest.mark.parametrize("field", ["prompt", "subject", "target_new"])
def test_every_missing_field_is_named(tmp_path, field):
    record = {k: v for k, v in GOOD.items() if k != field}
    with pytest.raises(RecordError, match=rf"requests.json, record 1, field '{field}': missing"):
        load_requests(write(tmp_path, [GOOD, record]))


@pytest.mark.parametrize("field, value, words", [
    ("prompt", ["{} plays"], "expected a string"), ("subject", 5, "expected a non-empty string"),
    ("target_new", {"str": 3}, "expected a non-empty string"), ("subject", None, "expected a non-empty string")])
def test_wrong_types_are_named(tmp_path, field, value, words):
    with pytest.raises(RecordError, match=rf"record 0, field '{field}': {words}"):
        load_requests(write(tmp_path, [dict(GOOD, **{field: value})]))


@pytest.mark.parametrize("field, value", [("subject", ""), ("subject", "   "), ("target_new", "\t\n"),
                                          ("subject", "\u00a0"), ("subject", "\u200b\u200d"), ("target_new", "\x00")])
def test_empty_blank_and_invisible_strings_are_refused(tmp_path, field, value):
    with pytest.raises(RecordError, match=rf"field '{field}': expected a non-empty string with a visible character"):
        load_requests(write(tmp_path, [dict(GOOD, **{field: value})]))


@pytest.mark.parametrize("prompt, found", [("The sport played by", 0), ("{} plays {} with {}", 3)])
def test_prompt_needs_exactly_one_slot(tmp_path, prompt, found):
    with pytest.raises(RecordError, match=rf"field 'prompt': expected exactly one '{{}}'.*found {found}"):
        load_requests(write(tmp_path, [dict(GOOD, prompt=prompt)]))


def test_subject_missing_from_a_zsre_question(tmp_path):
    record = {"src": "Which sport does he play?", "subject": "LeBron James", "answers": ["football"],
              "loc": "nq question: who", "loc_ans": "x", "rephrase": "What does he play?"}
    with pytest.raises(RecordError, match=r"record 0, field 'src': the subject 'LeBron James' does not occur"):
        load_requests(write(tmp_path, [record]))


def test_unicode_and_whitespace_oddities_load_as_written(tmp_path):
    path = tmp_path / "bom.json"   # a byte-order mark, NFC/NFD forms, a non-breaking space inside a name
    records = [dict(GOOD, subject="Zoë Saldaña"), dict(GOOD, subject="Zoe\u0308 Salda\u00f1a"),
               dict(GOOD, subject="Jean\u00a0Reno", target_new="  tennis ")]
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(records, ensure_ascii=False).encode("utf-8"))
    loaded = load_requests(path)
    assert [r.subject for r in loaded] == [r["subject"] for r in records]
    assert loaded[2].target_new == "  tennis "   # kept as written (one leading space is kedit's convention)


@pytest.mark.parametrize("content, words", [
    (b"\xff\xfe{\x00", "not UTF-8 text"), (b"", "not valid JSON"), (b'[{"prompt": ', "not valid JSON \\(line 1"),
    (b"[" * 100_000, "nested too deeply"), (b"42", "expected a JSON list of records")])
def test_unreadable_files_name_the_file(tmp_path, content, words):
    path = tmp_path / "broken.json"
    path.write_bytes(content)
    with pytest.raises(RecordError, match=rf"broken.json.*{words}"):
        load_requests(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(RecordError, match="request file not found"):
        load_requests(tmp_path / "nope.json")
    with pytest.raises(RecordError, match="expected a request file; found a directory"):
        load_requests(tmp_path)


def test_jsonl_bad_line_and_unknown_format(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{oops\n")
    with pytest.raises(RecordError, match=r"r.jsonl, line 2: not valid JSON"):
        load_requests(path)
    with pytest.raises(RecordError, match=r"record 1: cannot tell the format"):
        load_requests(write(tmp_path, [GOOD, {"question": "?"}]))


def test_a_one_megabyte_prompt_is_refused_before_any_work(tiny, tmp_path):
    long_prompt = "word " * 200_000 + "played by {}"
    (req,) = load_requests(write(tmp_path, [dict(GOOD, prompt=long_prompt)]))   # loads: 1 MB is valid JSON
    before = weights_sha256(tiny.model)
    with pytest.raises(RecordError, match=r"record 0, field 'prompt': case 0: the prompt and target are \d+ tokens; "
                                          r"the model reads at most 64"):
        edit(tiny, [req])
    assert weights_sha256(tiny.model) == before


def test_duplicate_edits_warn_and_conflicting_edits_fail_naming_both():
    a, b = requests()
    warnings = check_conflicts([a, b, a])
    assert any("requests 0 (case 0) and 2 (case 0) are the same edit" in w for w in warnings)
    other = kedit.EditRequest(a.prompt, a.subject, "tennis", case_id=7)
    with pytest.raises(EditConflictError, match=r"requests 0 \(case 0\) and 2 \(case 7\).*' football' vs ' tennis'"):
        check_conflicts([a, b, other])


# -- hyper-parameters --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hp_cls():
    return kedit.get_editor("memit").HParams


def test_unknown_key_names_it_and_the_valid_keys(hp_cls, tmp_path):
    path = tmp_path / "hp.json"
    path.write_text(json.dumps({"layers": [1], "v_lrr": 0.1}))
    with pytest.raises(HyperParamsError, match=r"hp.json: unknown key\(s\) \['v_lrr'\] for MemitHParams; valid keys"):
        hp_cls.from_json(path)


@pytest.mark.parametrize("text, words", [
    ('{"v_lr": "fast"}', r"MemitHParams.v_lr: expected a number; got 'fast'"),
    ('{"v_num_grad_steps": 2.5}', r"v_num_grad_steps: expected an integer"),
    ('{"v_lr": NaN}', r"v_lr: expected a finite number; got nan"),
    ('{"clamp_norm_factor": Infinity}', r"clamp_norm_factor: expected a finite number; got inf"),
    ('{"mom2_update_weight": -Infinity}', r"mom2_update_weight: expected a finite number"),
    ('{"v_lr": -0.5}', r"v_lr = -0.5: must be positive"),
    ('{"v_num_grad_steps": 0}', r"v_num_grad_steps = 0: must be at least 1"),
    ('{"layers": [3, 3]}', r"layers = \[3, 3\]: must not repeat a layer"),
    ('{"layers": [-1]}', r"layer indices must be >= 0"),
    ('{"mom2_update_weight": 1e400}', r"mom2_update_weight: expected a finite number"),
    ('[1, 2]', r"expected an object of hyper-parameters; got list"),
    ('{"v_lr": ', r"not valid JSON"),
])
def test_wrong_type_and_bad_values(hp_cls, tmp_path, text, words):
    path = tmp_path / "hp.json"
    path.write_text(text)
    with pytest.raises(HyperParamsError, match=words):
        hp_cls.from_json(path)


def test_layers_out_of_range_or_unordered_for_this_model(tiny):
    before = weights_sha256(tiny.model)
    with pytest.raises(HyperParamsError, match=r"layers = \[1, 5\]: layer\(s\) \[5\] do not exist; this model has "
                                               r"layers 0..1"):
        edit(tiny, layers=[1, 5])
    with pytest.raises(HyperParamsError, match=r"layers = \[1, 0\]: must be in ascending order"):
        edit(tiny, layers=[1, 0])
    assert weights_sha256(tiny.model) == before


def test_module_templates_that_do_not_match_the_model(tiny):
    with pytest.raises(HyperParamsError, match=r"rewrite_module_tmp = 'model.layers.\{\}.mlp.down_proj' names "
                                               r"'model.layers.1.mlp.down_proj' for layer 1.*transformer.h.1.mlp.c_proj"):
        edit(tiny, rewrite_module_tmp="model.layers.{}.mlp.down_proj")


@pytest.mark.parametrize("flag, words", [("v_lr", "expected KEY=VALUE"), ("=3", "expected KEY=VALUE"),
                                         ("v_lrr=3", "unknown key 'v_lrr'"), ("v_lr=NaN", "expected a finite number"),
                                         ("layers=[1,", r"expected list\[int\] \| None; got '\[1,'")])
def test_set_flags(hp_cls, flag, words):
    with pytest.raises(HyperParamsError, match=words):
        parse_assignments(hp_cls, [flag])


def test_missing_hparams_file(hp_cls, tmp_path):
    with pytest.raises(HyperParamsError, match="hyper-parameter file not found"):
        hp_cls.from_json(tmp_path / "nope.json")
