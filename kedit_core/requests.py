"""Edit requests and the loaders for CounterFact, zsRE (MEND eval schema) and plain JSON/JSONL files.

A request is ``{prompt: "{} plays the sport of", subject: "LeBron James", target_new: "football"}``
with an optional ``target_true``. Targets are stored with a leading space, as the papers do.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .errors import EditConflictError, RecordError

__all__ = ["EditRequest", "load_requests", "requests_from_records", "requests_sha256", "detect_format",
           "read_records", "read_json_file", "read_text_file", "parse_json", "check_conflicts",
           "superseded_by_later"]


def _visible(text: str) -> bool:
    """Whether ``text`` has a character that shows (not only spaces, zero-width or control characters)."""
    return any(ch.isprintable() and not ch.isspace() for ch in text)


def _with_space(target: str) -> str:
    return target if target.startswith(" ") else " " + target


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt.format(subject)`` should continue with ``target_new``."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    case_id: int | str | None = None
    relation_id: str | None = None

    def __post_init__(self):
        self.validate()
        object.__setattr__(self, "target_new", _with_space(self.target_new))
        if self.target_true is not None:
            object.__setattr__(self, "target_true", _with_space(self.target_true))

    def validate(self, *, source: str | None = None, index: int | None = None) -> None:
        def fail(field: str, message: str):
            raise RecordError(message, source=source, index=index, field=field)

        if not isinstance(self.prompt, str):
            fail("prompt", f"expected a string with exactly one '{{}}'; got {type(self.prompt).__name__}")
        n = self.prompt.count("{}")
        if n != 1:
            fail("prompt", f"expected exactly one '{{}}' where the subject goes; found {n} in {self.prompt!r}")
        if not isinstance(self.subject, str) or not _visible(self.subject):
            fail("subject", f"expected a non-empty string with a visible character; got {self.subject!r}")
        if not isinstance(self.target_new, str) or not _visible(self.target_new):
            fail("target_new", f"expected a non-empty string with a visible character; got {self.target_new!r}")
        if self.target_true is not None and (not isinstance(self.target_true, str) or not self.target_true.strip()):
            fail("target_true", f"expected a non-empty string or null; got {self.target_true!r}")

    @property
    def filled_prompt(self) -> str:
        """The prompt with the subject in place (``str.replace``, so other braces are safe)."""
        return self.prompt.replace("{}", self.subject)

    @property
    def prefix(self) -> str:
        return self.prompt.split("{}")[0]

    def to_dict(self) -> dict:
        return asdict(self)


def requests_sha256(requests: Sequence[EditRequest]) -> str:
    """A stable hash of the requests (order matters), recorded in delta files."""
    payload = json.dumps([r.to_dict() for r in requests], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------------
# Reading files

def read_text_file(path: str | Path, *, what: str = "file", error: Callable[[str], Exception] = RecordError) -> str:
    """The UTF-8 text of ``path`` (a byte-order mark is dropped); a missing file, a directory, bytes that
    are not UTF-8 or a read error raise ``error(message)`` naming the file."""
    path = Path(path)
    if not path.exists():
        raise error(f"{what} not found: {path}")
    if not path.is_file():
        raise error(f"{path}: expected a {what}; found a directory or special file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise error(f"{path}: cannot be read ({exc.strerror or exc})") from None


def parse_json(text: str, where: str, error: Callable[[str], Exception] = RecordError) -> Any:
    """``json.loads`` with every failure as ``error`` naming ``where`` (file, or file and line)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{where}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply to read") from None


def read_json_file(path: str | Path, *, what: str = "JSON file", error: Callable[[str], Exception] = RecordError) -> Any:
    """The parsed JSON of ``path``, every failure as ``error`` naming the file."""
    return parse_json(read_text_file(path, what=what, error=error), str(path), error)


def read_records(path: str | Path) -> list[Any]:
    """The records of a JSON list file or a JSONL file, with errors naming the file and line."""
    path = Path(path)
    text = read_text_file(path, what="request file")
    stripped = text.lstrip()
    if path.suffix == ".jsonl" or (stripped and stripped[0] == "{" and "\n{" in stripped):
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                records.append(parse_json(line, f"{path}, line {lineno}"))
        return records
    data = parse_json(text, str(path))
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise RecordError(f"expected a JSON list of records; got {type(data).__name__}", source=str(path))
    return data


def detect_format(record: Any) -> str:
    if isinstance(record, dict):
        if "requested_rewrite" in record:
            return "counterfact"
        if "src" in record and "loc" in record:
            return "zsre"
        if len({"prompt", "subject", "target_new"} & set(record)) >= 2:  # plain, perhaps with a field missing
            return "plain"
    raise RecordError("cannot tell the format of this record: expected CounterFact ('requested_rewrite'), "
                      "zsRE MEND ('src', 'subject', 'loc', ...) or plain ('prompt', 'subject', 'target_new')")


def _get(record: Any, key: str, source, index, expected: str, *, parent: str | None = None):
    field = f"{parent}.{key}" if parent else key
    if not isinstance(record, dict):
        raise RecordError(f"expected an object; got {type(record).__name__}", source=source, index=index,
                          field=parent)
    if key not in record:
        raise RecordError(f"missing (expected {expected})", source=source, index=index, field=field)
    return record[key]


def _str_field(value: Any, field: str, source, index) -> str:
    if isinstance(value, dict) and "str" in value:  # CounterFact's {"str": ..., "id": ...}
        value = value["str"]
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"expected a non-empty string; got {value!r}", source=source, index=index, field=field)
    return value


def _request_from(record: Any, fmt: str, source: str | None, index: int, *, zsre_target: str) -> EditRequest:
    if fmt == "counterfact":
        rr = _get(record, "requested_rewrite", source, index, "an object with prompt, subject, target_new")
        fields = {k: _get(rr, k, source, index, "a value", parent="requested_rewrite")
                  for k in ("prompt", "subject", "target_new")}
        target_true = rr.get("target_true") if isinstance(rr, dict) else None
        kwargs = dict(
            prompt=fields["prompt"],
            subject=_str_field(fields["subject"], "requested_rewrite.subject", source, index),
            target_new=_str_field(fields["target_new"], "requested_rewrite.target_new", source, index),
            target_true=None if target_true is None else _str_field(target_true, "requested_rewrite.target_true",
                                                                    source, index),
            case_id=record.get("case_id", index), relation_id=rr.get("relation_id"))
        prefix = "requested_rewrite."
    elif fmt == "zsre":
        src = _get(record, "src", source, index, "the question text")
        subject = _str_field(_get(record, "subject", source, index, "the subject string"), "subject", source, index)
        if not isinstance(src, str) or src.count(subject) < 1:
            raise RecordError(f"the subject {subject!r} does not occur in the question {src!r}", source=source,
                              index=index, field="src")
        if zsre_target == "answers":  # the reference MEMIT/ROME conversion edits towards answers[0]
            answers = _get(record, "answers", source, index, "a non-empty list of answers")
            if not isinstance(answers, list) or not answers:
                raise RecordError(f"expected a non-empty list; got {answers!r}", source=source, index=index,
                                  field="answers")
            target = _str_field(answers[0], "answers[0]", source, index)
        else:
            target = _str_field(_get(record, "alt", source, index, "the new answer"), "alt", source, index)
        kwargs = dict(prompt=src.replace(subject, "{}"), subject=subject, target_new=target, target_true=None,
                      case_id=record.get("case_id", index))
        prefix = ""
    elif fmt == "plain":
        kwargs = {k: _get(record, k, source, index, "a string") for k in ("prompt", "subject", "target_new")}
        kwargs["target_true"] = record.get("target_true")
        kwargs["case_id"] = record.get("case_id", index)
        kwargs["relation_id"] = record.get("relation_id")
        prefix = ""
    else:
        raise RecordError(f"unknown request format {fmt!r}; expected counterfact, zsre, plain or auto")
    try:
        return EditRequest(**kwargs)
    except RecordError as exc:
        raise RecordError(str(exc).split(": ", 1)[-1], source=source, index=index,
                          field=prefix + (exc.field or "")) from None


def requests_from_records(records: Iterable[Any], fmt: str = "auto", *, source: str | None = None,
                          zsre_target: str = "answers") -> list[EditRequest]:
    """Convert parsed records to :class:`EditRequest` objects; a bad record raises :class:`RecordError`
    naming ``source``, the record index and the field."""
    records = list(records)
    if zsre_target not in ("answers", "alt"):
        raise RecordError(f"zsre_target must be 'answers' (the reference's choice) or 'alt'; got {zsre_target!r}")
    out = []
    for index, record in enumerate(records):
        record_fmt = fmt
        if fmt == "auto":
            try:
                record_fmt = detect_format(record)
            except RecordError as exc:
                raise RecordError(str(exc), source=source, index=index) from None
        out.append(_request_from(record, record_fmt, source, index, zsre_target=zsre_target))
    return out


def load_requests(path: str | Path, fmt: str = "auto", *, limit: int | None = None,
                  zsre_target: str = "answers") -> list[EditRequest]:
    """Load edit requests from a CounterFact, zsRE (MEND eval) or plain JSON/JSONL file.

    ``zsre_target="answers"`` follows the reference conversion (edit towards ``answers[0]``);
    ``"alt"`` edits towards MEND's alternative answer instead.
    """
    records = read_records(path)
    if limit is not None:
        records = records[:limit]
    return requests_from_records(records, fmt, source=str(path), zsre_target=zsre_target)


def check_conflicts(requests: Sequence[EditRequest]) -> list[str]:
    """Raise :class:`EditConflictError` for two requests with the same subject and prompt but different
    targets (naming both); return warnings for exact duplicates and for one subject edited through
    different prompts with the same words before the subject, whose MEMIT keys collide."""
    seen: dict[tuple[str, str], int] = {}
    by_subject: dict[tuple[str, str], set[str]] = {}  # (subject, words before it) -> prompts
    warnings = []
    for i, req in enumerate(requests):
        key = (req.subject, req.prompt)
        if key in seen and requests[seen[key]].target_new == req.target_new:
            j = seen[key]
            warnings.append(f"requests {j} (case {requests[j].case_id}) and {i} (case {req.case_id}) are the same edit "
                            f"({req.subject!r} -> {req.target_new!r}); it is written twice, which weights it double")
        if key in seen and requests[seen[key]].target_new != req.target_new:
            j = seen[key]
            raise EditConflictError(
                f"requests {j} (case {requests[j].case_id}) and {i} (case {req.case_id}) edit the same subject "
                f"{req.subject!r} and prompt {req.prompt!r} to different targets: "
                f"{requests[j].target_new!r} vs {req.target_new!r}")
        seen.setdefault(key, i)
        # the key is read at the subject's last token, so it sees only the words before the subject:
        # prompts that share those words give the same key ("{} plays", "{} was born in")
        by_subject.setdefault((req.subject, req.prompt.split("{}")[0]), set()).add(req.prompt)
    for (subject, _), prompts in by_subject.items():
        if len(prompts) > 1:
            warnings.append(f"subject {subject!r} is edited through {len(prompts)} different prompts in one batch that "
                            "share the words before it; their keys coincide at the subject's last token, so the "
                            "edits compete")
    return warnings


def superseded_by_later(requests: Sequence[EditRequest]) -> list[int | None]:
    """For each request of a stream (in the order the edits are made), the index of the first later request
    that edits the same subject, or None. The editors that write keys (MEMIT, AlphaEdit, ROME, ...) read the
    key at the subject's last token, so a later edit of the same subject may write over the earlier one's value;
    scoring such edits apart tells overwriting from forgetting (how far the keys of two prompts of one subject
    differ decides which it is)."""
    later: dict[str, int] = {}
    out: list[int | None] = [None] * len(requests)
    for i in range(len(requests) - 1, -1, -1):
        subject = requests[i].subject.strip()
        out[i] = later.get(subject)
        later[subject] = i
    return out
