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
from dataclasses import dataclass
from typing import Sequence

import torch

from ..text import encode

__all__ = ["GenerationSettings", "sample_texts", "prompt_seed"]


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


@torch.no_grad()
def _sample_batch(model, ids: torch.Tensor, uniforms: torch.Tensor, max_length: int, top_k: int) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=True)
    past = out.past_key_values
    logits = out.logits[:, -1]
    step = 0
    while ids.shape[1] < max_length:
        probs = torch.softmax(logits.float(), dim=-1)
        top_p, top_i = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        cdf = (top_p / top_p.sum(-1, keepdim=True)).cumsum(-1)
        # Inverse-CDF draw with the row's own uniform number: the same as torch.multinomial on the
        # renormalised top-k, but reproducible per prompt.
        choice = (cdf < uniforms[:, step:step + 1]).sum(-1).clamp_max(top_i.shape[-1] - 1)
        nxt = top_i.gather(-1, choice.unsqueeze(-1))
        ids = torch.cat([ids, nxt], dim=1)
        step += 1
        if ids.shape[1] >= max_length:
            break
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1]
    return ids


def sample_texts(model, tokenizer, prompts: Sequence[str], seeds: Sequence[int],
                 settings: GenerationSettings = GenerationSettings(), *, progress: bool = False) -> list[str]:
    """Generate one text per prompt, prompt ``i`` sampling with ``seeds[i]``; returns the decoded texts
    (prompt included), in order."""
    from tqdm.auto import tqdm

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    device = next(model.parameters()).device
    encoded = [encode(tokenizer, p) for p in prompts]
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(encoded):
        if not ids:
            raise ValueError(f"generation prompt {i} ({prompts[i]!r}) tokenises to no tokens")
        by_length[len(ids)].append(i)
    special = [t for t in getattr(tokenizer, "all_special_tokens", []) if t]
    texts: list[str | None] = [None] * len(prompts)
    steps = max(settings.max_length, 1)
    with tqdm(total=len(prompts), desc="generating", unit="prompt", disable=not progress, leave=False) as bar:
        for length in sorted(by_length):
            group = by_length[length]
            for start in range(0, len(group), settings.max_batch):
                index = group[start:start + settings.max_batch]
                if length >= settings.max_length:
                    out = [encoded[i] for i in index]
                else:
                    ids = torch.tensor([encoded[i] for i in index], dtype=torch.long, device=device)
                    uniforms = torch.stack([torch.rand(steps, generator=torch.Generator().manual_seed(seeds[i]),
                                                       dtype=torch.float64) for i in index]).to(device)
                    out = _sample_batch(model, ids, uniforms.float(), settings.max_length, settings.top_k).tolist()
                for i, row in zip(index, out):
                    texts[i] = _clean(tokenizer.decode(row), special)
                bar.update(len(index))
    return texts  # type: ignore[return-value]
