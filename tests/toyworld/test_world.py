import pytest

from kedit_core.errors import HyperParamsError
from kedit_core.toyworld import RELATIONS, WorldConfig, build_world
from kedit_core.toyworld.world import MENTION_TEMPLATES, words_of


@pytest.fixture(scope="module")
def world():
    return build_world()


def test_generator_is_deterministic_and_seeded(world):
    again = build_world()
    assert again.facts == world.facts and again.subjects == world.subjects and again.sha256 == world.sha256
    other = build_world(seed=1)
    assert other.sha256 != world.sha256
    assert set(other.subjects) != set(world.subjects)


def test_world_is_sized_for_editing_at_scale(world):
    summary = world.summary()
    assert summary["relations"] >= 6
    assert summary["subjects"] >= 1000            # a batch of 1000 edits can take distinct subjects
    assert summary["facts"] >= 1000               # one fact per subject by default (training time)
    assert all(10 <= n <= 30 for n in summary["objects"].values())
    per_relation = list(summary["facts_per_relation"].values())
    assert max(per_relation) - min(per_relation) <= 1


def test_relations_have_natural_unambiguous_templates():
    ids = [r.id for r in RELATIONS]
    assert len(set(ids)) == len(ids)
    patterns = []  # every sentence shape that can follow a subject-bearing prefix, as word lists
    for rel in RELATIONS:
        assert len(rel.templates) >= 4
        assert len(set(rel.objects)) == len(rel.objects)
        for template in rel.templates:
            assert template.count("{}") == 1 and template == template.strip()
            patterns.append((rel.id, words_of(template.replace("{}", " SUBJ "))))
        for obj in rel.objects:
            assert words_of(obj) == [obj]            # one word, so one token
    mention_patterns = [words_of(t.replace("{}", " SUBJ ")) for t in MENTION_TEMPLATES]
    # No template is a word-prefix of another template or of a mention sentence: after a filled
    # prompt, the next word is always the relation's object.
    for rid, words in patterns:
        for other_rid, other in patterns:
            if other is not words:
                assert other[: len(words)] != words, (words, other)
        for other in mention_patterns:
            assert other[: len(words)] != words, (words, other)


def test_subjects_are_invented_multi_word_names(world):
    fixed = set(w.lower() for w in build_world(num_subjects=2).vocabulary()) - {
        w.lower() for w in build_world(num_subjects=2).first_names + build_world(num_subjects=2).surnames}
    assert len(set(world.subjects)) == len(world.subjects)
    last_words = [s.split()[-1] for s in world.subjects]
    assert len(set(last_words)) == len(last_words)  # the subject's last token names it
    lengths = {len(s.split()) for s in world.subjects}
    assert lengths == {2, 3}
    for subject in world.subjects:
        words = subject.split()
        assert all(w[0].isupper() and w.isalpha() for w in words)
        assert not any(w.lower() in fixed for w in words), subject
    assert not set(world.first_names) & set(world.surnames)   # so no name is a prefix of another


def test_facts_are_balanced_and_have_neighbours(world):
    k = world.config.relations_per_subject
    for subject in world.subjects:
        rels = [f.relation_id for f in world.facts_of(subject)]
        assert len(rels) == k == len(set(rels))
    assert len(world.fact_index) == len(world.facts)
    for fact in world.facts:
        assert fact.object in world.relation(fact.relation_id).objects
    # CounterFact-style neighbourhoods: every (relation, object) pair is shared by several subjects.
    counts = {}
    for fact in world.facts:
        counts[(fact.relation_id, fact.object)] = counts.get((fact.relation_id, fact.object), 0) + 1
    assert min(counts.values()) >= 4


def test_lookups_and_text(world):
    fact = world.facts[0]
    assert world.object_of(fact.subject, fact.relation_id) == fact.object
    assert world.object_of(fact.subject, "P0") is None
    assert fact in world.facts_with(fact.relation_id, fact.object)
    assert fact not in world.facts_excluding([(fact.subject, fact.relation_id)])
    assert len(world.facts_excluding([(fact.subject, fact.relation_id)])) == len(world.facts) - 1
    template = world.relation(fact.relation_id).templates[1]
    assert world.prompt(fact, 1) == template.replace("{}", fact.subject)
    assert world.sentence(fact, 1) == f"{world.prompt(fact, 1)} {fact.object}."
    with pytest.raises(KeyError):
        world.relation("P0")


def test_world_config_is_validated():
    with pytest.raises(HyperParamsError, match="unknown key"):
        WorldConfig.from_dict({"subjects": 10})
    with pytest.raises(HyperParamsError, match="relations_per_subject"):
        WorldConfig(relations_per_subject=7)
    small = build_world(num_subjects=50, relations_per_subject=6)
    assert len(small.facts) == 300
