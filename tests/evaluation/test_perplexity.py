"""Held-out perplexity: equals the mean token NLL that transformers' own loss gives on the same windows,
for tokenizers with and without a BOS, batched or not."""
import math

import pytest
import torch

from kedit_core.evaluation import perplexity
from kedit_core.testing import tiny_model


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_perplexity_matches_the_models_own_loss(family, wikitext_path):
    model = tiny_model(family, num_layers=2, hidden_size=32)
    tok = model.tokenizer
    docs = wikitext_path.read_text(encoding="utf-8")[:6000].split("\n")
    docs = [d for d in docs if d.strip()]
    window, budget = 64, 400
    got = perplexity(model.model, tok, docs, window=window, max_tokens=budget, batch_windows=3)
    ids = tok("\n\n".join(docs), add_special_tokens=False)["input_ids"][:budget]
    bos = [tok.bos_token_id] if tok("x")["input_ids"][:1] == [tok.bos_token_id] else []
    step = window - len(bos)
    nll, count = 0.0, 0
    for i in range(0, len(ids), step):
        chunk = torch.tensor([bos + ids[i:i + step]])
        if chunk.shape[1] < 2:
            continue
        with torch.no_grad():
            loss = model.model(input_ids=chunk, labels=chunk).loss  # mean over the chunk's predicted tokens
        nll += float(loss) * (chunk.shape[1] - 1)
        count += chunk.shape[1] - 1
    assert got["tokens"] == count == budget - (0 if bos else got["windows"])
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert got["windows"] == math.ceil(budget / step)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_documents_covering_keeps_the_scored_tokens_inside(family, wikitext_path):
    """Statistics drawn from the documents after documents_covering's index never share a token with
    what perplexity scores: the first `budget` tokens of the full text are those of the covered prefix,
    and a shorter prefix would not cover them (the index is tight up to its one-document margin)."""
    from kedit_core.evaluation import documents_covering

    tok = tiny_model(family, num_layers=2, hidden_size=32).tokenizer
    docs = [d for d in wikitext_path.read_text(encoding="utf-8")[:20000].split("\n") if d.strip()]
    for budget in (50, 400, 1500):
        n = documents_covering(tok, docs, budget)
        full = tok("\n\n".join(docs), add_special_tokens=False)["input_ids"][:budget]
        prefix = tok("\n\n".join(docs[:n]), add_special_tokens=False)["input_ids"]
        assert len(prefix) >= budget and prefix[:budget] == full
        too_short = tok("\n\n".join(docs[:max(n - 3, 0)]), add_special_tokens=False)["input_ids"]
        assert len(too_short) < budget
    assert documents_covering(tok, docs[:3], 10 ** 9) == 3
