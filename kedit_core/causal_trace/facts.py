"""Facts to trace: a prompt template, its subject and the answer the model should give.

Read from ROME's ``known_1000.json`` schema (``known_id``, ``subject``, ``attribute``, ``prompt``), from
CounterFact (the true target: ``requested_rewrite.target_true``) or from plain request files (``prompt``
with ``{}``, ``subject``, and ``target_true`` or else ``target_new``). Bad records raise
:class:`~kedit_core.errors.RecordError` naming the file, the record and the field.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import RecordError
from ..requests import detect_format, read_records, requests_from_records

__all__ = ["TracedFact", "FACT_FORMATS", "load_facts", "facts_from_records"]

FACT_FORMATS = ("auto", "known", "counterfact", "plain")


@dataclass(frozen=True)
class TracedFact:
    """``template.replace("{}", subject)`` should continue with ``target`` (leading space included).
    ``index`` is the record's position in its file; ``fact_id`` its own id (``known_id``, ``case_id``)."""

    template: str
    subject: str
    target: str
    index: int
    fact_id: Any = None
    relation_id: str | None = None

    @property
    def prompt(self) -> str:
        return self.template.replace("{}", self.subject)

    def to_dict(self) -> dict:
        return asdict(self)


def _with_space(target: str) -> str:
    return target if target.startswith(" ") else " " + target


def _is_known(record: Any) -> bool:
    return isinstance(record, dict) and "attribute" in record and "prompt" in record and "subject" in record


def _known_fact(record: dict, index: int, source: str | None) -> TracedFact:
    def text(field: str) -> str:
        value = record.get(field)
        if not isinstance(value, str) or not value.strip():
            raise RecordError(f"expected a non-empty string; got {value!r}", source=source, index=index, field=field)
        return value

    subject, prompt, attribute = text("subject"), text("prompt"), text("attribute")
    if subject not in prompt:
        raise RecordError(f"the subject {subject!r} does not occur in the prompt {prompt!r}", source=source,
                          index=index, field="prompt")
    if "{}" in prompt:
        raise RecordError(f"expected the filled-in prompt (known_1000 schema); got a template {prompt!r}",
                          source=source, index=index, field="prompt")
    return TracedFact(template=prompt.replace(subject, "{}", 1), subject=subject, target=_with_space(attribute),
                      index=index, fact_id=record.get("known_id", index), relation_id=record.get("relation_id"))


def facts_from_records(records: list, fmt: str = "auto", *, source: str | None = None) -> list[TracedFact]:
    if fmt not in FACT_FORMATS:
        raise RecordError(f"unknown fact format {fmt!r}; expected one of {', '.join(FACT_FORMATS)}", source=source)
    out = []
    for index, record in enumerate(records):
        record_fmt = fmt
        if fmt == "auto":
            if _is_known(record):
                record_fmt = "known"
            else:
                try:
                    record_fmt = detect_format(record)
                except RecordError as exc:
                    raise RecordError(f"{exc} or known_1000 ('subject', 'attribute', 'prompt')", source=source,
                                      index=index) from None
                if record_fmt == "zsre":
                    raise RecordError("zsRE records hold questions, not facts to trace; use known_1000, "
                                      "CounterFact or plain records", source=source, index=index)
        if record_fmt == "known":
            out.append(_known_fact(record, index, source))
            continue
        # requests_from_records numbers records from 0: convert one at a time to keep the file's index
        try:
            [request] = requests_from_records([record], record_fmt, source=source)
        except RecordError as exc:
            raise RecordError(str(exc).split(": ", 1)[-1], source=source, index=index, field=exc.field) from None
        target = request.target_true if request.target_true is not None else request.target_new
        case_id = request.case_id if record_fmt == "counterfact" or (
            isinstance(record, dict) and "case_id" in record) else index
        out.append(TracedFact(template=request.prompt, subject=request.subject, target=target, index=index,
                              fact_id=case_id, relation_id=request.relation_id))
    return out


def load_facts(path: str | Path, fmt: str = "auto") -> list[TracedFact]:
    """Every fact of a known_1000, CounterFact or plain request file (JSON list or JSONL)."""
    return facts_from_records(read_records(path), fmt, source=str(path))
