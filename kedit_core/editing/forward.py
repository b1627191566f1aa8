"""Forward passes that skip what does not change: replaying cached lower layers.

Value optimisation adds ``δ`` at one layer; the blocks below it compute the same activations at every
step. :func:`block_output` runs the model once, stopped after a block, and keeps that block's output;
:func:`replaying_blocks` then makes blocks ``0..layer`` return it (the blocks below return their input
unchanged, costing nothing), so later forwards only run the layers above. The blocks' ``forward`` is
swapped on the instances for the duration of a ``with`` block and restored afterwards (also on
error); forward hooks keep working, so a :class:`~kedit_core.tracing.TraceDict` ``edit_output`` on the
replayed block still applies.

:func:`joining_rows` goes one step further for a batch whose rows start changing at different blocks
(rows sorted by the block where they start): block ``b`` computes only the first ``active[b]`` rows and
returns the cached output for the others, so each row joins the computation at its own block. The block
is called on a slice of its arguments (the tensors whose leading dimension is the batch, and a copy of
a transformers cache whose layers hold the sliced keys and values); the first call of each block in each
argument layout is checked against the block on every row, and a block that cannot be called on a
subset raises :class:`RowJoinUnsupported` (callers fall back to computing every row).
"""
from __future__ import annotations

import contextlib
import copy
import weakref
from typing import Any, Callable, Iterator, Sequence

import torch

from ..tracing import TraceDict, primary, replace_primary

__all__ = ["block_output", "replaying_blocks", "BlockOutput", "joining_rows", "RowJoinUnsupported"]


class BlockOutput:
    """A block's hidden-state output for a batch, plus the shape of what the block returns (a tensor or
    a tuple), so a replay can return the same structure."""

    def __init__(self, hidden: torch.Tensor, raw: Any):
        self.hidden = hidden
        self._template = None if isinstance(raw, torch.Tensor) else replace_primary(
            raw if not isinstance(raw, list) else list(raw), hidden[:0])

    def structured(self, hidden: torch.Tensor) -> Any:
        if self._template is None:
            return hidden
        return replace_primary(self._template if not isinstance(self._template, list) else list(self._template), hidden)


@torch.no_grad()
def block_output(model, inputs: dict, layer: int) -> BlockOutput:
    """Run ``model`` (a LoadedModel) on ``inputs``, stopped right after block ``layer``; returns its output."""
    name = model.adapter.layer_name(layer)
    with TraceDict(model.model, [name], retain_output=True, stop_after=name) as td:
        model.model(**inputs, use_cache=False)
    raw = td[name].output
    return BlockOutput(primary(raw).detach(), raw)


@contextlib.contextmanager
def replaying_blocks(model, layer: int, cached: BlockOutput, hidden: torch.Tensor) -> Iterator[None]:
    """Within the block, blocks ``0..layer`` of ``model`` do not compute: block ``layer`` returns
    ``hidden`` (the cached output for the rows being run) and the blocks below return their input."""
    adapter = model.adapter
    blocks = [adapter.module(adapter.layer_name(i)) for i in range(layer + 1)]
    saved = [b.__dict__.get("forward", None) for b in blocks]

    def passthrough(hidden_states, *args, **kwargs):
        return cached.structured(hidden_states)

    def replay(hidden_states, *args, **kwargs):
        return cached.structured(hidden)

    try:
        for i, block in enumerate(blocks):
            block.forward = replay if i == layer else passthrough
        yield
    finally:
        _restore_forwards(blocks, saved)


def _restore_forwards(modules, saved) -> None:
    """Put back each module's instance-level ``forward`` as it was (``None``: the class's own)."""
    for module, previous in zip(modules, saved):
        if previous is None:
            module.__dict__.pop("forward", None)
        else:
            module.forward = previous


class RowJoinUnsupported(Exception):
    """A block cannot be called on a subset of the batch's rows (an argument that cannot be sliced, an
    error, or an output that differs from the same rows computed with the whole batch)."""


# block module -> the argument layouts (which arguments are sliced) already checked on it
_CHECKED: "weakref.WeakKeyDictionary[torch.nn.Module, set]" = weakref.WeakKeyDictionary()
# relative tolerance of the check (against the largest output magnitude), by dtype (float32 allows for
# TF32 matrix products, whose rounding may depend on the batch size); 3e-2 for half precision
_CHECK_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3}
_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)


def _cache_type():
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - transformers is a dependency
        return ()
    return Cache


def _slice_rows(value: Any, rows: int, keep: int, path: str, sliced: list[str], cache_type) -> Any:
    """``value`` (a block argument) with its leading batch dimension of ``rows`` cut to the first ``keep``;
    records the sliced paths. Raises :class:`RowJoinUnsupported` for what it cannot read."""
    if isinstance(value, torch.Tensor):
        if value.dim() >= 2 and value.shape[0] == rows:
            sliced.append(path)
            return value[:keep]
        return value  # broadcast over rows ([1, ...]) or not per row (1-d positions, scalars)
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_slice_rows(v, rows, keep, f"{path}[{i}]", sliced, cache_type) for i, v in enumerate(value))
    if isinstance(value, dict):
        return {k: _slice_rows(v, rows, keep, f"{path}.{k}", sliced, cache_type) for k, v in value.items()}
    if cache_type and isinstance(value, cache_type) and isinstance(getattr(value, "layers", None), list):
        sub = copy.copy(value)  # same class: isinstance checks and per-layer attributes still hold
        sub.layers = []
        for i, layer in enumerate(value.layers):
            if getattr(layer, "is_compileable", False):  # a static layer writes into its tensors in place
                raise RowJoinUnsupported(f"cache layer of type {type(layer).__name__}")
            part = copy.copy(layer)
            for name, tensor in vars(layer).items():
                if isinstance(tensor, torch.Tensor) and tensor.dim() >= 2 and tensor.shape[0] == rows:
                    setattr(part, name, tensor[:keep])
                    sliced.append(f"{path}.layers[{i}].{name}")
                elif isinstance(tensor, torch.Tensor) and tensor.dim() >= 1 and tensor.shape[0] == rows:
                    raise RowJoinUnsupported(f"cache layer attribute {name} of shape {tuple(tensor.shape)}")
            sub.layers.append(part)
        return sub
    raise RowJoinUnsupported(f"block argument {path} of type {type(value).__name__}")


@contextlib.contextmanager
def joining_rows(model, blocks: Sequence[int], active: Sequence[int], rows: int,
                 carried: Callable[[int, int], torch.Tensor], cached: Sequence[BlockOutput]) -> Iterator[None]:
    """Within the block, each block ``blocks[i]`` of ``model`` computes only the first ``active[i]`` of
    the batch's ``rows`` rows (``0 < active[i] < rows``); the other rows of its output are
    ``carried(block, active[i])`` (``[rows - active[i], ...]``), returned in the structure of
    ``cached[block]``. Rows must be ordered by the block where they start, so that the rows computed at a
    block are the first ones.

    A block that cannot run on a subset of rows (an argument it cannot slice, an error, an output unlike
    the same rows of the whole batch) raises :class:`RowJoinUnsupported` during the forward. Caches are
    sliced as copies whose layers hold views of the keys and values (layers that write into their
    tensors in place, such as static caches, are refused).
    """
    adapter = model.adapter
    cache_type = _cache_type()
    modules = [adapter.module(adapter.layer_name(b)) for b in blocks]
    saved = [m.__dict__.get("forward", None) for m in modules]

    def joined(module, original, block: int, keep: int):
        def forward(*args, **kwargs):
            sliced: list[str] = []
            sub_args = _slice_rows(args, rows, keep, "args", sliced, cache_type)
            sub_kwargs = _slice_rows(kwargs, rows, keep, "kwargs", sliced, cache_type)
            first = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(first, torch.Tensor) or first.dim() < 2 or first.shape[0] != rows:
                raise RowJoinUnsupported(f"block {block}: no hidden states of {rows} rows among its arguments")
            try:
                raw = original(*sub_args, **sub_kwargs)
                hidden = primary(raw)
            except torch.OutOfMemoryError:
                raise
            except Exception as err:  # the block cannot run on a subset of rows
                raise RowJoinUnsupported(f"block {block} on a subset of rows: {type(err).__name__}: {err}") from err
            if hidden.dim() < 1 or hidden.shape[0] != keep:
                raise RowJoinUnsupported(f"block {block} returned {tuple(hidden.shape)} for {keep} rows")
            layout = tuple(sliced)
            checked = _CHECKED.setdefault(module, set())
            if layout not in checked:  # once per block and layout: the subset equals the rows of the whole
                whole = primary(original(*args, **kwargs))[:keep]
                scale = float(whole.abs().max()) or 1.0
                error = float((hidden - whole).abs().max())
                if not error <= _CHECK_TOLERANCE.get(hidden.dtype, 3e-2) * scale:
                    raise RowJoinUnsupported(f"block {block} on a subset of rows differs from the whole batch "
                                             f"by {error:.3g} (largest value {scale:.3g})")
                checked.add(layout)
            full = torch.cat([hidden, carried(block, keep).to(hidden.dtype)])
            return cached[block].structured(full)
        return forward

    try:
        for module, block, keep in zip(modules, blocks, active):
            module.forward = joined(module, module.forward, block, keep)
        yield
    finally:
        _restore_forwards(modules, saved)
