import json

import pytest

import kedit_core
from kedit_core.requests import check_conflicts
from kedit_core.toyworld import build_world, make_records, record_fact, write_records


@pytest.fixture(scope="module")
def world():
    return build_world()


@pytest.fixture(scope="module")
def records(world):
    return make_records(world)


def test_records_are_deterministic_and_seeded(world, records):
    assert make_records(world, 50) == records[:50]
    assert make_records(world, 50, seed=1) != records[:50]


def test_records_load_unchanged_as_counterfact(tmp_path, world, records):
    path = write_records(records[:300], tmp_path / "toy_edits.json")
    assert json.loads(path.read_text())[0].keys() >= {"case_id", "requested_rewrite", "paraphrase_prompts",
                                                     "neighborhood_prompts", "attribute_prompts",
                                                     "generation_prompts"}
    requests = kedit_core.load_requests(path)        # format auto-detected: CounterFact
    assert len(requests) == 300
    for req, rec in zip(requests, records):
        rr = rec["requested_rewrite"]
        assert req.case_id == rec["case_id"] and req.relation_id == rr["relation_id"]
        assert req.subject == rr["subject"] and req.prompt == rr["prompt"]
        assert req.target_new == " " + rr["target_new"]["str"] and req.target_true == " " + rr["target_true"]["str"]


def test_records_match_the_world(world, records):
    assert len(records) == len(world.subjects)
    filled = {}
    for subject in world.subjects:
        for rel in world.relations:
            for t in rel.templates:
                filled.setdefault(t.replace("{}", subject), []).append((subject, rel.id))
    for rec in records:
        rr = rec["requested_rewrite"]
        fact = record_fact(rec)
        relation = world.relation(fact.relation_id)
        assert world.object_of(fact.subject, fact.relation_id) == fact.object
        assert rr["prompt"] in relation.templates
        assert rr["target_new"]["str"] in relation.objects and rr["target_new"]["str"] != fact.object
        others = [t.replace("{}", fact.subject) for t in relation.templates if t != rr["prompt"]]
        assert rec["paraphrase_prompts"] == others
        assert 1 <= len(rec["neighborhood_prompts"]) <= 10 and len(rec["attribute_prompts"]) >= 1
        for prompts, obj in ((rec["neighborhood_prompts"], fact.object),
                             (rec["attribute_prompts"], rr["target_new"]["str"])):
            for prompt in prompts:
                assert len(filled[prompt]) == 1 and filled[prompt][0][1] == fact.relation_id, prompt
                subject = filled[prompt][0][0]
                assert subject != fact.subject and world.object_of(subject, fact.relation_id) == obj
        assert all(fact.subject in p for p in rec["generation_prompts"])


def test_a_batch_of_1000_has_distinct_subjects_and_no_conflicts(world, records):
    requests = kedit_core.requests.requests_from_records(records[:1000])
    assert len({r.subject for r in requests}) == 1000
    assert len({(r.subject, r.relation_id) for r in requests}) == 1000
    assert check_conflicts(requests) == []
    everything = make_records(world, len(world.facts))   # all facts: subjects repeat after one round
    assert len({(r["requested_rewrite"]["subject"], r["requested_rewrite"]["relation_id"]) for r in everything}) \
        == len(world.facts)
    with pytest.raises(ValueError):
        make_records(world, len(world.facts) + 1)
