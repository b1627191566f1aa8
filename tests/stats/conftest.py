"""Shared pieces of the statistics tests: a small corpus and the direct computation C0 must match."""
import pytest
import torch

from kedit_core.tracing import TraceDict

from ..conftest import DATA

WIKITEXT = DATA / "wikitext-2-raw" / "wiki.test.raw"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared machine OpenMP threads waiting on busy
    cores make them many times slower: run these tests single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def wikitext_lines(n: int, start: int = 0) -> list[str]:
    lines = [line.strip() for line in WIKITEXT.read_text(encoding="utf-8").splitlines() if line.strip()]
    return lines[start:start + n]


@pytest.fixture(scope="session")
def small_corpus() -> list[str]:
    """40 WikiText paragraphs and headings: short and long documents (long ones get truncated)."""
    return wikitext_lines(40)


def document_ids(model, texts, tokens=None):
    """Token ids per document as the statistics must see them: the tokenizer's own encoding with its
    special tokens, cut to the context length, and the token budget cutting the last document."""
    out, total = [], 0
    for text in texts:
        ids = model.tokenizer(text)["input_ids"][: model.adapter.context_length]
        if tokens is not None:
            ids = ids[: tokens - total]
        if ids:
            out.append(ids)
            total += len(ids)
        if tokens is not None and total >= tokens:
            break
    return out


@torch.no_grad()
def direct_second_moments(model, layers, docs_ids):
    """Hooks + float64 Σ kkᵀ / count, one unpadded document at a time."""
    names = {layer: model.adapter.mlp_out_name(layer) for layer in layers}
    d = model.adapter.key_size
    sums = {layer: torch.zeros(d, d, dtype=torch.float64) for layer in layers}
    count = 0
    for ids in docs_ids:
        with TraceDict(model.model, list(names.values()), retain_input=True, retain_output=False) as td:
            model.model(input_ids=torch.tensor([ids]))
        for layer, name in names.items():
            keys = td[name].input[0].double()
            sums[layer] += keys.T @ keys
        count += len(ids)
    return {layer: s / count for layer, s in sums.items()}, count


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())
