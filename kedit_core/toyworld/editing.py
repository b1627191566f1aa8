"""Editing on the toy world, measured the way ``kedit demo`` and the behavioural tests read it.

One call computes an edit of ``n`` toy-world facts with any installed editor (by name, so a plugin's
editor runs through the same harness), applies it, measures, and reverts::

    model, world = kedit.load_model("toy"), toyworld.load_world()
    outcome = edit_and_measure(model, world, "memit", 200, stats=toy_statistics(world))
    outcome["post"]["ES"], outcome["recall"]["drop"]
    EditBars(es=95, ps=80, ns=80, max_recall_drop=5).failures(outcome)   # [] when the edit is good

ES / PS / NS are CounterFact's (:mod:`kedit_core.evaluation.counterfact`) on the records
:func:`~kedit_core.toyworld.records.make_records` writes; *recall* is the share of the facts the edit
did not touch that the model still completes correctly under every template of their relation.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .recall import fact_hits
from .records import make_records
from .world import World

__all__ = ["EditBars", "edit_and_measure", "toy_statistics", "HEADLINE"]

HEADLINE = ("ES", "PS", "NS", "Score")


def toy_statistics(world: World, stats_dir: str | Path | bool | None = None, *, progress: bool = False,
                   **corpus_options):
    """C0 for a toy model: a :class:`~kedit_core.stats.CachedCovariance` over the world's generic
    statistics corpus (every subject stated and mentioned, plus filler; ``corpus_options`` go to
    :func:`~kedit_core.toyworld.corpus.statistics_corpus`), cached in ``stats_dir`` (default: kedit's
    statistics cache; ``False``: in memory only)."""
    from ..stats import CachedCovariance
    from .corpus import statistics_corpus

    return CachedCovariance(statistics_corpus(world, **corpus_options), stats_dir, progress=progress)


def edit_and_measure(model, world: World, method: str, num_edits: int, *, seed: int = 0, record_seed: int = 0,
                     hparams=None, overrides: dict | None = None, stats=None, progress: bool = False,
                     log: Callable[[str], None] | None = None) -> dict:
    """Edit the first ``num_edits`` toy-world records (drawn with ``record_seed``) with ``method`` and
    measure ES/PS/NS and the recall of the untouched facts, before and after. The model is unchanged
    afterwards (the edit is reverted exactly). Returns a JSON-ready dict with the resolved
    hyper-parameters, seeds and timings per phase."""
    from ..editors import EditContext, compute_edit, get_editor, resolve_hparams
    from ..evaluation import EvalSettings, aggregate, evaluate_cases
    from ..evaluation.datasets import cases_from_records

    say = log or (lambda message: None)
    timings: dict[str, float] = {}
    editor_cls = get_editor(method)
    hp = resolve_hparams(editor_cls, model, hparams, **(overrides or {}))
    records = make_records(world, num_edits, seed=record_seed)
    fmt, cases = cases_from_records(records, "counterfact", source="toy world")
    touched = {(r["requested_rewrite"]["subject"], r["requested_rewrite"]["relation_id"]) for r in records}
    kept = world.facts_excluding(touched)
    # The untouched facts in two groups: the edited subjects' other facts (read through the same subject
    # keys an edit writes to) and the facts of subjects no edit names (reached only through leakage).
    edited_subjects = {subject for subject, _ in touched}
    groups = {"edited_subjects_other_facts": [f for f in kept if f.subject in edited_subjects],
              "unedited_subjects": [f for f in kept if f.subject not in edited_subjects]}
    settings = EvalSettings(generation=False, progress=progress)

    def measure(unedited: bool) -> tuple[dict, float | None, dict]:
        metrics = aggregate(evaluate_cases(model, cases, fmt, settings), fmt)
        if unedited:
            per_fact = _unedited_fact_hits(model, world)
        else:
            per_fact = fact_hits(model, world, [f for facts in groups.values() for f in facts])
        hits = {}   # group -> (prompts recalled, prompts)
        for name, facts in groups.items():
            if facts:
                hits[name] = (sum(per_fact[f][0] for f in facts), sum(per_fact[f][1] for f in facts))
        recalled, prompts = sum(h for h, _ in hits.values()), sum(n for _, n in hits.values())
        recall = recalled / prompts if prompts else None
        return {k: metrics[k] for k in HEADLINE}, recall, {name: h / n for name, (h, n) in hits.items()}

    start = time.perf_counter()
    say(f"measuring the unedited model on {num_edits} records and {len(kept)} untouched facts")
    pre, recall_before, groups_before = measure(unedited=True)
    timings["evaluate_before"] = time.perf_counter() - start

    start = time.perf_counter()
    say(f"computing {num_edits} edits with '{editor_cls.name}'")
    context = EditContext(stats=stats, seed=seed, progress=progress, log=say)
    result = compute_edit(model, [c.request for c in cases], editor_cls.name, hp, context=context)
    timings["edit"] = time.perf_counter() - start

    start = time.perf_counter()
    say("measuring the edited model")
    applied = result.deltas.apply(model.model)
    try:
        post, recall_after, groups_after = measure(unedited=False)
    finally:
        applied.revert()
    timings["evaluate_after"] = time.perf_counter() - start

    return {
        "method": editor_cls.name,
        "num_edits": num_edits,
        "seed": seed,
        "record_seed": record_seed,
        "hparams": hp.to_dict(),
        "pre": pre,
        "post": post,
        "recall": {"before": _percent(recall_before), "after": _percent(recall_after),
                   "drop": None if recall_before is None else _percent(recall_before - recall_after),
                   "num_facts": len(kept),
                   **{name: {"before": _percent(groups_before[name]), "after": _percent(groups_after[name]),
                             "drop": _percent(groups_before[name] - groups_after[name]),
                             "num_facts": len(groups[name])} for name in groups_before}},
        "deltas_norms": result.deltas.norms(),
        "timings": timings,
        "editor_timings": dict(result.timings),
        "world_sha256": world.sha256,
    }


# The unedited model's recall of every fact, by (weights, world): each toy edit first measures the same
# unedited model, and its ~18,000 recall prompts were most of a small edit's time.
_UNEDITED_FACT_HITS: dict[tuple[str, str], dict] = {}


def _unedited_fact_hits(model, world: World) -> dict:
    key = (model.fingerprint(), world.sha256)
    if key not in _UNEDITED_FACT_HITS:
        _UNEDITED_FACT_HITS.clear()  # one model at a time is what the harness measures
        _UNEDITED_FACT_HITS[key] = fact_hits(model, world, list(world.facts))
    return _UNEDITED_FACT_HITS[key]


def _percent(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


@dataclass(frozen=True)
class EditBars:
    """Minimum ES/PS/NS (×100) and the largest allowed drop in recall of untouched facts (points);
    ``None`` leaves a quantity unchecked."""

    es: float | None = None
    ps: float | None = None
    ns: float | None = None
    max_recall_drop: float | None = None

    def failures(self, outcome: dict) -> list[str]:
        """What the outcome of :func:`edit_and_measure` misses, one line per bar ([] when it clears all)."""
        missed = []
        post = outcome["post"]
        for key, bar in (("ES", self.es), ("PS", self.ps), ("NS", self.ns)):
            if bar is not None and not post[key] >= bar:
                missed.append(f"{key} {post[key]:.1f} < {bar}")
        drop = outcome["recall"]["drop"]
        if self.max_recall_drop is not None and not drop <= self.max_recall_drop:
            missed.append(f"recall of untouched facts fell {drop:.1f} points > {self.max_recall_drop} "
                          f"({outcome['recall']['before']:.1f} -> {outcome['recall']['after']:.1f})")
        return missed

    def to_dict(self) -> dict:
        return asdict(self)
