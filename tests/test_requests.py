import json

import pytest

from kedit_core import EditRequest, load_requests
from kedit_core.errors import EditConflictError, RecordError
from kedit_core.requests import check_conflicts, requests_sha256, superseded_by_later


def test_counterfact_loader(counterfact_path):
    reqs = load_requests(counterfact_path)
    assert len(reqs) == 546
    r = reqs[0]
    assert r.prompt == "The mother tongue of {} is" and r.subject == "Danielle Darrieux"
    assert r.target_new == " English" and r.target_true == " French" and r.relation_id == "P103"
    assert r.filled_prompt == "The mother tongue of Danielle Darrieux is"


def test_zsre_loader_follows_the_reference_conversion(zsre_path):
    reqs = load_requests(zsre_path)
    assert len(reqs) == 1037
    raw = json.loads(zsre_path.read_text())[0]
    assert reqs[0].prompt == raw["src"].replace(raw["subject"], "{}")
    assert reqs[0].target_new == " " + raw["answers"][0] and reqs[0].target_true is None
    assert load_requests(zsre_path, zsre_target="alt")[0].target_new == " " + raw["alt"]


def test_plain_json_and_jsonl(tmp_path):
    recs = [{"prompt": "{} plays the sport of", "subject": "LeBron James", "target_new": "football",
             "target_true": "basketball"}]
    (tmp_path / "a.json").write_text(json.dumps(recs))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in recs * 2) + "\n")
    a = load_requests(tmp_path / "a.json")
    b = load_requests(tmp_path / "b.jsonl")
    assert a[0].target_new == " football" and len(b) == 2 and b[1].target_true == " basketball"


@pytest.mark.parametrize("record,field,words", [
    ({"prompt": "no braces", "subject": "X", "target_new": "y"}, "prompt", "exactly one"),
    ({"prompt": "{} and {}", "subject": "X", "target_new": "y"}, "prompt", "found 2"),
    ({"prompt": "{} is", "subject": " ", "target_new": "y"}, "subject", "non-empty"),
    ({"prompt": "{} is", "subject": "X", "target_new": ""}, "target_new", "non-empty"),
    ({"prompt": "{} is", "subject": "X"}, "target_new", "missing"),
])
def test_bad_record_names_file_index_and_field(tmp_path, record, field, words):
    good = {"prompt": "{} is", "subject": "A", "target_new": "b"}
    path = tmp_path / "edits.json"
    path.write_text(json.dumps([good, good, record]))
    with pytest.raises(RecordError) as info:
        load_requests(path)
    msg = str(info.value)
    assert str(path) in msg and "record 2" in msg and f"'{field}'" in msg and words in msg


def test_bad_counterfact_record_names_nested_field(tmp_path, counterfact_path):
    recs = json.loads(counterfact_path.read_text())[:3]
    del recs[1]["requested_rewrite"]["subject"]
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(recs))
    with pytest.raises(RecordError, match=r"record 1, field 'requested_rewrite.subject'"):
        load_requests(path)


def test_invalid_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"prompt": ')
    with pytest.raises(RecordError, match="broken.json"):
        load_requests(path)


def test_target_space_and_hash():
    a = EditRequest("{} plays", "LeBron James", "football")
    b = EditRequest("{} plays", "LeBron James", " football")
    assert a == b and a.target_new == " football"
    assert requests_sha256([a]) == requests_sha256([b]) != requests_sha256([a, b])


def test_conflicts():
    a = EditRequest("{} plays the sport of", "LeBron James", "football", case_id=7)
    b = EditRequest("{} plays the sport of", "LeBron James", "tennis", case_id=9)
    c = EditRequest("{} was born in", "LeBron James", "Paris")
    with pytest.raises(EditConflictError, match="case 7.*case 9"):
        check_conflicts([a, c, b])
    warnings = check_conflicts([a, c])
    assert len(warnings) == 1 and "LeBron James" in warnings[0]
    # the words before the subject differ: different keys, no warning (zsRE questions)
    d = EditRequest("Which sport does {} play?", "LeBron James", "football")
    assert check_conflicts([a, d]) == []


def test_a_later_edit_of_the_same_subject_supersedes_an_earlier_one_through_any_prompt():
    stream = [EditRequest("{} plays the sport of", "LeBron James", "football"),
              EditRequest("{} was born in", "Tim Cook", "Paris"),
              EditRequest("Which company built {}?", "USS Leedstown", "Boeing"),
              EditRequest("Who made {}?", "USS Leedstown", "Airbus"),
              EditRequest("{} was born in", " LeBron James", "Rome"),
              EditRequest("What company built {}?", "USS Leedstown", "Toyota")]
    assert superseded_by_later(stream) == [4, None, 3, 5, None, None]
    assert superseded_by_later([]) == []
