"""Text corpora that covariance statistics are collected over.

A corpus yields documents (strings) in a fixed order and has an *identity*: a small JSON-able dict that
says exactly which text it is (a content hash, or a dataset name and split), recorded in every cache
file made from it so that statistics are reused only for the same text::

    open_corpus("wiki.test.raw")                 # plain text: documents separated by blank lines (or lines)
    open_corpus("docs.jsonl", text_field="text") # JSON lines with a text field
    open_corpus(["a generated text", "another"]) # strings in memory (identity = their content hash)
    open_corpus("hf:wikitext:wikitext-103-raw-v1:train")  # Hugging Face datasets (optional package)
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence, runtime_checkable

from ..errors import KeditError, RecordError
from ..requests import parse_json

__all__ = ["Corpus", "TextFileCorpus", "JsonlCorpus", "TextListCorpus", "HFDatasetCorpus", "open_corpus",
           "SEPARATORS"]

SEPARATORS = ("auto", "blank", "line")
_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.txt")
_HASH_BLOCK = 1 << 22


@runtime_checkable
class Corpus(Protocol):
    """What statistics need from a corpus."""

    name: str    # short label for file names and progress bars
    origin: str  # where the text came from (a path, a dataset), recorded as provenance


    def identity(self) -> dict:
        """JSON-able description of the text itself (a content hash, or dataset name and split) and how it
        is split into documents; not where a file happens to be, so a copy of a corpus reuses its cache."""

    def documents(self) -> Iterator[str]:
        """The documents, always in the same order; none of them empty."""


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


# Content hashes of files, remembered per (path, size, mtime) so one process hashes a large corpus once.
_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = _file_digest(path)
    return _DIGESTS[key]


def _check_file(path: Path) -> Path:
    if not path.exists():
        raise KeditError(f"corpus file not found: {path}")
    if not path.is_file():
        raise KeditError(f"corpus {path} is not a file")
    return path


class TextFileCorpus:
    """A plain text file. ``separator="blank"``: documents are separated by blank (whitespace-only)
    lines, as paragraphs are in WikiText; ``"line"``: every non-blank line is a document; ``"auto"``:
    ``blank`` if the file has any blank line, else ``line``. Documents are stripped of surrounding
    whitespace."""

    def __init__(self, path: str | os.PathLike, separator: str = "auto", encoding: str = "utf-8"):
        if separator not in SEPARATORS:
            raise KeditError(f"document separator {separator!r}: expected one of {', '.join(SEPARATORS)}")
        self.path = _check_file(Path(path))
        self.encoding = encoding
        self._separator = separator
        self.name = self.path.name
        self.origin = str(self.path.resolve())

    @property
    def separator(self) -> str:
        if self._separator == "auto":
            self._separator = "blank" if self._has_blank_line() else "line"
        return self._separator

    def _has_blank_line(self) -> bool:
        with open(self.path, encoding=self.encoding, errors="replace") as f:
            return any(not line.strip() for line in f)

    def identity(self) -> dict:
        return {"kind": "text", "sha256": file_sha256(self.path), "separator": self.separator}

    def documents(self) -> Iterator[str]:
        blank = self.separator == "blank"
        with open(self.path, encoding=self.encoding, errors="replace") as f:
            if not blank:
                for line in f:
                    if line.strip():
                        yield line.strip()
                return
            paragraph: list[str] = []
            for line in f:
                if line.strip():
                    paragraph.append(line)
                elif paragraph:
                    yield "".join(paragraph).strip()
                    paragraph = []
            if paragraph:
                yield "".join(paragraph).strip()


class JsonlCorpus:
    """JSON lines, one record per line; each record's ``text_field`` is a document (empty texts are
    skipped; a record without the field is an error naming the line)."""

    def __init__(self, path: str | os.PathLike, text_field: str = "text"):
        self.path = _check_file(Path(path))
        self.text_field = text_field
        self.name = self.path.name
        self.origin = str(self.path.resolve())

    def identity(self) -> dict:
        return {"kind": "jsonl", "sha256": file_sha256(self.path), "text_field": self.text_field}

    def documents(self) -> Iterator[str]:
        with open(self.path, encoding="utf-8") as f:
            for index, line in enumerate(f):
                if not line.strip():
                    continue
                record = parse_json(line, f"{self.path}, record {index}")
                if not isinstance(record, dict) or self.text_field not in record:
                    raise RecordError(f"expected an object with a text field {self.text_field!r}",
                                      source=str(self.path), index=index, field=self.text_field)
                text = record[self.text_field]
                if not isinstance(text, str):
                    raise RecordError(f"expected a string, got {type(text).__name__}", source=str(self.path),
                                      index=index, field=self.text_field)
                if text.strip():
                    yield text.strip()


class TextListCorpus:
    """Documents given as strings in memory (e.g. generated text); identified by their content hash."""

    def __init__(self, texts: Sequence[str], name: str | None = None):
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise RecordError(f"expected a string, got {type(t).__name__}", source="corpus texts", index=i)
        self.texts = [t.strip() for t in texts if t.strip()]
        h = hashlib.sha256()
        for t in self.texts:
            h.update(t.encode("utf-8"))
            h.update(b"\x00")
        self._sha256 = h.hexdigest()
        self.name = name or f"texts-{self._sha256[:8]}"
        self.origin = f"{len(self.texts)} strings in memory"

    def identity(self) -> dict:
        return {"kind": "texts", "sha256": self._sha256, "documents": len(self.texts)}

    def documents(self) -> Iterator[str]:
        yield from self.texts


class HFDatasetCorpus:
    """A Hugging Face ``datasets`` dataset, streamed (nothing beyond what is read is downloaded).
    Needs the optional ``datasets`` package (``pip install 'kedit[datasets]'``) and the network (or a
    local datasets cache)."""

    def __init__(self, dataset: str, config: str | None = None, split: str = "train", text_field: str = "text",
                 revision: str | None = None):
        self.dataset, self.config, self.split = dataset, config, split
        self.text_field, self.revision = text_field, revision
        self.name = "-".join(p for p in (dataset.replace("/", "_"), config, split) if p)
        self.origin = f"hf:{dataset}" + (f":{config}" if config else "") + f":{split}"

    def identity(self) -> dict:
        return {"kind": "hf-datasets", "dataset": self.dataset, "config": self.config, "split": self.split,
                "text_field": self.text_field, "revision": self.revision}

    def _load(self):
        try:
            import datasets
        except ImportError:
            raise KeditError(f"corpus hf:{self.dataset} needs the optional 'datasets' package "
                             "(pip install 'kedit[datasets]'), or give a local text/JSONL file instead") from None
        try:
            return datasets.load_dataset(self.dataset, self.config, split=self.split, streaming=True,
                                         revision=self.revision)
        except Exception as exc:  # the datasets library raises many types for "not reachable / not found"
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise KeditError(f"could not open dataset {self.dataset!r} (config {self.config!r}, split "
                             f"{self.split!r}): {first}. It has to come from the Hugging Face hub (network) or "
                             "the local datasets cache; a local text or JSONL file works offline.") from None

    def documents(self) -> Iterator[str]:
        for index, record in enumerate(self._load()):
            if self.text_field not in record:
                raise RecordError(f"expected a text field {self.text_field!r}; the dataset has "
                                  f"{sorted(record)}", source=f"hf:{self.dataset}", index=index, field=self.text_field)
            text = record[self.text_field]
            if isinstance(text, str) and text.strip():
                yield text.strip()


def _parse_hf(spec: str, text_field: str) -> HFDatasetCorpus:
    """``hf:NAME[:CONFIG][:SPLIT]``; ``NAME`` may contain a slash (``org/name``)."""
    parts = spec[3:].split(":")
    if not parts[0] or len(parts) > 3:
        raise KeditError(f"corpus {spec!r}: expected hf:NAME[:CONFIG][:SPLIT], e.g. hf:wikitext:wikitext-103-raw-v1:train")
    name, config, split = parts[0], (parts[1] or None) if len(parts) > 1 else None, parts[2] if len(parts) > 2 else "train"
    return HFDatasetCorpus(name, config, split or "train", text_field=text_field)


def open_corpus(spec: "str | os.PathLike | Sequence[str] | Corpus", *, text_field: str = "text",
                separator: str = "auto") -> Corpus:
    """A corpus from a path (``.jsonl``/``.ndjson``: JSON lines; anything else: plain text), an
    ``hf:NAME[:CONFIG][:SPLIT]`` dataset name, a list of strings, or an existing corpus object."""
    if isinstance(spec, (TextFileCorpus, JsonlCorpus, TextListCorpus, HFDatasetCorpus)):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        text = str(spec)
        if text.startswith("hf:"):
            return _parse_hf(text, text_field)
        path = Path(text)
        if path.name.lower().endswith(_JSONL_SUFFIXES):
            return JsonlCorpus(path, text_field=text_field)
        return TextFileCorpus(path, separator=separator)
    if isinstance(spec, Corpus):
        return spec
    if isinstance(spec, Iterable):
        return TextListCorpus(list(spec))
    raise KeditError(f"cannot use a {type(spec).__name__} as a corpus; give a file path, 'hf:NAME', or a list of strings")
