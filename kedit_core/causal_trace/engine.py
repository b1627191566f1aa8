"""The causal-tracing engine for one prompt (Meng et al. 2022, §2): a clean run, a run with the subject's
token embeddings corrupted by Gaussian noise, and the probability of the answer when chosen clean states
are restored inside the corrupted run.

A *cell* is a set of :class:`Restore` (kind, layer, token) triples restored together: one heatmap square
is the hidden state of one (token, layer), or the MLP (attention) outputs at one token over a window of
layers. ROME runs one forward pass per cell, on a batch of the clean prompt and its noise samples
(:meth:`FactTracer.restored_probabilities_per_cell`, kept as the reference). The batched engine
(:meth:`FactTracer.restored_probabilities`) runs many cells in one forward, one row per (cell, noise
sample), restoring clean values cached from the clean run, and skips what cannot change:

* rows of a cell whose earliest restored token is ``t`` reuse the corrupted run's keys and values for
  positions ``< t`` (restoring at ``t`` cannot change what comes before it) and compute positions
  ``t..T-1`` only;
* blocks below a cell's lowest restored layer compute what the corrupted run did, so a pack of cells
  replays the corrupted output of the block below its lowest layer
  (:func:`~kedit_core.editing.forward.replaying_blocks`), and each row joins the computation at its own
  cell's first changed block: below it, the row carries the corrupted run's output
  (:func:`~kedit_core.editing.forward.joining_rows`, the block called on the rows already started), so a
  pack spanning many first blocks computes no more than its cells would one by one. A model whose blocks
  cannot be called on a subset of rows (found on the first try, and remembered for the model) computes
  every row of a pack from the pack's lowest block instead;
* only the last position's logits are computed;
* a cell that restores only tokens before the subject restores values equal to the corrupted ones:
  its probability is the corrupted probability, without a forward pass.

Cells with the same first token are packed into forwards of at most ``max_tokens`` computed
(row × position) tokens. Module names come from the model adapter; nothing here knows an architecture.
"""
from __future__ import annotations

import inspect
import warnings
import weakref
from bisect import bisect_right
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from ..editing.forward import BlockOutput, RowJoinUnsupported, joining_rows, replaying_blocks
from ..text import cache_kwargs, output_cache
from ..tracing import TraceDict, primary, replace_primary

__all__ = ["KINDS", "Restore", "Cell", "window_layers", "heatmap_cells", "FactTracer", "rome_forward_count"]

# hidden: a block's output (the residual stream after the block); mlp / attn: the block's MLP / attention
# module output, before it is added to the residual stream.
KINDS = ("hidden", "mlp", "attn")


@dataclass(frozen=True, order=True)
class Restore:
    """Restore the clean value of ``kind``'s output at ``layer`` and ``token`` (an index into the prompt)."""

    kind: str
    layer: int
    token: int


Cell = tuple  # tuple[Restore, ...]: restored together, in one row per noise sample


def window_layers(center: int, window: int, num_layers: int) -> range:
    """ROME's window of ``window`` layers around ``center``: ``center - window//2`` up to
    ``center + ceil(window/2) - 1``, clipped to the model (10 → ``c-5 .. c+4``; 1 → ``c``)."""
    return range(max(0, center - window // 2), min(num_layers, center - (-window // 2)))


def heatmap_cells(kind: str, num_layers: int, tokens: Iterable[int], window: int) -> list[Cell]:
    """The cells of one heatmap, row-major over ``tokens`` × layers: one (token, layer) hidden state, or
    the ``kind`` outputs at the token over the window of layers centred on the layer."""
    if kind not in KINDS:
        raise ValueError(f"unknown trace kind {kind!r}; expected one of {', '.join(KINDS)}")
    cells = []
    for token in tokens:
        for layer in range(num_layers):
            if kind == "hidden":
                cells.append((Restore(kind, layer, token),))
            else:
                cells.append(tuple(Restore(kind, j, token) for j in window_layers(layer, window, num_layers)))
    return cells


def rome_forward_count(num_tokens: int, num_layers: int, num_kinds: int = len(KINDS)) -> int:
    """Forward passes ROME's ``calculate_hidden_flow`` makes for one prompt: per kind one prediction, one
    corrupted baseline and one per (token, layer) cell."""
    return num_kinds * (num_tokens * num_layers + 2)


# model (its torch module) -> why its rows cannot join the batch at their own block
_NO_ROW_JOIN: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()


def _cell_first_token(cell: Cell) -> int:
    return min(r.token for r in cell)


def _cell_first_block(cell: Cell) -> int:
    """The lowest block whose computation the cell changes (a restored block output changes the blocks
    above it; a restored MLP/attention output changes its own block)."""
    return min(r.layer + 1 if r.kind == "hidden" else r.layer for r in cell)


class FactTracer:
    """Clean and corrupted runs of one prompt, and restored-state probabilities of ``answer_id``.

    :param model: a :class:`~kedit_core.models.LoadedModel`.
    :param input_ids: the prompt's token ids (special tokens included).
    :param subject: ``(first, last)`` token indices of the subject (inclusive).
    :param noise: ``[samples, last - first + 1, d_model]`` noise added to the subject's embeddings, one
        row per corrupted sample (the same samples for every cell, as ROME does).
    :param max_tokens: computed (row × position) tokens per batched forward.
    :param row_join: let each row join a pack's computation at its own first block (False: every row of
        a pack computes from the pack's lowest first block, as for a model whose blocks cannot be called
        on a subset of rows).

    ``forwards`` counts the model's forward passes, ``block_tokens`` the (row × position) tokens the
    batched engine computes, summed over blocks.
    """

    def __init__(self, model, input_ids: Sequence[int], subject: tuple[int, int], answer_id: int,
                 noise: torch.Tensor, *, max_tokens: int = 512, row_join: bool = True):
        self.model = model
        self.adapter = model.adapter
        self.device = model.device
        self.dtype = model.dtype
        self.ids = torch.tensor([list(input_ids)], dtype=torch.long, device=self.device)
        self.num_tokens = self.ids.shape[1]
        self.num_layers = self.adapter.num_layers
        self.subject = (int(subject[0]), int(subject[1]))
        if not 0 <= self.subject[0] <= self.subject[1] < self.num_tokens:
            raise ValueError(f"subject tokens {self.subject} are outside the prompt's {self.num_tokens} tokens")
        n_subject = self.subject[1] - self.subject[0] + 1
        if noise.dim() != 3 or noise.shape[1] != n_subject:
            raise ValueError(f"noise must be [samples, {n_subject}, d_model]; got {tuple(noise.shape)}")
        self.samples = noise.shape[0]
        self.noise = noise.to(self.device, self.dtype)
        # The noise laid over the whole prompt (zero outside the subject), so a forward over positions
        # p.. adds noise_full[:, p:].
        self.noise_full = torch.zeros(self.samples, self.num_tokens, noise.shape[2], device=self.device,
                                      dtype=self.dtype)
        self.noise_full[:, self.subject[0]:self.subject[1] + 1] = self.noise
        self.answer_id = int(answer_id)
        self.max_tokens = max(1, int(max_tokens))
        self.row_join = bool(row_join)
        self.forwards = 0
        self.block_tokens = 0
        self.p_clean: float | None = None
        self.p_corrupted: float | None = None
        self.predicted_id: int | None = None
        self._clean: dict[str, torch.Tensor] = {}
        self._corrupted_blocks: list[BlockOutput] = []
        self._corrupted_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        forward_params = inspect.signature(model.model.forward).parameters
        self._last_logits_only = "logits_to_keep" in forward_params
        self._names = {"hidden": self.adapter.layer_name, "mlp": self.adapter.mlp_name,
                       "attn": self.adapter.attn_name}
        self._kind_of = {self._names[k](i): (k, i) for k in KINDS for i in range(self.num_layers)}

    # -- helpers ---------------------------------------------------------------------------------
    def _forward(self, input_ids: torch.Tensor, *, all_logits: bool = False, **kwargs):
        self.forwards += 1
        if self._last_logits_only and not all_logits:
            kwargs["logits_to_keep"] = 1
        kwargs.setdefault("use_cache", False)
        return self.model.model(input_ids=input_ids, **kwargs)

    def _answer_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """p(answer) at the last position of each row."""
        last = logits[:, -1]
        return torch.softmax(last.to(torch.promote_types(last.dtype, torch.float32)), dim=-1)[:, self.answer_id]

    # -- the two reference runs -----------------------------------------------------------------------
    @torch.no_grad()
    def run_clean(self) -> tuple[float, int]:
        """The clean prompt: returns (p(answer), the predicted token) and caches every block, MLP and
        attention output for restoring."""
        names = [self._names[k](i) for k in KINDS for i in range(self.num_layers)]
        with TraceDict(self.model.model, names, retain_output=True, detach=True) as td:
            logits = self._forward(self.ids).logits
        for kind in KINDS:
            self._clean[kind] = torch.stack([primary(td[self._names[kind](i)].output)[0]
                                             for i in range(self.num_layers)])  # [L, T, d]
        self.predicted_id = int(logits[0, -1].argmax())
        self.p_clean = float(self._answer_probabilities(logits)[0])
        return self.p_clean, self.predicted_id

    @torch.no_grad()
    def run_corrupted(self) -> float:
        """The corrupted prompt (one row per noise sample): returns p(answer), averaged over the samples,
        and caches each block's output and the keys/values for the batched engine."""
        ids = self.ids.expand(self.samples, -1)
        blocks = [self.adapter.layer_name(i) for i in range(self.num_layers)]
        embed = self.adapter.embedding_name

        def corrupt(output, layer):
            if layer == embed:
                return replace_primary(output, primary(output) + self.noise_full)
            return output

        with TraceDict(self.model.model, [embed] + blocks, retain_output=True, detach=True,
                       edit_output=corrupt) as td:
            out = self._forward(ids, use_cache=True)
        self._corrupted_blocks = [BlockOutput(primary(td[name].output), td[name].output) for name in blocks]
        self._corrupted_kv = self._kv_prefix_source(output_cache(out))
        self.p_corrupted = float(self._answer_probabilities(out.logits).mean())
        return self.p_corrupted

    def _kv_prefix_source(self, cache) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Each layer's corrupted keys and values, when the cache holds every position of every layer (a
        model without a standard cache, or a sliding window shorter than the prompt, computes every
        position instead)."""
        layers = getattr(cache, "layers", None)
        if layers is None or len(layers) != self.num_layers:
            return None
        kv = []
        for layer in layers:
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor) or keys.dim() != 4 \
                    or keys.shape[-2] != self.num_tokens or values.shape[-2] != self.num_tokens:
                return None
            kv.append((keys, values))
        return kv

    # -- restored probabilities ------------------------------------------------------------------------
    def _check_ready(self) -> None:
        if self.p_corrupted is None or not self._clean:
            raise RuntimeError("run_clean() and run_corrupted() must run before restoring states")

    def _check_cell(self, cell: Cell) -> None:
        for r in cell:
            if r.kind not in KINDS or not 0 <= r.layer < self.num_layers or not 0 <= r.token < self.num_tokens:
                raise ValueError(f"{r} is outside the model ({self.num_layers} layers) or the prompt "
                                 f"({self.num_tokens} tokens)")

    @torch.no_grad()
    def restored_probabilities(self, cells: Sequence[Cell]) -> torch.Tensor:
        """p(answer) with each cell's clean states restored in the corrupted run, averaged over the noise
        samples: a float tensor with one value per cell. Batched (see the module docstring)."""
        self._check_ready()
        result = torch.full((len(cells),), float("nan"), dtype=torch.float64)
        groups: dict[int, list[int]] = {}
        for i, cell in enumerate(cells):
            self._check_cell(cell)
            if not cell or max(r.token for r in cell) < self.subject[0]:
                result[i] = self.p_corrupted  # nothing restored differs from the corrupted run
                continue
            first = _cell_first_token(cell) if self._corrupted_kv is not None else 0
            groups.setdefault(first, []).append(i)
        for first, members in sorted(groups.items()):
            members.sort(key=lambda i: _cell_first_block(cells[i]))
            per_cell = self.samples * (self.num_tokens - first)
            step = max(1, self.max_tokens // per_cell)
            for start in range(0, len(members), step):
                pack = members[start:start + step]
                pack_cells = [cells[i] for i in pack]
                join = self.row_join and self.model.model not in _NO_ROW_JOIN
                try:
                    probs = self._run_pack(pack_cells, first, join=join)
                except RowJoinUnsupported as err:
                    _NO_ROW_JOIN[self.model.model] = str(err)
                    warnings.warn(f"causal tracing: rows cannot join at their own block on this model ({err}); "
                                  "every row of a pack computes from its lowest block", RuntimeWarning, stacklevel=2)
                    probs = self._run_pack(pack_cells, first, join=False)
                result[pack] = probs.double()
        return result

    @property
    def row_join_fallback(self) -> str | None:
        """Why this model's rows cannot join a pack at their own block (None: they can, or not tried yet)."""
        return _NO_ROW_JOIN.get(self.model.model)

    def _run_pack(self, cells: list[Cell], first: int, *, join: bool = False) -> torch.Tensor:
        S, T, L = self.samples, self.num_tokens, self.num_layers
        # rows sorted by their cell's first block: the rows computed at a block are a prefix of the batch
        order = sorted(range(len(cells)), key=lambda c: _cell_first_block(cells[c]))
        cells = [cells[c] for c in order]
        rows = len(cells) * S
        sample_of_row = torch.arange(S, device=self.device).repeat(len(cells))
        starts = [_cell_first_block(c) for c in cells]
        start_block = starts[0]
        # rows computed at each block from the pack's lowest first block on
        active = [S * bisect_right(starts, b) for b in range(start_block, L)]
        join = join and any(a < rows for a in active)

        edits: dict[str, tuple[list, list, list]] = {}
        for c, cell in enumerate(cells):
            row_ids = torch.arange(c * S, (c + 1) * S, device=self.device)
            for r in cell:
                name = self._names[r.kind](r.layer)
                entry = edits.setdefault(name, ([], [], []))
                entry[0].append(row_ids)
                entry[1].append(torch.full((S,), r.token - first, device=self.device, dtype=torch.long))
                entry[2].append(self._clean[r.kind][r.layer, r.token].expand(S, -1))
        patches = {name: (torch.cat(a), torch.cat(b), torch.cat(v)) for name, (a, b, v) in edits.items()}
        embed = self.adapter.embedding_name
        noise = self.noise_full[sample_of_row, first:] if start_block == 0 else None

        def restore(output, layer):
            if layer == embed:
                return replace_primary(output, primary(output) + noise) if noise is not None else output
            rows_idx, pos_idx, values = patches[layer]
            return replace_primary(output, primary(output).index_put((rows_idx, pos_idx), values))

        kwargs = {}
        if first > 0:
            from transformers import DynamicCache

            prefix = [(k[sample_of_row, :, :first], v[sample_of_row, :, :first]) for k, v in self._corrupted_kv]
            kwargs = {**cache_kwargs(self.model.model, DynamicCache(prefix, config=self.model.model.config)),
                      "use_cache": True}
        ids = self.ids[:, first:].expand(rows, -1)
        names = list(patches) + ([embed] if noise is not None else [])
        with TraceDict(self.model.model, names, retain_output=False, edit_output=restore), ExitStack() as stack:
            if start_block > 0:
                below = start_block - 1
                replayed = self._corrupted_blocks[below].hidden[sample_of_row, first:]
                stack.enter_context(replaying_blocks(self.model, below, self._corrupted_blocks[below], replayed))
            if join:
                partial = [(b, a) for b, a in zip(range(start_block, L), active) if a < rows]

                def carried(block: int, keep: int) -> torch.Tensor:
                    return self._corrupted_blocks[block].hidden[sample_of_row[keep:], first:]

                stack.enter_context(joining_rows(self.model, [b for b, _ in partial], [a for _, a in partial], rows,
                                                 carried, self._corrupted_blocks))
            logits = self._forward(ids, **kwargs).logits
        self.block_tokens += (sum(active) if join else rows * (L - start_block)) * (T - first)
        probs = self._answer_probabilities(logits).view(len(cells), S).mean(dim=1)
        out = torch.empty_like(probs)
        out[order] = probs
        return out

    @torch.no_grad()
    def restored_probabilities_per_cell(self, cells: Sequence[Cell]) -> torch.Tensor:
        """ROME's loop (``trace_with_patch``), the reference: one forward per cell on a batch of the clean
        prompt (row 0) and its noise samples, copying row 0's states into the corrupted rows."""
        self._check_ready()
        embed = self.adapter.embedding_name
        ids = self.ids.expand(self.samples + 1, -1)
        out = torch.empty(len(cells), dtype=torch.float64)
        for i, cell in enumerate(cells):
            self._check_cell(cell)
            spec: dict[str, list[int]] = {}
            for r in cell:
                spec.setdefault(self._names[r.kind](r.layer), []).append(r.token)

            def patch(output, layer):
                h = primary(output)
                if layer == embed:
                    h = h.clone()
                    h[1:] += self.noise_full
                    return replace_primary(output, h)
                h = h.clone()
                for t in spec[layer]:
                    h[1:, t] = h[0, t]
                return replace_primary(output, h)

            with TraceDict(self.model.model, [embed] + list(spec), retain_output=False, edit_output=patch):
                logits = self._forward(ids, all_logits=True).logits  # ROME computes every position's logits
            out[i] = float(self._answer_probabilities(logits[1:]).mean())
        return out

    @torch.no_grad()
    def rome_overhead_forwards(self, num_kinds: int) -> None:
        """The per-kind forwards ROME's ``calculate_hidden_flow`` adds around its cells (a prediction on
        the clean batch and a corrupted baseline), run here so that timing the reference loop is fair."""
        ids = self.ids.expand(self.samples + 1, -1)
        for _ in range(num_kinds):
            self._forward(ids, all_logits=True)
            self.restored_probabilities_per_cell([()])
