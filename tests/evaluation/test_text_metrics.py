"""Word tokens, n-gram entropy (GE) and TF-IDF (RS) against values worked out by hand."""
import json
import math

import pytest

from kedit_core.errors import RecordError
from kedit_core.evaluation import TfidfModel, generation_entropy, ngram_entropy, word_tokenize
from kedit_core.evaluation.text_metrics import read_documents


def test_word_tokenize_follows_treebank_conventions():
    assert word_tokenize("Danielle Darrieux's mother tongue isn't French.") == [
        "Danielle", "Darrieux", "'s", "mother", "tongue", "is", "n't", "French", "."]
    assert word_tokenize('In 1999 it cost $1,000.50 -- (roughly) a co-star\'s "fee"... in the 2nd year') == [
        "In", "1999", "it", "cost", "$", "1,000.50", "--", "(", "roughly", ")", "a", "co-star", "'s", "``", "fee",
        "''", "...", "in", "the", "2nd", "year"]
    assert word_tokenize("Können Sie, bitte?") == ["Können", "Sie", ",", "bitte", "?"]
    # sentences first (Punkt), so a period ends its word everywhere, not only at the end of the text
    assert word_tokenize("He was born in Paris. He died in Rome.") == [
        "He", "was", "born", "in", "Paris", ".", "He", "died", "in", "Rome", "."]


def test_word_tokenize_is_nltk_without_downloaded_data():
    from nltk.tokenize.destructive import NLTKWordTokenizer

    sentence = "The team's coach, who wasn't there, said \"no\" -- twice."
    assert word_tokenize(sentence) == NLTKWordTokenizer().tokenize(sentence)  # one Punkt sentence: the same
    # Without the English Punkt model's learnt abbreviations, one that ends a Punkt sentence loses its
    # period to the sentence end (the reference's trained model keeps "U.S." whole here).
    assert word_tokenize("In the U.S. it cost less.")[:4] == ["In", "the", "U.S", "."]


def entropy_bits(counts):
    total = sum(counts)
    return -sum(c / total * math.log2(c / total) for c in counts)


def test_ngram_entropy_by_hand():
    # tokens a b a b a: bigrams ab ba ab ba (2,2); trigrams aba bab aba (2,1)
    expected = (2 / 3 * entropy_bits([2, 2]) + 4 / 3 * entropy_bits([2, 1])) / 2
    assert ngram_entropy("a b a b a") == pytest.approx(expected)
    assert ngram_entropy("one two") == pytest.approx((2 / 3 * 0 + 4 / 3 * 0) / 2)  # one bigram, no trigram
    assert ngram_entropy("") == 0.0
    # a text of all-distinct words: log2 of the n-gram counts
    words = " ".join(f"w{i}" for i in range(10))
    assert ngram_entropy(words) == pytest.approx((2 / 3 * math.log2(9) + 4 / 3 * math.log2(8)) / 2)
    assert generation_entropy(["a b a b a", words]) == pytest.approx((ngram_entropy("a b a b a") + ngram_entropy(words)) / 2)
    # repetitive (degenerate) text has lower entropy than varied text
    assert ngram_entropy("the the the the the the the") < ngram_entropy(words)


def test_tfidf_matches_scikit_learn_defaults_by_hand():
    docs = ["Paris is the capital of France", "Berlin is the capital of Germany", "I like France"]
    model = TfidfModel.fit(docs)
    n = 3
    idf = lambda df: math.log((1 + n) / (1 + df)) + 1  # noqa: E731
    assert model.idf["france"] == pytest.approx(idf(2)) and model.idf["paris"] == pytest.approx(idf(1))
    assert "i" not in model.idf  # tokens need two word characters
    v = model.vector("France France paris unknownword")
    raw = {"france": 2 * idf(2), "paris": idf(1)}
    norm = math.sqrt(sum(x * x for x in raw.values()))
    assert v == pytest.approx({k: x / norm for k, x in raw.items()})
    assert model.similarity("Paris France", "paris, FRANCE!") == pytest.approx(1.0)
    assert model.similarity("Paris", "Berlin") == 0.0
    assert model.similarity("", "Paris") == 0.0
    a, b = model.vector("Paris is nice"), model.vector("the capital of France is Paris")
    assert model.similarity("Paris is nice", "the capital of France is Paris") == pytest.approx(
        sum(a[t] * b.get(t, 0) for t in a))


def test_read_documents_formats(tmp_path):
    (tmp_path / "c.txt").write_text("first doc\n\n second doc \n")
    assert read_documents(tmp_path / "c.txt") == ["first doc", "second doc"]
    (tmp_path / "c.json").write_text(json.dumps(["a b", {"text": "c d"},
                                                 {"relation_id": "P1", "target_id": "Q1", "samples": [{"text": "e f"}]}]))
    assert read_documents(tmp_path / "c.json") == ["a b", "c d", "e f"]
    (tmp_path / "c.jsonl").write_text('"x y"\n{"text": "z w"}\n')
    assert read_documents(tmp_path / "c.jsonl") == ["x y", "z w"]
    (tmp_path / "bad.json").write_text(json.dumps([1]))
    with pytest.raises(RecordError, match="record 0"):
        read_documents(tmp_path / "bad.json")
