"""Edit requests and evaluation records from the toy world, in CounterFact's schema.

Each record rewrites one fact ``(subject, relation) -> object`` to another object of the same
relation, exactly as a CounterFact record does, so :func:`kedit_core.load_requests` and the
CounterFact metrics read it unchanged::

    {"case_id": 0,
     "requested_rewrite": {"prompt": "{} was born in", "subject": "Talvo Kaloski", "relation_id": "P19",
                           "target_new": {"str": "Lima", "id": "P19/Lima"},
                           "target_true": {"str": "Oslo", "id": "P19/Oslo"}},
     "paraphrase_prompts": [the relation's other templates, filled with the subject],
     "neighborhood_prompts": [other subjects whose object for this relation is also "Oslo"],
     "attribute_prompts": [subjects whose object for this relation is "Lima"],
     "generation_prompts": [prompts about the subject, for fluency/consistency checks]}

Records are ordered so that the first ``len(world.subjects)`` of them have pairwise distinct
subjects: any batch taken from the front edits each subject once (no two requests share a subject,
so no MEMIT keys collide and :func:`kedit_core.requests.check_conflicts` has nothing to report).
"""
from __future__ import annotations

import os
import random
from pathlib import Path

from .world import Fact, World, fill

__all__ = ["make_records", "write_records", "record_fact", "object_id"]


def object_id(relation_id: str, obj: str) -> str:
    """The id of an object in records (CounterFact uses Wikidata ids; the toy world uses ``P19/Oslo``)."""
    return f"{relation_id}/{obj}"


def _ordered_facts(world: World, rng: random.Random) -> list[Fact]:
    """All facts, in rounds: each round takes one not-yet-used fact of every subject (subjects in a
    random order per round), so every prefix of a round has distinct subjects."""
    remaining = {s: [] for s in world.subjects}
    for fact in world.facts:
        remaining[fact.subject].append(fact)
    for facts in remaining.values():
        rng.shuffle(facts)
    ordered: list[Fact] = []
    while any(remaining.values()):
        subjects = [s for s in world.subjects if remaining[s]]
        rng.shuffle(subjects)
        ordered.extend(remaining[s].pop() for s in subjects)
    return ordered


def make_records(world: World, n: int | None = None, *, seed: int = 0, neighbors: int = 10,
                 attributes: int = 10) -> list[dict]:
    """``n`` CounterFact-style records (default: one per subject, all subjects distinct), drawn with
    ``seed``. ``neighbors``/``attributes`` cap the neighbourhood and attribute prompts per record."""
    rng = random.Random(f"kedit-toyworld-records-{seed}")
    ordered = _ordered_facts(world, rng)
    n = len(world.subjects) if n is None else n
    if not 0 < n <= len(ordered):
        raise ValueError(f"n must be between 1 and {len(ordered)} (the number of facts); got {n}")
    by_relation_object: dict[tuple[str, str], list[Fact]] = {}
    for fact in world.facts:
        by_relation_object.setdefault((fact.relation_id, fact.object), []).append(fact)

    def prompts_for(pool: list[Fact], exclude: str, count: int) -> list[str]:
        others = [f for f in pool if f.subject != exclude]
        chosen = rng.sample(others, min(count, len(others)))
        templates = world.relation(chosen[0].relation_id).templates if chosen else ()
        return [fill(rng.choice(templates), f.subject) for f in chosen]

    records = []
    for case_id, fact in enumerate(ordered[:n]):
        relation = world.relation(fact.relation_id)
        t = rng.randrange(len(relation.templates))
        new = rng.choice([o for o in relation.objects if o != fact.object])
        others = [i for i in range(len(relation.templates)) if i != t]
        other_relations = [f for f in world.facts_of(fact.subject) if f.relation_id != fact.relation_id]
        generation = [fill(relation.templates[i], fact.subject) for i in [t] + others]
        generation += [fill(rng.choice(world.relation(f.relation_id).templates), fact.subject) for f in other_relations]
        records.append({
            "case_id": case_id,
            "requested_rewrite": {
                "prompt": relation.templates[t],
                "subject": fact.subject,
                "relation_id": fact.relation_id,
                "target_new": {"str": new, "id": object_id(fact.relation_id, new)},
                "target_true": {"str": fact.object, "id": object_id(fact.relation_id, fact.object)},
            },
            "paraphrase_prompts": [fill(relation.templates[i], fact.subject) for i in others],
            "neighborhood_prompts": prompts_for(by_relation_object[(fact.relation_id, fact.object)], fact.subject,
                                                neighbors),
            "attribute_prompts": prompts_for(by_relation_object.get((fact.relation_id, new), []), fact.subject,
                                             attributes),
            "generation_prompts": generation,
        })
    return records


def record_fact(record: dict) -> Fact:
    """The world fact a record rewrites (its true object)."""
    rr = record["requested_rewrite"]
    return Fact(rr["subject"], rr["relation_id"], rr["target_true"]["str"])


def write_records(records: list[dict], path: str | os.PathLike) -> Path:
    """Write records as a JSON list (atomically)."""
    from ..atomic import write_json_atomic

    return write_json_atomic(path, records, indent=1)
