"""Training examples from edit requests: the new facts, the old facts (F-Learning's stage 1) and the
unmodified facts mixed into FT-Mix's mini-batches."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from kedit_core.errors import KeditError, RecordError
from kedit_core.requests import EditRequest, load_requests, requests_from_records

from .training import Example

CONTEXT_KEY = "unmodified_facts"


def new_facts(requests: Sequence[EditRequest]) -> list[Example]:
    """Each request's filled prompt with its new target."""
    return [Example(r.filled_prompt, r.target_new) for r in requests]


def old_facts(requests: Sequence[EditRequest]) -> list[Example]:
    """Each request's filled prompt with its old target (``target_true``); a request without one is an
    error naming it."""
    out = []
    for i, r in enumerate(requests):
        if r.target_true is None:
            raise RecordError(f"F-Learning forgets each request's old fact, so it needs target_true; request "
                              f"(case {r.case_id}, subject {r.subject!r}, prompt {r.prompt!r}) has none",
                              source="requests", index=i, field="target_true")
        out.append(Example(r.filled_prompt, r.target_true))
    return out


@dataclass
class UnmodifiedFacts:
    """The unmodified facts FT-Mix trains on, and where they came from (recorded with the deltas)."""

    examples: list[Example]
    source: str
    excluded: int  # facts dropped because a request rewrites the same prompt

    def describe(self) -> dict:
        payload = json.dumps([list(e) for e in self.examples], ensure_ascii=False)
        return {"source": self.source, "count": len(self.examples), "excluded_as_edited": self.excluded,
                "sha256": hashlib.sha256(payload.encode("utf-8")).hexdigest()}


def _as_example(item: Any, where: str, index: int) -> Example:
    if isinstance(item, EditRequest):
        return Example(item.filled_prompt, item.target_true if item.target_true is not None else item.target_new)
    if isinstance(item, (tuple, list)) and len(item) == 2 and all(isinstance(x, str) and x.strip() for x in item):
        prompt, target = item
        return Example(prompt, target if target.startswith(" ") else " " + target)
    raise RecordError("expected an EditRequest, a (prompt, target) pair or a CounterFact/zsRE/plain record; "
                      f"got {type(item).__name__}", source=where, index=index)


def load_unmodified_facts(spec: Any, *, where: str) -> list[Example]:
    """Unmodified facts from a file path (CounterFact, zsRE or plain JSON/JSONL records), or a list of
    EditRequests, records (dicts) or ``(prompt, target)`` pairs. A fact is trained towards its current
    object: ``target_true`` when the record has one, otherwise its ``target_new``."""
    if isinstance(spec, (str, Path)):
        return [_as_example(r, str(spec), i) for i, r in enumerate(load_requests(spec))]
    if not isinstance(spec, (list, tuple)):
        raise KeditError(f"{where}: expected a file path or a list of facts; got {type(spec).__name__}")
    if any(isinstance(item, dict) for item in spec):
        requests = requests_from_records(spec, source=where)
        return [_as_example(r, where, i) for i, r in enumerate(requests)]
    return [_as_example(item, where, i) for i, item in enumerate(spec)]


def resolve_unmodified_facts(hparams_path: str | None, options: dict, requests: Sequence[EditRequest]) -> UnmodifiedFacts:
    """FT-Mix's unmodified facts: from the hyper-parameters' ``unmodified_facts`` file or from
    ``EditContext.options["unmodified_facts"]`` (exactly one of them), minus any fact whose prompt a
    request rewrites (training it would contradict the edit)."""
    from_context = options.get(CONTEXT_KEY) if options else None
    if hparams_path is not None and from_context is not None:
        raise KeditError(f"unmodified facts are given twice: by the hyper-parameters (unmodified_facts = "
                         f"{hparams_path!r}) and by EditContext.options[{CONTEXT_KEY!r}]; give one")
    if hparams_path is None and from_context is None:
        raise KeditError("ft-mix mixes unmodified facts into every mini-batch, and none were given: set the "
                         "hyper-parameter unmodified_facts to a file of CounterFact/zsRE/plain records, or pass "
                         f"EditContext(options={{{CONTEXT_KEY!r}: ...}})")
    if hparams_path is not None:
        source, facts = str(hparams_path), load_unmodified_facts(hparams_path, where=str(hparams_path))
    else:
        where = f"EditContext.options[{CONTEXT_KEY!r}]"
        source = str(from_context) if isinstance(from_context, (str, Path)) else where
        facts = load_unmodified_facts(from_context, where=where)
    edited = {r.filled_prompt.strip() for r in requests}
    kept = [f for f in facts if f.prompt.strip() not in edited]
    if not kept:
        raise KeditError(f"{source}: no unmodified facts remain after dropping the {len(facts)} whose prompts "
                         "the requests rewrite")
    return UnmodifiedFacts(kept, source, len(facts) - len(kept))
