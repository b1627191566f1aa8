"""Forward passes that skip what does not change: replaying cached lower layers.

Value optimisation adds ``δ`` at one layer; the blocks below it compute the same activations at every
step. :func:`block_output` runs the model once, stopped after a block, and keeps that block's output;
:func:`replaying_blocks` then makes blocks ``0..layer`` return it (the blocks below return their input
unchanged, costing nothing), so later forwards only run the layers above. The blocks' ``forward`` is
swapped on the instances for the duration of a ``with`` block and restored afterwards (also on
error); forward hooks keep working, so a :class:`~kedit_core.tracing.TraceDict` ``edit_output`` on the
replayed block still applies.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from ..tracing import TraceDict, primary, replace_primary

__all__ = ["block_output", "replaying_blocks", "BlockOutput"]


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
        for block, previous in zip(blocks, saved):
            if previous is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = previous
