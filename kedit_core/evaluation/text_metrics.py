"""Text statistics for the generation metrics: word tokens, n-gram entropy (GE) and TF-IDF
similarity (RS), on the libraries the reference uses.

The reference (ROME/MEMIT ``eval_utils_counterfact``) tokenises words with NLTK's ``word_tokenize``
(Punkt sentence splitting, then NLTK's Treebank word rules) and fits scikit-learn's ``TfidfVectorizer``.
:func:`word_tokenize` runs the same two NLTK stages without any downloaded data: Punkt with its default
parameters (``PunktSentenceTokenizer()``; the English model adds a learnt list of abbreviations, which
is data to download) and ``NLTKWordTokenizer``, the Treebank tokenizer ``word_tokenize`` calls. The one
difference from the reference is a period after an abbreviation that ends a Punkt sentence (``Mr.``,
``U.S.``), split off here. :class:`TfidfModel` is ``TfidfVectorizer`` with its defaults (lower-casing,
tokens of 2+ word characters, smoothed idf ``ln((1 + n) / (1 + df)) + 1``, L2-normalised rows); RS is the
cosine of two rows, 0 when either text has no known term (the reference divides by a zero norm there).
"""
from __future__ import annotations

import math
from collections import Counter
from functools import lru_cache
from typing import Iterable, Sequence

__all__ = ["word_tokenize", "ngram_entropy", "generation_entropy", "TfidfModel", "read_documents", "NGRAM_ORDERS",
           "NGRAM_WEIGHTS"]

NGRAM_ORDERS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)


@lru_cache(maxsize=1)
def _nltk_tokenizers():
    from nltk.tokenize.destructive import NLTKWordTokenizer
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    return PunktSentenceTokenizer(), NLTKWordTokenizer()


def word_tokenize(text: str) -> list[str]:
    """NLTK's ``word_tokenize`` without downloaded data (see the module docstring)."""
    sentences, words = _nltk_tokenizers()
    return [token for sentence in sentences.tokenize(text) for token in words.tokenize(sentence)]


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
    """scikit-learn's ``TfidfVectorizer`` (default settings) fitted on a corpus."""

    def __init__(self, vectorizer, num_documents: int):
        self.vectorizer = vectorizer
        self.num_documents = num_documents

    @classmethod
    def fit(cls, documents: Iterable[str]) -> "TfidfModel":
        from sklearn.feature_extraction.text import TfidfVectorizer

        from ..errors import KeditError

        documents = list(documents)
        if not documents:
            raise KeditError("cannot fit TF-IDF on an empty corpus")
        vectorizer = TfidfVectorizer()
        try:
            vectorizer.fit(documents)
        except ValueError as exc:  # "empty vocabulary": no word of two or more characters anywhere
            raise KeditError(f"cannot fit TF-IDF on these {len(documents)} documents: {exc}") from None
        return cls(vectorizer, len(documents))

    @property
    def idf(self) -> dict[str, float]:
        """``{term: idf}`` of the fitted vocabulary."""
        if not hasattr(self, "_idf"):
            weights = self.vectorizer.idf_
            self._idf = {term: float(weights[i]) for term, i in self.vectorizer.vocabulary_.items()}
        return self._idf

    def vector(self, text: str) -> dict[str, float]:
        """The L2-normalised TF-IDF vector of ``text`` as ``{term: weight}`` (unknown terms dropped)."""
        row = self.vectorizer.transform([text]).tocoo()
        if not hasattr(self, "_names"):
            self._names = self.vectorizer.get_feature_names_out()
        return {str(self._names[j]): float(v) for j, v in zip(row.col, row.data)}

    def similarity(self, text_a: str, text_b: str) -> float:
        """Cosine similarity of the two texts' TF-IDF vectors; 0 when either has no known term."""
        rows = self.vectorizer.transform([text_a, text_b])  # L2-normalised: the cosine is the dot product
        return float(rows[0].multiply(rows[1]).sum())


def read_documents(path) -> list[str]:
    """Documents to fit TF-IDF on: a text file (one document per non-empty line, as WikiText stores
    paragraphs), a JSON list of strings or of ``{"text": ...}`` objects, the reference's
    ``attribute_snippets.json`` (every sample's text), or JSONL of either kind."""
    from pathlib import Path

    from ..errors import RecordError
    from ..requests import parse_json, read_text_file

    path = Path(path)
    text = read_text_file(path, what="document file")

    def from_item(item, index):
        if isinstance(item, str):
            return [item]
        if isinstance(item, dict) and isinstance(item.get("text"), str):
            return [item["text"]]
        if isinstance(item, dict) and isinstance(item.get("samples"), list):
            texts = [s.get("text") if isinstance(s, dict) else s for s in item["samples"]]
            if all(isinstance(t, str) for t in texts):
                return texts
        raise RecordError("expected a string, {\"text\": ...} or {\"samples\": [{\"text\": ...}]}", source=str(path),
                          index=index)

    if path.suffix == ".json":
        data = parse_json(text, str(path))
        if not isinstance(data, list):
            raise RecordError(f"expected a JSON list of documents; got {type(data).__name__}", source=str(path))
        docs = [d for i, item in enumerate(data) for d in from_item(item, i)]
    elif path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(text.splitlines()):
            if line.strip():
                docs += from_item(parse_json(line, f"{path}, line {i + 1}"), i)
    else:
        docs = [line.strip() for line in text.splitlines() if line.strip()]
    if not docs:
        raise RecordError("no documents found", source=str(path))
    return docs
