"""Token rows for key extraction and value optimisation: every prompt a request is read or optimised
under, tokenised once, with the position of its fact token and (for value rows) the target labels.

Rows are grouped per request; :meth:`TokenRows.batch` right-pads any subset of them into tensors.
Two tokenisations of a rewriting prompt exist:

* ``"kedit"`` (fast mode): ``tok(template-filled prompt) + tok(target)[:-1]``, the target tokenised on
  its own, exactly as :mod:`kedit_core.text` scores targets everywhere else;
* ``"reference"``: the published code's ``tok(prompt_text + tok.decode(target[:-1]))`` with the target
  labels aligned to the end of the row.

The two agree whenever the tokenizer does not merge across the prompt/target boundary.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import KeditError
from ..requests import EditRequest
from ..text import IGNORE, encode_target
from .positions import encode_prompts
from .templates import fill_template

__all__ = ["TokenRows", "RowBatch", "key_rows", "value_rows", "KL_PROMPT"]

# compute_z/compute_v: the one prompt whose next-token distribution must not drift.
KL_PROMPT = "{} is a"


@dataclass
class RowBatch:
    input_ids: torch.Tensor       # [B, T] right-padded
    attention_mask: torch.Tensor  # [B, T]
    lookup: torch.Tensor          # [B] position of the fact token
    labels: torch.Tensor | None   # [B, T] target token each position's logits must predict, or -100

    @property
    def model_inputs(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


@dataclass
class TokenRows:
    """Tokenised rows; ``owner[r]`` is the request row ``r`` belongs to, ``kind[r]`` one of
    ``"prompt"`` (a template-filled prompt), ``"rewrite"`` (with target tokens), ``"kl"``."""

    ids: list[list[int]] = field(default_factory=list)
    lookup: list[int] = field(default_factory=list)
    labels: list[list[int] | None] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)
    kind: list[str] = field(default_factory=list)
    template: list[int] = field(default_factory=list)  # index into the flattened templates, or -1

    def __len__(self) -> int:
        return len(self.ids)

    def append(self, ids, lookup, labels, owner, kind, template=-1) -> None:
        self.ids.append(list(ids))
        self.lookup.append(int(lookup))
        self.labels.append(labels)
        self.owner.append(int(owner))
        self.kind.append(kind)
        self.template.append(int(template))

    def rows_of(self, owners: Sequence[int], kinds: Sequence[str] | None = None) -> list[int]:
        wanted = set(owners)
        return [r for r, o in enumerate(self.owner) if o in wanted and (kinds is None or self.kind[r] in kinds)]

    def lengths(self, rows: Sequence[int] | None = None) -> list[int]:
        rows = range(len(self.ids)) if rows is None else rows
        return [len(self.ids[r]) for r in rows]

    def batch(self, rows: Sequence[int], pad_id: int, device=None) -> RowBatch:
        """Right-pad ``rows`` into tensors (on ``device``)."""
        width = max(len(self.ids[r]) for r in rows)
        input_ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        has_labels = any(self.labels[r] is not None for r in rows)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long) if has_labels else None
        for b, r in enumerate(rows):
            ids = self.ids[r]
            input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention[b, : len(ids)] = 1
            if labels is not None and self.labels[r] is not None:
                labels[b, : len(self.labels[r])] = torch.tensor(self.labels[r], dtype=torch.long)
        lookup = torch.tensor([self.lookup[r] for r in rows], dtype=torch.long)
        out = RowBatch(input_ids, attention, lookup, labels)
        if device is not None:
            out = RowBatch(input_ids.to(device), attention.to(device), lookup.to(device),
                           None if labels is None else labels.to(device))
        return out


def key_rows(tokenizer, requests: Sequence[EditRequest], templates: Sequence[str], *, fact_token: str,
             rule: str) -> TokenRows:
    """One row per (request, template): the template filled with the request's prompt and subject.
    Rows are request-major (all templates of request 0, then request 1, ...)."""
    flat_templates = [fill_template(t, req.prompt) for req in requests for t in templates]
    subjects = [req.subject for req in requests for _ in templates]
    encoded = encode_prompts(tokenizer, flat_templates, subjects, fact_token=fact_token, rule=rule)
    rows = TokenRows()
    n_t = len(templates)
    for i, enc in enumerate(encoded):
        rows.append(enc.ids, enc.index, None, owner=i // n_t, kind="prompt", template=i % n_t)
    return rows


def value_rows(tokenizer, requests: Sequence[EditRequest], templates: Sequence[str], *, fact_token: str, rule: str,
               tokenization: str = "kedit") -> tuple[TokenRows, list[int]]:
    """Rows for value optimisation: per request, one rewriting row per template (prompt, then the
    target's tokens except the last, labels on the target tokens) and the KL row ``"{subject} is a"``.
    Returns the rows and each request's number of target tokens."""
    if tokenization not in ("kedit", "reference"):
        raise KeditError(f"unknown tokenisation {tokenization!r}; expected 'kedit' or 'reference'")
    rows = TokenRows()
    target_lengths = []
    targets = []
    for i, req in enumerate(requests):
        try:
            targets.append(encode_target(tokenizer, req.target_new))
        except ValueError:
            raise KeditError(f"request {i} (case {req.case_id}): target_new {req.target_new!r} tokenises to no "
                             "tokens") from None
    for i, req in enumerate(requests):
        target = targets[i]
        target_lengths.append(len(target))
        filled = [fill_template(t, req.prompt) for t in templates]
        if tokenization == "kedit":
            encoded = encode_prompts(tokenizer, filled, [req.subject] * len(filled), fact_token=fact_token, rule=rule)
            for t, enc in enumerate(encoded):
                ids = enc.ids + target[:-1]
                labels = [IGNORE] * (len(enc.ids) - 1) + target
                rows.append(ids, enc.index, labels, owner=i, kind="rewrite", template=t)
        else:
            prefix_text = tokenizer.decode(target[:-1]) if len(target) > 1 else ""
            encoded = encode_prompts(tokenizer, [f + prefix_text for f in filled], [req.subject] * len(filled),
                                     fact_token=fact_token, rule=rule)
            for t, enc in enumerate(encoded):
                n = len(enc.ids)
                if n < len(target):
                    raise KeditError(f"request {i}: the rewriting prompt {enc.text!r} is shorter than its target")
                labels = [IGNORE] * (n - len(target)) + target  # aligned to the end, as the reference does
                rows.append(enc.ids, enc.index, labels, owner=i, kind="rewrite", template=t)
        kl = encode_prompts(tokenizer, [KL_PROMPT], [req.subject], fact_token=fact_token, rule=rule)[0]
        rows.append(kl.ids, kl.index, None, owner=i, kind="kl")
    return rows, target_lengths
