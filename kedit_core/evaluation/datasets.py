"""Evaluation records: CounterFact and zsRE (MEND eval schema) cases, each carrying the edit request
and every prompt its metrics read. Bad records raise :class:`~kedit_core.errors.RecordError` naming the
file, the record index and the field."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import RecordError
from ..requests import EditRequest, detect_format, read_records, requests_from_records

__all__ = ["CounterFactCase", "ZsreCase", "EvalCase", "cases_from_records", "load_cases", "FORMATS"]

FORMATS = ("counterfact", "zsre")


def _string_list(record: dict, key: str, source, index, *, required: bool = True) -> tuple[str, ...]:
    if key not in record:
        if required:
            raise RecordError("missing (expected a list of prompt strings)", source=source, index=index, field=key)
        return ()
    value = record[key]
    if not isinstance(value, list):
        raise RecordError(f"expected a list of prompt strings; got {type(value).__name__}", source=source,
                          index=index, field=key)
    for j, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise RecordError(f"expected a non-empty string; got {item!r}", source=source, index=index,
                              field=f"{key}[{j}]")
    return tuple(value)


def _object_id(value: Any) -> str | None:
    return value.get("id") if isinstance(value, dict) else None


@dataclass(frozen=True)
class CounterFactCase:
    """One CounterFact record: the edit and the prompts that test it.

    Targets carry their leading space (``" English"``), as they are scored after the prompts.
    """

    request: EditRequest
    paraphrase_prompts: tuple[str, ...]
    neighborhood_prompts: tuple[str, ...]
    generation_prompts: tuple[str, ...] = ()
    attribute_prompts: tuple[str, ...] = ()
    target_new_id: str | None = None
    target_true_id: str | None = None

    format = "counterfact"

    @property
    def case_id(self):
        return self.request.case_id

    @property
    def rewrite_prompts(self) -> tuple[str, ...]:
        return (self.request.filled_prompt,)

    @classmethod
    def from_record(cls, record: dict, *, source: str | None = None, index: int = 0) -> "CounterFactCase":
        (request,) = requests_from_records([record], "counterfact", source=source)
        if request.target_true is None:
            raise RecordError("missing (CounterFact metrics compare the new target with the true one)",
                              source=source, index=index, field="requested_rewrite.target_true")
        rr = record["requested_rewrite"]
        return cls(request=request,
                   paraphrase_prompts=_string_list(record, "paraphrase_prompts", source, index),
                   neighborhood_prompts=_string_list(record, "neighborhood_prompts", source, index),
                   generation_prompts=_string_list(record, "generation_prompts", source, index, required=False),
                   attribute_prompts=_string_list(record, "attribute_prompts", source, index, required=False),
                   target_new_id=_object_id(rr.get("target_new")), target_true_id=_object_id(rr.get("target_true")))


@dataclass(frozen=True)
class ZsreCase:
    """One zsRE record (MEND's eval schema). The edit writes ``answers[0]`` into the question, as the
    reference conversion does; specificity reads the unrelated NQ question ``loc`` with its own answer."""

    request: EditRequest
    rephrase: str
    loc: str
    loc_ans: str

    format = "zsre"

    @property
    def case_id(self):
        return self.request.case_id

    @property
    def question(self) -> str:
        return self.request.filled_prompt

    @property
    def loc_prompt(self) -> str:
        """The reference appends ``"?"`` to the NQ question before its answer."""
        return self.loc + "?"

    @property
    def loc_target(self) -> str:
        return " " + self.loc_ans

    @classmethod
    def from_record(cls, record: dict, *, source: str | None = None, index: int = 0) -> "ZsreCase":
        (request,) = requests_from_records([record], "zsre", source=source, zsre_target="answers")
        fields = {}
        for key in ("rephrase", "loc", "loc_ans"):
            value = record.get(key)
            if not isinstance(value, str) or not value.strip():
                raise RecordError(f"expected a non-empty string; got {value!r}", source=source, index=index, field=key)
            fields[key] = value
        return cls(request=request, **fields)


EvalCase = CounterFactCase | ZsreCase


def cases_from_records(records: Sequence[Any], fmt: str = "auto", *, source: str | None = None) -> tuple[str, list]:
    """Parse records into cases. ``fmt`` is ``counterfact``, ``zsre`` or ``auto`` (decided by the first
    record; every record must then have that format). Returns ``(format, cases)``."""
    records = list(records)
    if not records:
        raise RecordError("no records to evaluate", source=source)
    if fmt == "auto":
        try:
            fmt = detect_format(records[0])
        except RecordError as exc:
            raise RecordError(str(exc), source=source, index=0) from None
        if fmt not in FORMATS:
            raise RecordError(f"looks like a {fmt} request file; evaluation needs CounterFact or zsRE records "
                              "(with paraphrase and neighbourhood prompts)", source=source, index=0)
    if fmt not in FORMATS:
        raise RecordError(f"unknown evaluation format {fmt!r}; expected counterfact, zsre or auto", source=source)
    cls = CounterFactCase if fmt == "counterfact" else ZsreCase
    cases = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise RecordError(f"expected an object; got {type(record).__name__}", source=source, index=index)
        if "case_id" not in record:
            record = {**record, "case_id": index}
        try:
            cases.append(cls.from_record(record, source=source, index=index))
        except RecordError as exc:
            if exc.index == index:
                raise
            # requests_from_records numbered the record 0; name the real index.
            raise RecordError(str(exc).split(": ", 1)[-1], source=source, index=index, field=exc.field) from None
    return fmt, cases


def load_cases(path: str | Path, fmt: str = "auto", *, limit: int | None = None) -> tuple[str, list]:
    """Read a CounterFact or zsRE file into cases (the first ``limit`` records). Returns ``(format, cases)``."""
    records = read_records(path)
    if limit is not None:
        if limit < 1:
            raise RecordError(f"asked for {limit} records; expected at least 1", source=str(path))
        records = records[:limit]
    return cases_from_records(records, fmt, source=str(path))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
