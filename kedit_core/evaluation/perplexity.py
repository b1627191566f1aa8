"""Perplexity on held-out text: a cheap stand-in for "general ability" in lifelong-editing curves.

The documents are joined (``"\\n\\n"``), tokenised once (no special tokens; a BOS-adding tokenizer gets its
BOS at the start of every window), cut into non-overlapping windows of ``window`` tokens, and every token of
a window after its first (every one, for a tokenizer that adds a BOS before it) is scored by teacher forcing (:func:`kedit_core.text.target_logprobs`). Perplexity
is ``exp`` of the mean per-token NLL over all scored tokens. Windows never straddle: each one starts from
an empty context, so the number is comparable across models of the same tokenizer only.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..text import IGNORE, model_context_length, target_logprobs

__all__ = ["perplexity"]


@torch.no_grad()
def perplexity(model, tokenizer, documents: Sequence[str], *, window: int = 512, max_tokens: int | None = None,
               batch_windows: int = 8, progress: bool = False) -> dict:
    """``{"perplexity", "nll", "tokens", "windows", "window"}`` of ``model`` on ``documents`` (at most
    ``max_tokens`` tokens of them, counted before windowing). The window is capped at the model's context
    length."""
    window = min(window, model_context_length(model) or window)
    if window < 2:
        raise ValueError(f"window {window}: expected at least 2 tokens")
    ids = list(tokenizer("\n\n".join(documents), add_special_tokens=False)["input_ids"])
    if max_tokens is not None:
        ids = ids[:max_tokens]
    bos = getattr(tokenizer, "bos_token_id", None)
    adds_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [bos]
    step = window - 1 if adds_bos else window
    chunks = [ids[i:i + step] for i in range(0, len(ids), step)]
    chunks = [([bos] if adds_bos else []) + c for c in chunks if len(c) >= 2]
    if not chunks:
        raise ValueError("the held-out text has fewer than 2 tokens")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total_nll, total_tokens = 0.0, 0
    batches = [chunks[i:i + batch_windows] for i in range(0, len(chunks), batch_windows)]
    for batch in tqdm(batches, desc="perplexity", disable=not progress, leave=False):
        width = max(len(c) for c in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        for b, c in enumerate(batch):
            input_ids[b, :len(c)] = torch.tensor(c)
            attention[b, :len(c)] = 1
            labels[b, :len(c) - 1] = torch.tensor(c[1:])  # position p predicts token p + 1 (after a BOS: all text)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False).logits
        logp = target_logprobs(logits, labels.to(device))
        total_nll -= float(logp.double().sum())
        total_tokens += int((labels != IGNORE).sum())
    nll = total_nll / total_tokens
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": total_tokens, "windows": len(chunks),
            "window": window}


def documents_covering(tokenizer, documents: Sequence[str], max_tokens: int) -> int:
    """How many leading ``documents`` :func:`perplexity` reads for ``max_tokens`` tokens, plus one as a
    margin (tokens can merge across the joins): the documents from that index on are never scored, so
    statistics drawn from them stay disjoint from the held-out text."""
    seen = 0
    for index, document in enumerate(documents):
        seen += len(tokenizer(document, add_special_tokens=False)["input_ids"]) + 1
        if seen >= max_tokens:
            return min(index + 2, len(documents))
    return len(documents)
