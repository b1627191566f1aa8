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
