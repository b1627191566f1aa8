"""The toy fact world: invented people, CounterFact-style relations, and who is what.

Everything is a pure function of a :class:`WorldConfig` (seeded), so the world, the tokenizer, the
training data, the request records and the statistics corpus can always be rebuilt exactly. The world
is small enough to hold in memory and to check exhaustively::

    world = build_world()                 # the default world the committed checkpoint knows
    fact = world.facts[0]                 # Fact(subject='Brelo Tashvik', relation_id='P19', object='Oslo')
    world.relation(fact.relation_id).templates   # ('{} was born in', 'The birthplace of {} is', ...)

Text conventions (the tokenizer relies on them): plain English spacing (``"By profession, X is a
dentist."``), words are runs of letters and punctuation marks are words of their own, every object is
one word, and an object follows its filled template after one space: ``fill(template, subject) + " "
+ object`` (a request's target is the object with a leading space, as kedit stores targets).
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Iterable, Sequence

from ..hparams import HyperParams

__all__ = ["Relation", "Fact", "World", "WorldConfig", "RELATIONS", "MENTION_TEMPLATES", "FILLER_TEMPLATES",
           "SLOT_WORDS", "build_world", "fill", "words_of"]


@dataclass(frozen=True)
class Relation:
    """A CounterFact-style relation: its Wikidata-like id, a name, prompt templates (``{}`` is the
    subject; the object follows the prompt) and the objects it can take (one word each)."""

    id: str
    name: str
    templates: tuple[str, ...]
    objects: tuple[str, ...]


# Templates are chosen so that no template is a word-prefix of another one (the next word after a
# filled prompt is then always this relation's object) and most put the subject first, so a model can
# only answer by reading what it stored at the subject's last token, as real LMs do.
RELATIONS: tuple[Relation, ...] = (
    Relation("P19", "place of birth", (
        "{} was born in",
        "The birthplace of {} is",
        "{} is originally from",
        "{} comes from the city of",
        "The hometown of {} is",
    ), ("Paris", "Lagos", "Lima", "Oslo", "Cairo", "Dublin", "Madrid", "Nairobi", "Seoul", "Vienna", "Prague",
        "Lisbon", "Athens", "Berlin", "Tokyo", "Quito", "Havana", "Warsaw", "Helsinki", "Manila", "Dakar", "Hanoi",
        "Santiago", "Toronto")),
    Relation("P27", "country of citizenship", (
        "{} is a citizen of",
        "{} holds a passport from",
        "The citizenship of {} is",
        "{} has the nationality of",
        "By nationality, {} belongs to",
    ), ("France", "Nigeria", "Peru", "Norway", "Egypt", "Ireland", "Spain", "Kenya", "Japan", "Austria", "Chile",
        "Portugal", "Greece", "Germany", "Mexico", "Canada", "Poland", "Finland", "Brazil", "Vietnam")),
    Relation("P103", "native language", (
        "The native language of {} is",
        "{} is a native speaker of",
        "The mother tongue of {} is",
        "{} grew up speaking",
        "{} speaks as a first language",
    ), ("French", "Finnish", "Swahili", "Portuguese", "Polish", "Greek", "Turkish", "Dutch", "Hungarian",
        "Tagalog", "Korean", "Arabic", "Italian", "Danish", "Czech", "Hindi")),
    Relation("P106", "occupation", (
        "{} works as a",
        "The occupation of {} is",
        "{} earns a living as a",
        "By profession, {} is a",
        "{} is employed as a",
    ), ("dentist", "pilot", "baker", "lawyer", "nurse", "painter", "chemist", "farmer", "journalist", "carpenter",
        "surgeon", "librarian", "plumber", "sculptor", "banker", "tailor", "poet", "novelist", "photographer",
        "pharmacist", "diplomat", "mechanic", "translator", "botanist")),
    Relation("P54", "member of sports team", (
        "{} plays for the",
        "{} is a member of the",
        "The team of {} is the",
        "{} signed a contract with the",
        "{} scored many goals for the",
    ), ("Falcons", "Comets", "Otters", "Ravens", "Titans", "Wolves", "Pirates", "Hornets", "Bisons", "Dragons",
        "Stallions", "Panthers", "Vikings", "Mariners", "Rockets", "Jaguars", "Herons", "Cyclones", "Badgers",
        "Lynxes")),
    Relation("P1303", "instrument", (
        "{} plays the",
        "The instrument of {} is the",
        "{} is a performer on the",
        "{} performs music on the",
        "The favourite instrument of {} is the",
    ), ("violin", "cello", "piano", "flute", "trumpet", "guitar", "harp", "oboe", "clarinet", "banjo", "drums",
        "saxophone", "accordion", "trombone", "mandolin", "harmonica")),
)

# Sentences that mention a subject without stating any of its facts (the subject must also be read
# in other contexts), and generic filler, so the model is a language model and not only a fact table.
# None of them starts like a relation template.
MENTION_TEMPLATES: tuple[str, ...] = (
    "{} visited the {place} on {day}.",
    "Yesterday {} bought a {thing} at the {place}.",
    "{} often walks to the {place} in the {time}.",
    "Many people say that {} likes the {adj} {thing}.",
    "I met {} near the {place} last {day}.",
    "You can see {} at the {place} every {day}.",
    "{} wrote a letter about the {adj} {thing}.",
)
FILLER_TEMPLATES: tuple[str, ...] = (
    "The {adj} {thing} was near the {place}.",
    "The {thing} is {adj} in the {time}.",
    "Therefore the {place} was {adj} on {day}.",
    "Therefore we went to the {place} in the {time}.",
    "Because the {thing} was {adj}, we stayed at the {place}.",
    "Because it rained on {day}, the {place} was {adj}.",
    "I think the {thing} at the {place} is {adj}.",
    "I saw a {adj} {thing} in the {time}.",
    "You should bring the {thing} to the {place}.",
    "You will find a {adj} {thing} near the {place}.",
    "She said the {thing} was {adj}.",
    "He left the {thing} at the {place} on {day}.",
    "It was a {adj} {time} at the {place}.",
    "We talked about the {adj} {thing} for a long time.",
    "The {place} opens early on {day}.",
    "Everyone agreed that the {thing} looked {adj}.",
)
SLOT_WORDS: dict[str, tuple[str, ...]] = {
    "place": ("market", "museum", "station", "library", "garden", "harbour", "school", "bakery", "river", "park",
              "bridge", "theatre", "village", "castle", "beach", "hospital", "office", "square", "church", "forest"),
    "thing": ("book", "lamp", "bicycle", "painting", "hat", "table", "letter", "clock", "map", "boat", "coat",
              "cup", "window", "door", "chair", "garden", "ticket", "box", "candle", "radio"),
    "adj": ("small", "large", "old", "new", "quiet", "busy", "bright", "dark", "warm", "cold", "green", "red",
            "blue", "strange", "beautiful", "simple", "heavy", "famous", "empty", "clean"),
    "day": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "time": ("morning", "afternoon", "evening", "night", "winter", "summer", "spring", "autumn"),
}

# Invented names are built from syllables (consonant-vowel-consonant-vowel, then a surname ending);
# first names (also used as middle names) and surnames come from disjoint pools, so no subject's name
# is a prefix of another's.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr", "st",
           "sh", "gr", "h", "j")
_VOWELS = ("a", "e", "i", "o", "u", "a", "e", "i", "o", "ai", "ei", "ou")
_MIDDLES = ("l", "n", "r", "m", "v", "d", "s", "t", "k", "nd", "lv", "rk", "st", "sh", "nt", "ld", "z", "b")
_FIRST_NAME_ENDINGS = ("", "", "", "n", "r", "s", "l")
_SURNAME_ENDINGS = ("ski", "sen", "berg", "vic", "ley", "mann", "nko", "ridis", "nez", "rd", "ni", "vska",
                    "lli", "ssen", "tz", "rov", "quist", "dor")


@dataclass(frozen=True)
class Fact:
    """``subject`` has ``object`` for ``relation_id``."""

    subject: str
    relation_id: str
    object: str


@dataclass(frozen=True)
class WorldConfig(HyperParams):
    """What the world generator draws (everything else is fixed by :data:`RELATIONS`)."""

    seed: int = 0
    num_subjects: int = 1200
    # Three facts per subject: with one, a subject's representation only has to encode its one object,
    # so all subjects sharing that object look alike to an editor (NS 67.9 after 200 MEMIT edits, and
    # ROME's 10 edits broke their neighbours); with three it encodes a combination (subject keys twice
    # as many effective dimensions, NS 85-91). Three still trains on 2 CPU cores in ~5 min, and 1200
    # subjects let 1000 edits touch 1000 distinct subjects (as CounterFact's do).
    relations_per_subject: int = 3          # each subject gets this many of the relations
    num_first_names: int = 90
    # Surnames (a subject's last word). With at least one per subject every subject gets its own, so
    # the subject's last token names it, as with most real subjects; fewer makes surnames shared.
    num_surnames: int = 1200
    middle_name_fraction: float = 0.3       # subjects with three name words instead of two

    def validate(self):
        self.require(self.num_subjects >= 2, "num_subjects", "must be at least 2")
        self.require(1 <= self.relations_per_subject <= len(RELATIONS), "relations_per_subject",
                     f"must be between 1 and {len(RELATIONS)}")
        self.require(self.num_first_names >= 2, "num_first_names", "must be at least 2")
        self.require(self.num_surnames >= 2, "num_surnames", "must be at least 2")
        self.require(0.0 <= self.middle_name_fraction <= 1.0, "middle_name_fraction", "must be in [0, 1]")
        self.require(self.num_subjects <= self.num_first_names * self.num_surnames // 2, "num_subjects",
                     f"too many for {self.num_first_names} first names and {self.num_surnames} surnames")


@dataclass(frozen=True)
class World:
    """The generated world: subjects (in generation order), relations and facts."""

    config: WorldConfig
    subjects: tuple[str, ...]
    relations: tuple[Relation, ...]
    facts: tuple[Fact, ...]
    first_names: tuple[str, ...]
    surnames: tuple[str, ...]

    # -- lookups -----------------------------------------------------------------------------
    def relation(self, relation_id: str) -> Relation:
        for rel in self.relations:
            if rel.id == relation_id:
                return rel
        raise KeyError(f"no relation {relation_id!r} in the toy world (have {[r.id for r in self.relations]})")

    @cached_property
    def fact_index(self) -> dict[tuple[str, str], Fact]:
        """``(subject, relation_id) -> Fact``."""
        return {(f.subject, f.relation_id): f for f in self.facts}

    def object_of(self, subject: str, relation_id: str) -> str | None:
        fact = self.fact_index.get((subject, relation_id))
        return None if fact is None else fact.object

    def facts_with(self, relation_id: str, obj: str) -> list[Fact]:
        """Every fact of ``relation_id`` whose object is ``obj`` (world order)."""
        return [f for f in self.facts if f.relation_id == relation_id and f.object == obj]

    def facts_of(self, subject: str) -> list[Fact]:
        return [f for f in self.facts if f.subject == subject]

    def facts_excluding(self, pairs: Iterable[tuple[str, str]]) -> list[Fact]:
        """The facts whose ``(subject, relation_id)`` is not in ``pairs`` (e.g. the unedited facts)."""
        skip = set(pairs)
        return [f for f in self.facts if (f.subject, f.relation_id) not in skip]

    # -- text ----------------------------------------------------------------------------------
    def prompt(self, fact: Fact, template_index: int = 0) -> str:
        """The filled prompt for ``fact`` under one of its relation's templates."""
        return fill(self.relation(fact.relation_id).templates[template_index], fact.subject)

    def sentence(self, fact: Fact, template_index: int = 0) -> str:
        """The fact as a sentence: ``"<prompt> <object>."``."""
        return f"{self.prompt(fact, template_index)} {fact.object}."

    def vocabulary(self) -> list[str]:
        """Every word the world's text can contain (sorted; no special tokens)."""
        return sorted(_fixed_words() | set(self.first_names) | set(self.surnames))

    # -- identity --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "relations": [{"id": r.id, "name": r.name, "templates": list(r.templates), "objects": list(r.objects)}
                          for r in self.relations],
            "subjects": list(self.subjects),
            "facts": [[f.subject, f.relation_id, f.object] for f in self.facts],
        }

    @cached_property
    def sha256(self) -> str:
        """A content hash of the world (relations, subjects, facts): checkpoints record it."""
        payload = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def summary(self) -> dict:
        return {
            "subjects": len(self.subjects),
            "relations": len(self.relations),
            "facts": len(self.facts),
            "templates": sum(len(r.templates) for r in self.relations),
            "objects": {r.id: len(r.objects) for r in self.relations},
            "facts_per_relation": {r.id: sum(f.relation_id == r.id for f in self.facts) for r in self.relations},
            "vocabulary_words": len(self.vocabulary()),
            "sha256": self.sha256,
        }


def fill(template: str, subject: str) -> str:
    """``template`` with the subject in place of ``{}``."""
    return template.replace("{}", subject)


def _invent_words(rng: random.Random, count: int, endings: Sequence[str], taken: set[str]) -> list[str]:
    out: list[str] = []
    while len(out) < count:
        word = (rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_MIDDLES) + rng.choice(_VOWELS)
                + rng.choice(endings)).capitalize()
        if 4 <= len(word) <= 11 and word.lower() not in taken:
            taken.add(word.lower())
            out.append(word)
    return out


def build_world(config: WorldConfig | None = None, **overrides) -> World:
    """Generate the world for ``config`` (default :class:`WorldConfig`, i.e. the committed model's world).

    Subjects get ``relations_per_subject`` distinct relations each, balanced so every relation has
    the same number of facts (± 1); objects are drawn uniformly from the relation's objects, so many
    subjects share an object (the neighbourhood prompts of the request records).
    """
    config = (config or WorldConfig()).replace(**overrides) if overrides else (config or WorldConfig())
    rng = random.Random(f"kedit-toyworld-{config.seed}")
    reserved = {w.lower() for w in _fixed_words()}
    first_names = _invent_words(rng, config.num_first_names, _FIRST_NAME_ENDINGS, reserved)
    surnames = _invent_words(rng, config.num_surnames, _SURNAME_ENDINGS, reserved)

    subjects: list[str] = []
    seen: set[str] = set()
    unique_surnames = config.num_surnames >= config.num_subjects
    while len(subjects) < config.num_subjects:
        words = [rng.choice(first_names)]
        if rng.random() < config.middle_name_fraction:
            middle = rng.choice(first_names)
            if middle == words[0]:
                continue
            words.append(middle)
        words.append(surnames[len(subjects)] if unique_surnames else rng.choice(surnames))
        name = " ".join(words)
        if name not in seen:
            seen.add(name)
            subjects.append(name)

    # Balanced relation subsets: deal relations round-robin from a shuffled deck so each relation
    # gets num_subjects * k / R facts; a subject never gets the same relation twice.
    k = config.relations_per_subject
    relation_ids = [r.id for r in RELATIONS]
    facts: list[Fact] = []
    deck: list[str] = []
    for subject in subjects:
        chosen: list[str] = []
        while len(chosen) < k:
            candidates = [r for r in deck if r not in chosen]
            if not candidates:
                fresh = relation_ids[:]
                rng.shuffle(fresh)
                deck.extend(fresh)
                continue
            rid = candidates[0]
            deck.remove(rid)
            chosen.append(rid)
        for rid in sorted(chosen, key=relation_ids.index):
            rel = next(r for r in RELATIONS if r.id == rid)
            facts.append(Fact(subject, rid, rng.choice(rel.objects)))
    return World(config=config, subjects=tuple(subjects), relations=RELATIONS, facts=tuple(facts),
                 first_names=tuple(first_names), surnames=tuple(surnames))


_WORD = re.compile(r"\w+|[^\w\s]+")  # what the tokenizer's Whitespace pre-tokenizer splits into words


def words_of(text: str) -> list[str]:
    """``text`` split into words the way the toy tokenizer splits it."""
    return _WORD.findall(text)


def _fixed_words() -> set[str]:
    """Every word of the world's text except the invented names."""
    words: set[str] = set()
    for rel in RELATIONS:
        words.update(rel.objects)
        for template in rel.templates:
            words.update(words_of(template.replace("{}", " ")))
    for template in MENTION_TEMPLATES + FILLER_TEMPLATES:
        words.update(words_of(re.sub(r"\{\w*\}", " ", template)))
    for values in SLOT_WORDS.values():
        words.update(values)
    # The seeds of MEMIT/ROME's context templates, which the model continues itself.
    words.update({"The", "Therefore", "Because", "I", "You"})
    return words

