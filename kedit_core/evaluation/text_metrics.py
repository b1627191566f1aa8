"""Text statistics for the generation metrics: word tokens, n-gram entropy (GE) and TF-IDF
similarity (RS).

The reference (ROME/MEMIT ``eval_utils_counterfact``) tokenises words with NLTK's ``word_tokenize``
(Punkt sentence splitting + Treebank word rules), which needs the Punkt data files, and fits
scikit-learn's ``TfidfVectorizer``. kedit depends on neither: :func:`word_tokenize` follows the
Treebank conventions with one regular expression (punctuation split off, ``n't`` and ``'s``-style
clitics separated, hyphenated words, numbers and acronyms kept whole); without Punkt it also splits the
period of abbreviations such as ``Mr.``, which shifts GE by a hair. :class:`TfidfModel` implements the
``TfidfVectorizer`` defaults exactly (lower-casing, tokens of 2+ word characters, raw term counts,
smoothed idf ``ln((1 + n) / (1 + df)) + 1``, L2 normalisation).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Iterable, Mapping, Sequence

__all__ = ["word_tokenize", "ngram_entropy", "generation_entropy", "TfidfModel", "read_documents", "NGRAM_ORDERS",
           "NGRAM_WEIGHTS"]

NGRAM_ORDERS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)

_WORD = re.compile(r"""
      (?:[^\W\d_]\.){2,}                 # acronyms and initials run together: U.S., e.g.
    | \d+(?:[.,:/]\d+)*                  # numbers: 1,000.5  12:30  1/2
    | \w+?(?=n['’]t\b)                   # "do" of "don't" (Treebank: do + n't)
    | n['’]t\b
    | ['’](?:s|re|ve|ll|d|m)\b           # clitics: 's 're 've 'll 'd 'm
    | \w+(?:[-‐]\w+)*                    # words, hyphenated words
    | \.\.\.|--|``|''                    # multi-character punctuation
    | [^\w\s]                            # any other symbol on its own
""", re.VERBOSE | re.IGNORECASE)

_TFIDF_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token_pattern


def word_tokenize(text: str) -> list[str]:
    """Split text into word tokens the Treebank way (see the module docstring for how this relates to
    NLTK's ``word_tokenize``)."""
    return _WORD.findall(text)


def ngram_entropy(text: str, orders: Sequence[int] = NGRAM_ORDERS, weights: Sequence[float] = NGRAM_WEIGHTS) -> float:
    """The reference's per-text fluency: for each ``n`` the entropy in bits of the text's n-gram
    frequency distribution (over word tokens), times its weight, then the arithmetic mean over ``n``
    (defaults: ``(2/3·H2 + 4/3·H3) / 2``). A text with no n-grams of some order contributes 0 for it."""
    if len(orders) != len(weights):
        raise ValueError(f"{len(orders)} n-gram orders but {len(weights)} weights")
    tokens = word_tokenize(text)
    terms = []
    for n, w in zip(orders, weights):
        counts = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        total = sum(counts.values())
        h = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        terms.append(w * h)
    return sum(terms) / len(terms)


def generation_entropy(texts: Iterable[str]) -> float:
    """Mean :func:`ngram_entropy` over a record's generated texts (the per-record GE, before ×100)."""
    values = [ngram_entropy(t) for t in texts]
    if not values:
        raise ValueError("no texts")
    return sum(values) / len(values)


class TfidfModel:
    """TF-IDF vectors with scikit-learn ``TfidfVectorizer``'s default settings, fitted on a corpus."""

    def __init__(self, idf: Mapping[str, float], num_documents: int):
        self.idf = dict(idf)
        self.num_documents = num_documents

    @staticmethod
    def terms(text: str) -> list[str]:
        return _TFIDF_TOKEN.findall(text.lower())

    @classmethod
    def fit(cls, documents: Iterable[str]) -> "TfidfModel":
        df: Counter = Counter()
        n = 0
        for doc in documents:
            n += 1
            df.update(set(cls.terms(doc)))
        if n == 0:
            raise ValueError("cannot fit TF-IDF on an empty corpus")
        idf = {term: math.log((1 + n) / (1 + count)) + 1.0 for term, count in df.items()}
        return cls(idf, n)

    def vector(self, text: str) -> dict[str, float]:
        """The L2-normalised TF-IDF vector of ``text`` (terms outside the fitted vocabulary are dropped)."""
        counts = Counter(t for t in self.terms(text) if t in self.idf)
        vec = {t: c * self.idf[t] for t, c in counts.items()}
        norm = math.sqrt(sum(v * v for v in vec.values()))
        return {t: v / norm for t, v in vec.items()} if norm > 0 else {}

    def similarity(self, text_a: str, text_b: str) -> float:
        """Cosine similarity of the two texts' TF-IDF vectors; 0 when either has no known term."""
        a, b = self.vector(text_a), self.vector(text_b)
        if len(a) > len(b):
            a, b = b, a
        return sum(v * b.get(t, 0.0) for t, v in a.items())


def read_documents(path) -> list[str]:
    """Documents to fit TF-IDF on: a text file (one document per non-empty line, as WikiText stores
    paragraphs), a JSON list of strings or of ``{"text": ...}`` objects, the reference's
    ``attribute_snippets.json`` (every sample's text), or JSONL of either kind."""
    import json
    from pathlib import Path

    from ..errors import RecordError

    path = Path(path)
    if not path.exists():
        raise RecordError(f"file not found: {path}")
    text = path.read_text(encoding="utf-8")

    def from_item(item, index):
        if isinstance(item, str):
            return [item]
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            return [item["text"]]
        if isinstance(item, dict) and isinstance(item.get("samples"), list):
            return [s["text"] if isinstance(s, dict) else s for s in item["samples"]]
        raise RecordError("expected a string, {\"text\": ...} or {\"samples\": [{\"text\": ...}]}", source=str(path),
                          index=index)

    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecordError(f"not valid JSON (line {exc.lineno}): {exc.msg}", source=str(path)) from None
        if not isinstance(data, list):
            raise RecordError(f"expected a JSON list of documents; got {type(data).__name__}", source=str(path))
        docs = [d for i, item in enumerate(data) for d in from_item(item, i)]
    elif path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                try:
                    docs += from_item(json.loads(line), i)
                except json.JSONDecodeError as exc:
                    raise RecordError(f"line {i + 1} is not valid JSON: {exc.msg}", source=str(path)) from None
    else:
        docs = [line.strip() for line in text.splitlines() if line.strip()]
    if not docs:
        raise RecordError("no documents found", source=str(path))
    return docs
