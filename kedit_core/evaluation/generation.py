"""Seeded top-k sampling for the generation metrics (GE, RS).

Follows the reference's ``generate_fast``: top-k (5) sampling from the softmax, until the sequence
(prompt included) is ``max_length`` (100) tokens long, EOS not treated specially; the decoded text keeps
the prompt, is NFKD-normalised and has blank lines folded into spaces. What kedit adds: every prompt
draws its random numbers from its own seed, so a text does not depend on which other prompts share its
batch or on the global RNG, and the pre- and post-edit generations of a prompt use the same draws.
Prompts of equal token length are batched together, so no padding (and no position-id or mask
handling that differs between architectures) is needed; a KV cache keeps each step to one token.
"""
from __future__ import annotations

import hashlib
import unicodedata
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from ..text import (cache_kwargs, encode, fit_prompt, model_context_length, output_cache,
                    supports_logits_to_keep)

__all__ = ["GenerationSettings", "greedy_completions", "sample_ids", "sample_texts", "prompt_seed", "uniform_draws",
           "top_k_choice"]


@dataclass(frozen=True)
class GenerationSettings:
    """How generation metrics generate. ``max_length`` counts the prompt's tokens too (the reference's
    ``max_out_len``)."""

    max_length: int = 100
    top_k: int = 5
    seed: int = 0
    max_batch: int = 64

    def __post_init__(self):
        if self.max_length < 1 or self.top_k < 1 or self.max_batch < 1:
            raise ValueError(f"generation settings must be positive: {self}")


def prompt_seed(seed: int, *keys) -> int:
    """A 63-bit seed derived from ``seed`` and identifying keys (case id, prompt index)."""
    digest = hashlib.sha256(":".join(map(str, (seed, *keys))).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _clean(text: str, special_tokens: Sequence[str]) -> str:
    text = unicodedata.normalize("NFKD", text).replace("\n\n", " ")
    for token in special_tokens:
        text = text.replace(token, "")
    return text


def top_k_choice(logits: torch.Tensor, uniforms: torch.Tensor, top_k: int) -> torch.Tensor:
    """Sample a token per row from the renormalised top-k of ``softmax(logits)`` ([B, V]) by inverse CDF
    with the row's uniform number ([B]): distributed as ``torch.multinomial`` on the top-k, but
    reproducible per row."""
    probs = torch.softmax(logits.float(), dim=-1)
    top_p, top_i = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
    cdf = (top_p / top_p.sum(-1, keepdim=True)).cumsum(-1)
    choice = (cdf < uniforms.to(cdf.dtype).unsqueeze(-1)).sum(-1).clamp_max(top_i.shape[-1] - 1)
    return top_i.gather(-1, choice.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def _sample_batch(model, ids: torch.Tensor, uniforms: torch.Tensor, max_length: int, top_k: int) -> torch.Tensor:
    # Only the last position's logits are needed from the prompt pass.
    first = {"logits_to_keep": 1} if supports_logits_to_keep(model) else {}
    out = model(input_ids=ids, use_cache=True, **first)
    past = output_cache(out)
    logits = out.logits[:, -1]
    step = 0
    while ids.shape[1] < max_length:
        nxt = top_k_choice(logits, uniforms[:, step], top_k).unsqueeze(-1)
        ids = torch.cat([ids, nxt], dim=1)
        step += 1
        if ids.shape[1] >= max_length:
            break
        out = model(input_ids=nxt, use_cache=True, **cache_kwargs(model, past))
        past, logits = output_cache(out), out.logits[:, -1]
    return ids


def sample_ids(model, tokenizer, prompts: Sequence[str], seeds: Sequence[int],
               settings: GenerationSettings = GenerationSettings(), *, progress: bool = False) -> list[list[int]]:
    """Sample one continuation per prompt, prompt ``i`` drawing from ``seeds[i]``; returns each full token
    sequence (prompt tokens first, ``settings.max_length`` tokens in all, or the prompt alone if it is
    already that long), in order. The length is capped at the model's context, and prompts longer than
    that keep their last tokens."""
    from tqdm.auto import tqdm

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    device = next(model.parameters()).device
    context = model_context_length(model)
    max_length = min(settings.max_length, context) if context else settings.max_length
    if max_length != settings.max_length:
        settings = replace(settings, max_length=max_length)
    bos = getattr(tokenizer, "bos_token_id", None)
    encoded = [encode(tokenizer, p) for p in prompts]
    encoded = [fit_prompt(ids, max_length, keep_first=bool(ids) and ids[0] == bos) for ids in encoded]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"generation prompt {i} ({prompts[i]!r}) tokenises to no tokens")
        by_length[len(ids)].append(i)
    out: list[list[int] | None] = [None] * len(prompts)
    with tqdm(total=len(prompts), desc="generating", unit="prompt", disable=not progress, leave=False) as bar:
        for length in sorted(by_length):
            group = by_length[length]
            for start in range(0, len(group), settings.max_batch):
                index = group[start:start + settings.max_batch]
                if length >= settings.max_length:
                    rows = [encoded[i] for i in index]
                else:
                    ids = torch.tensor([encoded[i] for i in index], dtype=torch.long, device=device)
                    uniforms = torch.stack([uniform_draws(seeds[i], settings.max_length) for i in index]).to(device)
                    rows = _sample_batch(model, ids, uniforms, settings.max_length, settings.top_k).tolist()
                for i, row in zip(index, rows):
                    out[i] = row
                bar.update(len(index))
    return out  # type: ignore[return-value]


def uniform_draws(seed: int, count: int) -> torch.Tensor:
    """The uniform numbers one prompt's sampling consumes, one per generated token (CPU, float32)."""
    return torch.rand(count, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


def sample_texts(model, tokenizer, prompts: Sequence[str], seeds: Sequence[int],
                 settings: GenerationSettings = GenerationSettings(), *, progress: bool = False) -> list[str]:
    """:func:`sample_ids`, decoded and cleaned as the reference does (prompt included, NFKD, blank lines
    folded into spaces, special tokens removed)."""
    special = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
    return [_clean(tokenizer.decode(row), special)
            for row in sample_ids(model, tokenizer, prompts, seeds, settings, progress=progress)]


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 12) -> list[str]:
    """The model's own greedy continuation of each prompt (what a user sees when they ask it), cut at
    the first newline or end-of-text token. One prompt at a time with a KV cache: no padding, so any
    architecture gives its plain answer."""
    device = next(model.parameters()).device
    eos = getattr(tokenizer, "eos_token_id", None)
    out = []
    for prompt in prompts:
        ids = torch.tensor([encode(tokenizer, prompt)], device=device)
        new: list[int] = []
        past = None
        step = ids
        for _ in range(max_new_tokens):
            output = model(input_ids=step, use_cache=True, **cache_kwargs(model, past))
            past = output_cache(output)
            token = int(output.logits[0, -1].argmax())
            if token == eos:
                break
            new.append(token)
            if "\n" in tokenizer.decode(new):
                break
            step = torch.tensor([[token]], device=device)
        out.append(tokenizer.decode(new, skip_special_tokens=True).split("\n")[0])
    return out
