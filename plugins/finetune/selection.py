"""Which parameters a fine-tuning editor trains: by layer and module kind through the model adapter, or
by explicit parameter names and globs."""
from __future__ import annotations

import fnmatch

from torch import nn

from kedit_core.errors import HyperParamsError, KeditError
from kedit_core.models import LoadedModel


def module_prefixes(model: LoadedModel, layers: list[int] | None, module: str) -> list[str]:
    """The dotted module names whose parameters train (``""`` for the whole model)."""
    adapter = model.adapter
    if module == "all":
        return [""]
    layer_ids = list(range(adapter.num_layers)) if layers is None else list(layers)
    bad = [layer for layer in layer_ids if not 0 <= layer < adapter.num_layers]
    if bad:
        raise HyperParamsError(f"layers = {layers}: layer(s) {bad} out of range; the model has layers "
                               f"0..{adapter.num_layers - 1}")
    name_of = {"mlp_out": adapter.mlp_out_name, "mlp": adapter.mlp_name, "attn": adapter.attn_name,
               "block": adapter.layer_name}
    if module not in name_of:
        raise HyperParamsError(f"module = {module!r}: expected one of {sorted(name_of) + ['all']}")
    return [name_of[module](layer) for layer in layer_ids]


def select_parameters(model: LoadedModel, *, layers: list[int] | None, module: str, params: list[str],
                      include_biases: bool = True) -> dict[str, nn.Parameter]:
    """The parameters to train, by name, in the model's own order. ``params`` (names or ``fnmatch``
    globs) replaces ``layers``/``module`` when non-empty; every glob must match something."""
    named = dict(model.model.named_parameters())
    if params:
        chosen: set[str] = set()
        for pattern in params:
            hits = [n for n in named if n == pattern or fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                example = ", ".join(list(named)[:3])
                raise HyperParamsError(f"params: {pattern!r} matches no parameter of {type(model.model).__name__} "
                                       f"(names look like {example}, ...)")
            chosen.update(hits)
    else:
        prefixes = module_prefixes(model, layers, module)
        chosen = {n for n in named if any(p == "" or n.startswith(p + ".") for p in prefixes)}
        if not include_biases:
            chosen = {n for n in chosen if n.rsplit(".", 1)[-1] != "bias"}
        if not chosen:
            raise HyperParamsError(f"module = {module!r}, layers = {layers}: selects no parameters")
    return {n: p for n, p in named.items() if n in chosen}


def parameter_module(model: nn.Module, param_name: str) -> tuple[str, nn.Module]:
    """The module that owns ``param_name`` and its dotted name."""
    module_name, _, _ = param_name.rpartition(".")
    try:
        return module_name, model.get_submodule(module_name)
    except AttributeError:
        raise KeditError(f"{type(model).__name__} has no module {module_name!r}") from None
