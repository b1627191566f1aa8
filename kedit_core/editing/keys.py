"""Reading keys (and other activations) at the fact token of many prompts in one pass.

:func:`collect` runs the model over token rows in length-sorted micro-batches, stopped right after the
deepest module it needs, and for each :class:`Capture` gathers that module's input or output at every
row's fact token and sums it, weighted, into per-request outputs with the ``gather_segment_sum`` op.
The weights express the averaging:

* :func:`group_mean_weights` — MEMIT's ``compute_ks``: mean within each template group, then across
  groups (``0.5 · bare + 0.5 · mean(prefixed)`` for the usual two groups);
* :func:`flat_mean_weights` — ROME's ``compute_u``: a plain mean over all templates.

:class:`LayerByLayerKeys` serves the multi-layer batch editors (MEMIT, EMMET): the keys of each
edited layer and block L's output at the bare prompts, on the model as edited so far, with the
blocks below replayed from a cache instead of recomputed (about one forward to the deepest edited
layer in all, instead of one per edited layer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from tqdm.auto import tqdm

from .. import ops
from ..text import batches_by_tokens
from ..deltas import temporarily_applied
from ..tracing import TraceDict, primary
from .forward import BlockOutput, replaying_blocks
from .rows import RowBatch, TokenRows

__all__ = ["Capture", "collect", "group_mean_weights", "flat_mean_weights", "DEFAULT_MAX_TOKENS",
           "LayerByLayerKeys"]

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
        for k, c in enumerate(captures):
            trace = td[c.module]
            hidden = trace.input if c.what == "input" else primary(trace.output)
            outputs[k] = _gather_into(outputs[k], c, by_row[k], batch_rows, batch, hidden)
    return outputs


def _rows_table(capture: Capture) -> dict[int, list[int]]:
    """Row -> the capture's entries that read it."""
    table: dict[int, list[int]] = {}
    for i, r in enumerate(capture.rows):
        table.setdefault(r, []).append(i)
    return table


def _gather_into(out: torch.Tensor | None, capture: Capture, by_row: dict[int, list[int]], batch_rows: list[int],
                 batch: RowBatch, hidden: torch.Tensor) -> torch.Tensor:
    """Add this micro-batch's share of ``capture`` (its rows' fact-token vectors, weighted) into ``out``."""
    device = hidden.device
    if out is None:
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        out = torch.zeros(capture.num_segments, hidden.shape[-1], dtype=acc, device=device)
    entries = [i for r in batch_rows for i in by_row.get(r, ())]
    if not entries:
        return out
    local = {r: b for b, r in enumerate(batch_rows)}
    local_rows = torch.tensor([local[capture.rows[i]] for i in entries], dtype=torch.long, device=device)
    positions = batch.lookup[local_rows]
    segments = torch.tensor([capture.segments[i] for i in entries], dtype=torch.long, device=device)
    weights = torch.tensor([capture.weights[i] for i in entries], dtype=out.dtype, device=device)
    return out + ops.gather_segment_sum(hidden, local_rows, positions, segments, weights, capture.num_segments)


class _ReplayedRows:
    """Micro-batches of some rows, each with the cached output of one block on the model as edited so
    far (``None`` before the first pass): the state a later pass resumes from."""

    def __init__(self, model, rows: TokenRows, row_ids: list[int], max_tokens: int):
        self.model = model
        # Keys and block outputs are read at the fact token: in a causal model nothing after it matters.
        lengths = [rows.lookup[r] + 1 for r in row_ids]
        cut = TokenRows(ids=[rows.ids[r][: rows.lookup[r] + 1] for r in row_ids],
                        lookup=[rows.lookup[r] for r in row_ids], labels=[None] * len(row_ids),
                        owner=[rows.owner[r] for r in row_ids], kind=[rows.kind[r] for r in row_ids])
        pad_id = model.tokenizer.pad_token_id
        self.batches = []
        for chunk in batches_by_tokens(lengths, max_tokens):
            self.batches.append(([row_ids[i] for i in chunk], cut.batch(chunk, pad_id, model.device)))
        self.cached: list[BlockOutput | None] = [None] * len(self.batches)
        self.cached_layer: int | None = None  # the block whose output is cached

    def run(self, deltas: dict, modules: list[str], stop_after: str, keep_block: int | None, desc: str,
            progress: bool):
        """Forward every micro-batch from the cached block output (the blocks up to it replayed), with
        ``deltas`` applied, tracing ``modules``; cache block ``keep_block``'s output for the next pass.
        Yields ``(batch_rows, batch, traces)`` per micro-batch."""
        adapter = self.model.adapter
        names = list(modules)
        keep_name = None if keep_block is None or keep_block < 0 else adapter.layer_name(keep_block)
        if keep_name is not None and keep_name not in names:
            names.append(keep_name)
        new_cache: list[BlockOutput | None] = []
        with temporarily_applied(self.model.model, deltas):
            for b, (batch_rows, batch) in enumerate(tqdm(self.batches, desc=desc, disable=not progress, leave=False)):
                cached = self.cached[b]
                replay = (replaying_blocks(self.model, self.cached_layer, cached, cached.hidden)
                          if cached is not None else _nothing())
                with replay, TraceDict(self.model.model, names, retain_input=True, retain_output=True,
                                       stop_after=stop_after) as td:
                    self.model.model(**batch.model_inputs, use_cache=False)
                if keep_name is not None:
                    raw = td[keep_name].output
                    new_cache.append(BlockOutput(primary(raw).detach(), raw))
                yield batch_rows, batch, td
        if keep_name is not None:
            self.cached, self.cached_layer = new_cache, keep_block


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _nothing() -> _Nothing:
    return _Nothing()


class LayerByLayerKeys:
    """Keys at each edited layer and block ``z_layer``'s output at the bare prompts, on the model as
    edited so far, with the unchanged blocks replayed from a cache.

    ``keys`` says which rows are averaged into which request (its module is ignored: each step reads
    ``layers[i]``'s); ``read(i, deltas)`` must be called for ``i = 0, 1, ...`` in order, ``deltas`` holding the updates of
    ``layers[:i]``. The blocks below ``layers[i - 1]`` do not change from step ``i - 1`` to step ``i``,
    so each pass resumes from the output of the block just below the layer edited last:

    * key rows (every template-filled prompt): one pass per step through blocks ``layers[i-1] ..
      layers[i]`` (to the key at ``layers[i]``), which caches block ``layers[i] - 1``'s output (final
      from step ``i`` on) for the next step: about one forward to the deepest edited layer in all;
    * bare-prompt rows: one pass per step from block ``layers[i-1]`` to ``z_layer``, caching the same.

    Rows are cut after their fact token (keys and block outputs are read there; later tokens cannot
    change them in a causal model). The results equal a fresh forward per layer to float rounding.
    """

    def __init__(self, model, rows: TokenRows, keys: Capture, bare: Capture, layers: Sequence[int], z_layer: int,
                 *, max_tokens: int = DEFAULT_MAX_TOKENS, progress: bool = False, mlp_outputs: bool = False):
        self.model, self.layers, self.z_layer, self.progress = model, list(layers), z_layer, progress
        self.mlp_outputs = mlp_outputs  # also read each edited layer's MLP output at the bare prompts
        self.keys, self.bare = keys, bare
        self._key_rows = _ReplayedRows(model, rows, sorted(set(keys.rows)), max_tokens)
        self._bare_rows = _ReplayedRows(model, rows, sorted(set(bare.rows)), max_tokens)
        self._keys_by_row, self._bare_by_row = _rows_table(keys), _rows_table(bare)
        self._next = 0
        self.passes = {"key_rows": 0, "bare_rows": 0}

    @torch.no_grad()
    def read(self, i: int, deltas: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(keys [N, d_k], block z_layer's output at the bare prompts [N, d], layers[i]'s MLP output there
        [N, d] or None)`` for step ``i``."""
        if i != self._next:
            raise RuntimeError(f"LayerByLayerKeys.read: step {i} asked for, but step {self._next} comes next")
        self._next += 1
        adapter, layer = self.model.adapter, self.layers[i]
        key_module = adapter.mlp_out_name(layer)
        keys = None
        for batch_rows, batch, td in self._key_rows.run(deltas, [key_module], key_module, layer - 1,
                                                        f"keys at layer {layer}", self.progress):
            keys = _gather_into(keys, self.keys, self._keys_by_row, batch_rows, batch, td[key_module].input)
        z_name = adapter.layer_name(self.z_layer)
        mlp_name = adapter.mlp_name(layer)
        current = mlp_current = None
        # Blocks below layers[i] are final at step i (later updates go to layers[i] and above): their
        # output is what the next step resumes from.
        traced = [z_name] + ([mlp_name] if self.mlp_outputs else [])
        for batch_rows, batch, td in self._bare_rows.run(deltas, traced, z_name, layer - 1,
                                                         f"block {self.z_layer} at layer {layer}", self.progress):
            current = _gather_into(current, self.bare, self._bare_by_row, batch_rows, batch, primary(td[z_name].output))
            if self.mlp_outputs:
                mlp_current = _gather_into(mlp_current, self.bare, self._bare_by_row, batch_rows, batch,
                                           primary(td[mlp_name].output))
        self.passes["key_rows"] += 1
        self.passes["bare_rows"] += 1
        return keys, current, mlp_current


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
