"""Text from the toy world: the training stream and the generic corpus for covariance statistics.

Three kinds of sentence exist: *fact* sentences (a relation template filled with a subject, then the
object), *mention* sentences (a subject in a context that states none of its facts) and *filler*
(generic sentences about places, things and days). Documents are a few sentences joined by spaces.
"""
from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Sequence

from .world import FILLER_TEMPLATES, MENTION_TEMPLATES, SLOT_WORDS, World, fill

__all__ = ["filler_sentence", "mention_sentence", "fact_documents", "statistics_corpus", "write_corpus"]

_SLOT = re.compile(r"\{(\w+)\}")


def _fill_slots(template: str, rng: random.Random) -> str:
    return _SLOT.sub(lambda m: rng.choice(SLOT_WORDS[m.group(1)]), template)


def filler_sentence(rng: random.Random) -> str:
    """A generic sentence that mentions nobody."""
    return _fill_slots(rng.choice(FILLER_TEMPLATES), rng)


def mention_sentence(rng: random.Random, subject: str) -> str:
    """A sentence about ``subject`` that states none of its facts."""
    return _fill_slots(fill(rng.choice(MENTION_TEMPLATES), subject), rng)


def fact_documents(world: World, rng: random.Random, *, filler_fraction: float = 0.1,
                   mention_fraction: float = 0.05, max_sentences: int = 6,
                   subjects: Sequence[str] | None = None) -> list[list[str]]:
    """One pass over every fact (of ``subjects``, default all) under every template, as documents.

    A document is about one subject, as real text mostly is: 1 to ``max_sentences`` of its fact
    sentences (its facts under templates drawn without replacement), each preceded by a filler
    sentence with probability ``filler_fraction`` and by a sentence mentioning the subject with
    probability ``mention_fraction``. Documents come in random order; returns them as lists of
    sentences."""
    by_subject: dict[str, list[tuple[int, int]]] = {}
    keep = None if subjects is None else set(subjects)
    for i, fact in enumerate(world.facts):
        if keep is None or fact.subject in keep:
            items = by_subject.setdefault(fact.subject, [])
            items.extend((i, t) for t in range(len(world.relation(fact.relation_id).templates)))
    docs: list[list[str]] = []
    for subject, items in by_subject.items():
        rng.shuffle(items)
        pos = 0
        while pos < len(items):
            n = rng.randint(1, max_sentences)
            doc: list[str] = []
            for fact_index, template_index in items[pos: pos + n]:
                if rng.random() < filler_fraction:
                    doc.append(filler_sentence(rng))
                if rng.random() < mention_fraction:
                    doc.append(mention_sentence(rng, subject))
                doc.append(world.sentence(world.facts[fact_index], template_index))
            docs.append(doc)
            pos += n
    rng.shuffle(docs)
    return docs


def statistics_corpus(world: World, *, seed: int = 0, fact_templates: int = 2, filler_documents: int = 600,
                      sentences_per_document: int = 8) -> list[str]:
    """Generic text for covariance statistics (C0): every subject appears, each fact is stated under
    ``fact_templates`` templates drawn at random, each subject is also mentioned once without its facts,
    and ``filler_documents`` documents of filler text are added. Deterministic given ``seed``; returns
    documents (one string each, sentences joined by spaces)."""
    rng = random.Random(f"kedit-toyworld-corpus-{seed}")
    sentences: list[str] = []
    for fact in world.facts:
        n_templates = len(world.relation(fact.relation_id).templates)
        for t in rng.sample(range(n_templates), min(fact_templates, n_templates)):
            sentences.append(world.sentence(fact, t))
    sentences.extend(mention_sentence(rng, subject) for subject in world.subjects)
    rng.shuffle(sentences)
    docs = [" ".join(sentences[i: i + sentences_per_document])
            for i in range(0, len(sentences), sentences_per_document)]
    docs.extend(" ".join(filler_sentence(rng) for _ in range(sentences_per_document))
                for _ in range(filler_documents))
    rng.shuffle(docs)
    return docs


def write_corpus(documents: Sequence[str], path: str | os.PathLike) -> Path:
    """Write documents atomically: ``.jsonl`` as ``{"text": ...}`` lines, anything else as plain text
    with one document per line and a blank line between documents (readable both as line-separated
    and as blank-line-separated documents)."""
    from ..atomic import write_text_atomic

    path = Path(path)
    if path.suffix == ".jsonl":
        text = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in documents)
    else:
        text = "\n\n".join(documents) + "\n"
    return write_text_atomic(path, text)
