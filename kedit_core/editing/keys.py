"""Reading keys (and other activations) at the fact token of many prompts in one pass.

:func:`collect` runs the model over token rows in length-sorted micro-batches, stopped right after the
deepest module it needs, and for each :class:`Capture` gathers that module's input or output at every
row's fact token and sums it, weighted, into per-request outputs with the ``gather_segment_sum`` op.
The weights express the averaging:

* :func:`group_mean_weights` — MEMIT's ``compute_ks``: mean within each template group, then across
  groups (``0.5 · bare + 0.5 · mean(prefixed)`` for the usual two groups);
* :func:`flat_mean_weights` — ROME's ``compute_u``: a plain mean over all templates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from tqdm.auto import tqdm

from .. import ops
from ..text import batches_by_tokens
from ..tracing import TraceDict, primary
from .rows import TokenRows

__all__ = ["Capture", "collect", "group_mean_weights", "flat_mean_weights", "DEFAULT_MAX_TOKENS"]

# Padded tokens per micro-batch of a measuring pass (no gradients are kept, so this can be generous).
DEFAULT_MAX_TOKENS = 16384


@dataclass
class Capture:
    """One thing to read: ``module``'s ``"input"`` or ``"output"`` at the fact token of ``rows``,
    ``out[segments[i]] += weights[i] * value(rows[i])``."""

    module: str
    what: Literal["input", "output"]
    rows: list[int]
    segments: list[int]
    weights: list[float]
    num_segments: int


def group_mean_weights(groups: Sequence[Sequence[str]]) -> list[float]:
    """Per flattened template: ``1 / (number of groups · size of its group)``."""
    return [1.0 / (len(groups) * len(group)) for group in groups for _ in group]


def flat_mean_weights(num_templates: int) -> list[float]:
    return [1.0 / num_templates] * num_templates


@torch.no_grad()
def collect(model, rows: TokenRows, captures: Sequence[Capture], *, stop_after: str | None,
            max_tokens: int = DEFAULT_MAX_TOKENS, progress: bool = False, desc: str = "reading keys") -> list[torch.Tensor]:
    """Run the rows that any capture needs and return one ``[num_segments, dim]`` float32 tensor per
    capture (float64 for a float64 model). The forward stops after ``stop_after``."""
    needed = sorted({r for c in captures for r in c.rows})
    if not needed:
        return [torch.zeros(c.num_segments, 0) for c in captures]
    device = model.device
    pad_id = model.tokenizer.pad_token_id
    modules = list(dict.fromkeys(c.module for c in captures))
    # Per capture, its entries grouped by row so each micro-batch finds its own quickly.
    by_row = []
    for c in captures:
        table: dict[int, list[int]] = {}
        for i, r in enumerate(c.rows):
            table.setdefault(r, []).append(i)
        by_row.append(table)
    outputs: list[torch.Tensor | None] = [None] * len(captures)
    order = list(batches_by_tokens(rows.lengths(needed), max_tokens))
    for chunk in tqdm(order, desc=desc, disable=not progress, leave=False):
        batch_rows = [needed[i] for i in chunk]
        batch = rows.batch(batch_rows, pad_id, device)
        with TraceDict(model.model, modules, retain_input=True, retain_output=True, stop_after=stop_after) as td:
            model.model(**batch.model_inputs, use_cache=False)
        local = {r: b for b, r in enumerate(batch_rows)}
        for k, c in enumerate(captures):
            entries = [i for r in batch_rows for i in by_row[k].get(r, ())]
            trace = td[c.module]
            hidden = trace.input if c.what == "input" else primary(trace.output)
            if outputs[k] is None:
                acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
                outputs[k] = torch.zeros(c.num_segments, hidden.shape[-1], dtype=acc, device=device)
            if not entries:
                continue
            local_rows = torch.tensor([local[c.rows[i]] for i in entries], dtype=torch.long, device=device)
            positions = batch.lookup[local_rows]
            segments = torch.tensor([c.segments[i] for i in entries], dtype=torch.long, device=device)
            weights = torch.tensor([c.weights[i] for i in entries], dtype=outputs[k].dtype, device=device)
            outputs[k] += ops.gather_segment_sum(hidden, local_rows, positions, segments, weights, c.num_segments)
    return outputs


def rows_with_bare_prompts(tokenizer, requests, templates: Sequence[str], *, fact_token: str,
                           rule: str) -> tuple[TokenRows, list[int]]:
    """Key rows for every (request, template) plus, per request, the row of its bare prompt (the
    ``"{}"`` template's row when there is one, else an extra row that no template average reads)."""
    from .positions import encode_prompts
    from .rows import key_rows

    rows = key_rows(tokenizer, requests, templates, fact_token=fact_token, rule=rule)
    if "{}" in templates:
        t = list(templates).index("{}")
        return rows, [i * len(templates) + t for i in range(len(requests))]
    bare = []
    encoded = encode_prompts(tokenizer, [r.prompt for r in requests], [r.subject for r in requests],
                             fact_token=fact_token, rule=rule)
    for i, enc in enumerate(encoded):
        bare.append(len(rows))
        rows.append(enc.ids, enc.index, None, owner=i, kind="bare")
    return rows, bare
