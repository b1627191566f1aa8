"""LoRA through the ``peft`` library, wrapped so that the model comes back exactly as it was.

:func:`lora_adapters` injects peft LoRA layers into chosen linear modules of the model in place, yields
a handle to train them with the shared loop, and on exit unloads them with peft (without merging)
and checks that every module, parameter, buffer, hook, flag and attribute of the model is what it was
before. The adapters' effect is read out as an exact delta: peft's own ``get_delta_weight``
(``B·A·scaling`` in the base weight's layout) evaluated in float64.
"""
from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from kedit_core.errors import HyperParamsError, KeditError, KeditRuntimeError

from .selection import parameter_module

ADAPTER_NAME = "kedit"


def _conv1d_type():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def lora_target_modules(model: nn.Module, param_names) -> list[str]:
    """The modules LoRA can adapt among the selected parameters: linear layers (``nn.Linear`` or
    transformers' ``Conv1D``) whose ``weight`` is selected, by dotted name."""
    conv1d = _conv1d_type()
    targets = []
    for name in param_names:
        if not name.endswith(".weight"):
            continue
        module_name, module = parameter_module(model, name)
        if isinstance(module, (nn.Linear, conv1d)) and module_name not in targets:
            targets.append(module_name)
    return targets


def structure_snapshot(model: nn.Module) -> tuple:
    """Everything about a model object except its weights' values: each module's identity, class,
    attribute names and hooks; each parameter's and buffer's identity, dtype, device and
    ``requires_grad``; the training flag and the config. Equal snapshots mean nothing was left behind."""
    modules = tuple((name, id(m), type(m), tuple(sorted(vars(m))), tuple(m._forward_hooks),
                     tuple(m._forward_pre_hooks), tuple(m._backward_hooks), m.training)
                    for name, m in model.named_modules(remove_duplicate=False))
    params = tuple((name, id(p), p.dtype, p.device, p.requires_grad)
                   for name, p in model.named_parameters(remove_duplicate=False))
    buffers = tuple((name, id(b), b.dtype, b.device) for name, b in model.named_buffers(remove_duplicate=False))
    config = getattr(model, "config", None)
    config_state = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else None
    return modules, params, buffers, config_state


@dataclass
class LoraHandle:
    """The injected adapters: what to train, and the delta they stand for."""

    tuner: nn.Module
    targets: list[str]
    scaling: float

    def layers(self) -> dict[str, nn.Module]:
        """The peft LoRA layers by the dotted name of the module they adapt."""
        return {name: self.tuner.model.get_submodule(name) for name in self.targets}

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The LoRA A and B matrices of kedit's adapter, by name."""
        out = {}
        for name, layer in self.layers().items():
            out[f"{name}.lora_A.{ADAPTER_NAME}.weight"] = layer.lora_A[ADAPTER_NAME].weight
            out[f"{name}.lora_B.{ADAPTER_NAME}.weight"] = layer.lora_B[ADAPTER_NAME].weight
        return out

    @torch.no_grad()
    def weight_deltas(self) -> dict[str, torch.Tensor]:
        """``B·A·scaling`` for each adapted module, in float64 and in its weight's own layout, keyed by
        the weight's parameter name: peft's ``get_delta_weight`` on float64 copies of A and B."""
        out = {}
        for name, layer in self.layers().items():
            lora_a, lora_b = layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]
            saved = lora_a.weight.data, lora_b.weight.data
            try:
                lora_a.weight.data, lora_b.weight.data = saved[0].double(), saved[1].double()
                delta = layer.get_delta_weight(ADAPTER_NAME)
            finally:
                lora_a.weight.data, lora_b.weight.data = saved
            expected = tuple(layer.get_base_layer().weight.shape)
            if delta.dtype != torch.float64 or tuple(delta.shape) != expected:
                raise KeditError(f"peft's LoRA delta for {name} has dtype {delta.dtype} and shape "
                                 f"{tuple(delta.shape)}; expected float64 {expected}")
            out[name + ".weight"] = delta
        return out


@contextlib.contextmanager
def lora_adapters(model: nn.Module, targets: list[str], *, rank: int, alpha: float, seed: int) -> Iterator[LoraHandle]:
    """Inject peft LoRA adapters (rank ``rank``, scaling ``alpha / rank``, no dropout, B = 0 at start, A
    drawn from a generator seeded with ``seed``) into the ``targets`` modules of ``model`` in place;
    unload them on exit (also on error) and check the model object is exactly as before."""
    if not targets:
        raise HyperParamsError("LoRA needs at least one linear layer (nn.Linear or Conv1D) among the selected "
                               "parameters; select weights of linear layers or use the 'full' method")
    try:
        from peft import LoraConfig
        from peft.tuners.lora import LoraModel
    except ImportError:  # pragma: no cover - peft is a declared optional dependency
        raise KeditError("LoRA stages need the 'peft' package: pip install 'kedit[lora]'") from None

    before = structure_snapshot(model)
    # Exact names only: a str target_modules is matched by peft with re.fullmatch.
    pattern = "|".join(re.escape(t) for t in targets)
    conv1d = _conv1d_type()
    first_is_conv1d = isinstance(model.get_submodule(targets[0]), conv1d)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=pattern,
                        fan_in_fan_out=first_is_conv1d, init_lora_weights=True)
    tuner = None
    devices = [d for d in {p.device for p in model.parameters()} if d.type == "cuda"]
    try:
        with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
            # peft sets fan_in_fan_out per layer type (Conv1D stores in x out) and warns when it flips it.
            warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
            torch.manual_seed(seed)
            tuner = LoraModel(model, config, ADAPTER_NAME)
        handle = LoraHandle(tuner, list(targets), alpha / rank)
        missed = [name for name, layer in handle.layers().items() if not hasattr(layer, "lora_A")]
        if missed:
            raise KeditError(f"peft did not adapt {missed}")
        yield handle
    finally:
        if tuner is not None:
            tuner.unload()
        # peft marks the base weights frozen; put every flag back as it was
        flags = {entry[0]: entry[4] for entry in before[1]}
        for name, p in model.named_parameters(remove_duplicate=False):
            if name in flags:
                p.requires_grad_(flags[name])
        after = structure_snapshot(model)
        if after != before:
            raise KeditRuntimeError("unloading the peft LoRA adapters did not give back the model exactly as it was "
                             "(modules, parameters, hooks or config differ); this is a bug in kedit's fine-tuning "
                             "plugin or an incompatible peft version")
