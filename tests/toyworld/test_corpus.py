import random

from kedit_core.text import encode
from kedit_core.toyworld import build_tokenizer, build_world, fact_documents, statistics_corpus


def test_statistics_corpus_is_deterministic_and_covers_every_subject():
    world = build_world()
    docs = statistics_corpus(world)
    assert docs == statistics_corpus(world) and docs != statistics_corpus(world, seed=1)
    text = "\n".join(docs)
    assert all(subject in text for subject in world.subjects)
    assert "Therefore" in text and "Because" in text        # filler text as well as facts
    tok = build_tokenizer(world)
    n_tokens = sum(len(encode(tok, d)) for d in docs)
    assert n_tokens > 50 * 4 * world.config.relations_per_subject  # far more tokens than key dimensions
    assert all(tok.unk_token_id not in encode(tok, d) for d in docs[:200])


def test_training_documents_cover_every_fact_under_every_template_once():
    world = build_world(num_subjects=40)
    docs = fact_documents(world, random.Random(0), filler_fraction=0.0, mention_fraction=0.0)
    sentences = [s for doc in docs for s in doc]
    expected = [world.sentence(f, t) for f in world.facts for t in range(len(world.relation(f.relation_id).templates))]
    assert sorted(sentences) == sorted(expected)
    subset = fact_documents(world, random.Random(0), filler_fraction=0.0, mention_fraction=0.0,
                            subjects=world.subjects[:5])
    assert sorted(s for doc in subset for s in doc) == sorted(e for e in expected
                                                               if any(e.count(x) for x in world.subjects[:5]))
