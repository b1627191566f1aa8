"""Fact recall: does the model continue a filled prompt with the fact's object?

A fact is *recalled* under a template when, with the filled prompt followed by ``" " + object``
teacher-forced, the argmax at every target position is the target's token (for the toy world's
one-token objects: the object is the argmax next token). Computed in batches, for every template.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..text import batches_by_tokens, prompt_target_batch
from .world import Fact, World, words_of

__all__ = ["RecallReport", "fact_hits", "fact_recall", "recall_matrix"]


@dataclass
class RecallReport:
    """Recall per (relation, template), overall, and the worst template."""

    per_template: dict[str, dict[str, float]]   # relation_id -> {template: recall in [0, 1]}
    overall: float
    num_facts: int
    num_prompts: int
    misses: list[dict] = field(default_factory=list)  # a sample of failures, for reading

    @property
    def worst(self) -> tuple[str, str, float]:
        """``(relation_id, template, recall)`` of the template with the lowest recall."""
        return min(((rid, t, r) for rid, temps in self.per_template.items() for t, r in temps.items()),
                   key=lambda x: x[2])

    def to_dict(self) -> dict:
        rid, template, value = self.worst
        return {"overall": self.overall, "worst_template": {"relation_id": rid, "template": template,
                                                           "recall": value},
                "num_facts": self.num_facts, "num_prompts": self.num_prompts,
                "per_template": self.per_template, "misses": self.misses}


@torch.no_grad()
def recall_matrix(model, tokenizer, prompts: Sequence[str], targets: Sequence[str], *,
                  max_tokens: int = 16384) -> torch.Tensor:
    """``[len(prompts)]`` bool: is ``targets[i]`` the greedy continuation of ``prompts[i]``?"""
    device = next(model.parameters()).device
    lengths = [len(words_of(p)) + len(words_of(t)) for p, t in zip(prompts, targets)]  # the toy tokenizer's count
    hits = torch.zeros(len(prompts), dtype=torch.bool)
    for idx in batches_by_tokens(lengths, max_tokens):
        batch = prompt_target_batch(tokenizer, [prompts[i] for i in idx], [targets[i] for i in idx]).to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        mask = batch.labels != -100
        correct = (logits.argmax(-1) == batch.labels) | ~mask
        hits[torch.tensor(idx)] = correct.all(-1).cpu()
    return hits


def fact_recall(model, world: World, facts: Sequence[Fact] | None = None, *, tokenizer=None,
                max_misses: int = 20, max_tokens: int = 16384) -> RecallReport:
    """Recall of ``facts`` (default: all of the world's) under every template of their relation.

    ``model`` is a :class:`~kedit_core.models.LoadedModel` or a bare transformers model (then pass
    ``tokenizer``)."""
    if tokenizer is None:
        tokenizer = model.tokenizer
        model = model.model
    facts = list(world.facts if facts is None else facts)
    prompts, targets, keys = _recall_prompts(world, facts)
    hits = recall_matrix(model, tokenizer, prompts, targets, max_tokens=max_tokens).tolist() if prompts else []
    per: dict[str, dict[str, list[int]]] = {}
    misses = []
    for (fact, template), hit, prompt in zip(keys, hits, prompts):
        counts = per.setdefault(fact.relation_id, {}).setdefault(template, [0, 0])
        counts[0] += int(hit)
        counts[1] += 1
        if not hit and len(misses) < max_misses:
            misses.append({"prompt": prompt, "object": fact.object})
    per_template = {rid: {t: c[0] / c[1] for t, c in temps.items()} for rid, temps in per.items()}
    overall = sum(hits) / len(hits) if hits else float("nan")
    return RecallReport(per_template, overall, len(facts), len(prompts), misses)


def fact_hits(model, world: World, facts: Sequence[Fact], *, tokenizer=None,
              max_tokens: int = 16384) -> dict[Fact, tuple[int, int]]:
    """``{fact: (templates recalled, templates)}``: the per-fact counts :func:`fact_recall` aggregates."""
    if tokenizer is None:
        tokenizer = model.tokenizer
        model = model.model
    prompts, targets, keys = _recall_prompts(world, facts)
    hits = recall_matrix(model, tokenizer, prompts, targets, max_tokens=max_tokens).tolist() if prompts else []
    counts: dict[Fact, list[int]] = {fact: [0, 0] for fact in facts}
    for (fact, _), hit in zip(keys, hits):
        counts[fact][0] += int(hit)
        counts[fact][1] += 1
    return {fact: (c[0], c[1]) for fact, c in counts.items()}


def _recall_prompts(world: World, facts: Sequence[Fact]) -> tuple[list[str], list[str], list[tuple[Fact, str]]]:
    """Every fact under every template of its relation: prompts, targets and ``(fact, template)``."""
    prompts, targets, keys = [], [], []
    for fact in facts:
        for t, template in enumerate(world.relation(fact.relation_id).templates):
            prompts.append(world.prompt(fact, t))
            targets.append(" " + fact.object)
            keys.append((fact, template))
    return prompts, targets, keys
