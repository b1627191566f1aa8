"""Corpora: plain text, JSONL, strings in memory, Hugging Face datasets (optional)."""
import json
import sys
import types

import pytest

from kedit_core.errors import KeditError, RecordError
from kedit_core.stats import open_corpus
from kedit_core.stats.corpus import HFDatasetCorpus, JsonlCorpus, TextFileCorpus, TextListCorpus

from .conftest import WIKITEXT


def test_plain_text_blank_line_and_line_separated(tmp_path):
    blank = tmp_path / "paragraphs.txt"
    blank.write_text("First line\nof doc one.\n \n\nDoc two.\n\n  \nDoc three\n")
    corpus = open_corpus(blank)
    assert isinstance(corpus, TextFileCorpus) and corpus.separator == "blank"
    assert list(corpus.documents()) == ["First line\nof doc one.", "Doc two.", "Doc three"]
    lines = tmp_path / "lines.txt"
    lines.write_text("one\ntwo\r\nthree\n")
    assert list(open_corpus(lines).documents()) == ["one", "two", "three"]
    assert list(open_corpus(blank, separator="line").documents()) == ["First line", "of doc one.", "Doc two.",
                                                                      "Doc three"]


def test_wikitext_fixture_reads_as_paragraph_documents():
    corpus = open_corpus(WIKITEXT)
    docs = list(corpus.documents())
    assert len(docs) > 1000 and docs[0] == "= Robert Boulter ="
    ident = corpus.identity()
    assert ident["kind"] == "text" and len(ident["sha256"]) == 64 and "path" not in ident
    assert corpus.origin.endswith("wiki.test.raw")


def test_identity_follows_content_not_location(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("same text\n")
    b.write_text("same text\n")
    assert open_corpus(a).identity() == open_corpus(b).identity()
    b.write_text("other text\n")
    assert open_corpus(a).identity() != open_corpus(b).identity()
    assert open_corpus(["x", "y"]).identity() == open_corpus(["x", "y"]).identity()
    assert open_corpus(["x", "y"]).identity() != open_corpus(["y", "x"]).identity()


def test_jsonl_with_text_field_and_clear_record_errors(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "alpha"}) + "\n\n" + json.dumps({"body": "beta", "text": " "}) + "\n"
                    + json.dumps({"text": "gamma"}) + "\n")
    corpus = open_corpus(path)
    assert isinstance(corpus, JsonlCorpus) and list(corpus.documents()) == ["alpha", "gamma"]
    with pytest.raises(RecordError, match=r"docs.jsonl, record 0, field 'body'"):
        list(open_corpus(path, text_field="body").documents())
    path.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(RecordError, match="record 1.*not valid JSON"):
        list(open_corpus(path).documents())


def test_strings_in_memory():
    corpus = open_corpus(["  generated fact one ", "", "fact two"])
    assert isinstance(corpus, TextListCorpus)
    assert list(corpus.documents()) == ["generated fact one", "fact two"]
    assert corpus.identity()["documents"] == 2
    with pytest.raises(RecordError, match="record 1"):
        open_corpus(["ok", 3])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(KeditError, match="corpus file not found"):
        open_corpus(tmp_path / "nope.txt")


def test_hf_dataset_without_the_datasets_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    corpus = open_corpus("hf:wikitext:wikitext-103-raw-v1:train")
    assert isinstance(corpus, HFDatasetCorpus)
    assert corpus.identity() == {"kind": "hf-datasets", "dataset": "wikitext", "config": "wikitext-103-raw-v1",
                                 "split": "train", "text_field": "text", "revision": None}
    with pytest.raises(KeditError, match="optional 'datasets' package"):
        next(corpus.documents())


def test_hf_dataset_is_streamed_through_the_datasets_api(monkeypatch):
    calls = []

    def load_dataset(name, config, split, streaming, revision):
        calls.append((name, config, split, streaming))
        if name == "offline/missing":
            raise ConnectionError("Couldn't reach the Hugging Face Hub")
        return iter([{"text": " first "}, {"text": ""}, {"text": "second"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert list(open_corpus("hf:org/name").documents()) == ["first", "second"]
    assert calls[-1] == ("org/name", None, "train", True)
    with pytest.raises(KeditError, match="could not open dataset 'offline/missing'.*Couldn't reach"):
        list(open_corpus("hf:offline/missing::validation").documents())
    assert calls[-1] == ("offline/missing", None, "validation", True)
