"""Tracing: retain the inputs/outputs of named modules, edit an output, stop the forward after a module.

The one copy in kedit of what ROME/MEMIT's ``nethook`` does, for transformers 5.x modules whatever
they return: a tensor, a tuple whose first element is the hidden state, or a ModelOutput::

    with TraceDict(model, ["transformer.h.3.mlp.c_proj", "transformer.h.5.mlp.c_proj"],
                   retain_input=True, retain_output=False, stop_after="transformer.h.5.mlp.c_proj") as td:
        model(**batch)                       # stops right after h.5's c_proj; h.6 never runs
    keys = td["transformer.h.3.mlp.c_proj"].input

Helpers :func:`primary` and :func:`replace_primary` read and rewrite the hidden-state tensor of any
output shape, so ``edit_output`` functions need not care what a module returns.
"""
from __future__ import annotations

import contextlib
import inspect
from collections import OrderedDict
from typing import Any, Callable, Iterable

import torch
from torch import nn

__all__ = ["StopForward", "Trace", "TraceDict", "get_module", "primary", "replace_primary"]


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early; the tracing context swallows it."""


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:  # a walk down the dotted path: hooking many modules per forward must not scan the whole model each time
        return model.get_submodule(name)
    except AttributeError:
        raise LookupError(f"{type(model).__name__} has no module named {name!r}") from None


def primary(output: Any) -> torch.Tensor:
    """The hidden-state tensor of a module's output (the tensor itself, or the first element)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "to_tuple"):  # transformers ModelOutput
        return output.to_tuple()[0]
    raise TypeError(f"cannot find a hidden-state tensor in a module output of type {type(output).__name__}")


def replace_primary(output: Any, new: torch.Tensor) -> Any:
    """``output`` with its hidden-state tensor replaced by ``new`` (same container type)."""
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, tuple):
        return (new,) + tuple(output[1:])
    if isinstance(output, list):
        return [new] + list(output[1:])
    if hasattr(output, "to_tuple"):
        key = next(iter(output.keys()))
        output[key] = new
        return output
    raise TypeError(f"cannot replace the hidden state in a module output of type {type(output).__name__}")


def _copy(value: Any, clone: bool, detach: bool) -> Any:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if detach:
            value = value.detach()
        if clone:
            value = value.clone()
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(_copy(v, clone, detach) for v in value)
    if isinstance(value, dict):
        return type(value)({k: _copy(v, clone, detach) for k, v in value.items()})
    return value


def _first_input(args: tuple, kwargs: dict) -> Any:
    if args:
        return args[0]
    for value in kwargs.values():  # modules called with keywords only (hidden_states=...)
        if isinstance(value, torch.Tensor):
            return value
    return None


def _call_editor(fn: Callable, output: Any, layer: str) -> Any:
    params = inspect.signature(fn).parameters
    if "layer" in params or any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return fn(output, layer=layer)
    return fn(output)


class Trace(contextlib.AbstractContextManager):
    """Hook one module for the duration of a ``with`` block.

    :param retain_input: keep the module's first input in ``.input``.
    :param retain_output: keep its output in ``.output`` (raw: tensor, tuple or ModelOutput).
    :param clone, detach: copy/detach what is retained (otherwise the live tensors are kept).
    :param edit_output: ``fn(output[, layer=name]) -> new_output`` applied before retaining.
    :param stop: raise :class:`StopForward` after the module runs; the ``with`` block swallows it.
    """

    def __init__(self, model: nn.Module, layer: str, *, retain_input: bool = False, retain_output: bool = True,
                 clone: bool = False, detach: bool = False, edit_output: Callable | None = None, stop: bool = False):
        self.layer = layer
        self.input: Any = None
        self.output: Any = None
        module = get_module(model, layer)

        def hook(mod, args, kwargs, output):
            if retain_input:
                self.input = _copy(_first_input(args, kwargs), clone, detach)
            if edit_output is not None:
                output = _call_editor(edit_output, output, layer)
            if retain_output:
                self.output = _copy(output, clone, detach)
            if stop:
                raise StopForward(layer)
            return output

        self._handle = module.register_forward_hook(hook, with_kwargs=True)

    @property
    def output_tensor(self) -> torch.Tensor:
        return primary(self.output)

    def close(self) -> None:
        self._handle.remove()

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)


class TraceDict(OrderedDict, contextlib.AbstractContextManager):
    """:class:`Trace` several modules at once; ``td[name]`` is that module's :class:`Trace`.

    :param stop_after: the module after which the forward stops (e.g. the deepest one needed).
    :param stop: nethook's convention: ``True`` stops after the last name in ``layers``.
    """

    def __init__(self, model: nn.Module, layers: Iterable[str], *, retain_input: bool = False,
                 retain_output: bool = True, clone: bool = False, detach: bool = False,
                 edit_output: Callable | None = None, stop: bool = False, stop_after: str | None = None):
        super().__init__()
        layers = list(dict.fromkeys(layers))
        if stop and stop_after is None and layers:
            stop_after = layers[-1]
        if stop_after is not None and stop_after not in layers:
            layers.append(stop_after)
        try:
            for name in layers:
                self[name] = Trace(model, name, retain_input=retain_input, retain_output=retain_output,
                                   clone=clone, detach=detach, edit_output=edit_output,
                                   stop=(name == stop_after))
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        for trace in reversed(self.values()):
            trace.close()

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)
