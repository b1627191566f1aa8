"""Hyper-parameter pieces shared by the locate-then-edit editors (MEMIT, ROME, EMMET).

The published JSON files are accepted as they are: their keys are fields here. Their architecture
strings (``rewrite_module_tmp``, ``layer_module_tmp``, ...) are optional and, when present, checked
against the model adapter (kedit always takes module names from the adapter); a mismatch is an error.
Keys that some reference repositories add for bookkeeping (``model_name``, ``alg_name``, ``device``,
``stats_dir``) are ignored. kedit's own additions:

* ``mode``: ``"fast"`` (default: batched value optimisation, cached factors and Woodbury solves,
  character-offset subject positions) or ``"reference"`` (the published loops and arithmetic);
* ``value_batch_size``: requests optimised together in fast mode (default ``None``: batches sized from
  the memory available, see :func:`kedit_core.editing.values.plan_value_batches`; ``--max-memory`` /
  ``EditContext.max_memory`` bounds them);
* ``early_stop_most_probable``: also stop a request once its target is the argmax everywhere (default
  ``None``: the editor's choice for the mode, see :func:`kedit_core.editing.batch.value_settings`);
* ``solver``: ``auto`` | ``woodbury`` | ``direct`` | ``reference`` (fast mode; reference mode always
  uses the published solve).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import ClassVar, Literal

from ..errors import HyperParamsError
from ..hparams import HyperParams, find_model_defaults
from .positions import FACT_TOKENS
from .solvers import SOLVERS

__all__ = ["LocateEditHParams", "BatchEditHParams", "check_architecture_strings", "check_layers", "published_defaults",
           "inferred_layers", "REFERENCE_BOOKKEEPING_KEYS"]

REFERENCE_BOOKKEEPING_KEYS = frozenset({"model_name", "alg_name", "device", "stats_dir"})


@dataclass(frozen=True)
class LocateEditHParams(HyperParams):
    """Fields common to MEMIT, ROME and EMMET (names as in the published files)."""

    IGNORED_KEYS: ClassVar[frozenset[str]] = REFERENCE_BOOKKEEPING_KEYS

    layers: list[int] | None = None          # None: chosen for the model (published defaults or inferred)
    fact_token: str = "subject_last"
    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    v_loss_layer: int | None = None          # None: the model's last layer
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    mom2_adjustment: bool = True

    # Architecture strings of the published files: optional, checked against the adapter.
    rewrite_module_tmp: str | None = None
    layer_module_tmp: str | None = None
    mlp_module_tmp: str | None = None
    attn_module_tmp: str | None = None
    ln_f_module: str | None = None
    lm_head_module: str | None = None

    # How C0 was (or should be) collected; recorded with the result, used by statistics sources.
    mom2_dataset: str = "wikipedia"
    mom2_n_samples: int = 100000
    mom2_dtype: str = "float32"

    # kedit
    mode: Literal["fast", "reference"] = "fast"
    value_batch_size: int | None = None
    early_stop_most_probable: bool | None = None
    solver: str = "auto"

    def validate(self) -> None:
        if self.layers is not None:
            self.require(len(self.layers) > 0, "layers", "must list at least one layer")
            self.require(all(layer >= 0 for layer in self.layers), "layers", "layer indices must be >= 0")
            self.require(len(set(self.layers)) == len(self.layers), "layers", "must not repeat a layer")
        self.require(self.fact_token in FACT_TOKENS, "fact_token",
                     f"expected one of {list(FACT_TOKENS)} (the published code marks 'last' as broken)")
        self.require(self.v_num_grad_steps >= 1, "v_num_grad_steps", "must be at least 1")
        self.require(self.v_lr > 0, "v_lr", "must be positive")
        self.require(self.v_weight_decay >= 0, "v_weight_decay", "must be >= 0")
        self.require(self.clamp_norm_factor > 0, "clamp_norm_factor", "must be positive")
        self.require(self.kl_factor >= 0, "kl_factor", "must be >= 0")
        self.require(self.value_batch_size is None or self.value_batch_size >= 1, "value_batch_size",
                     "must be at least 1 (or null: sized from the memory available)")
        self.require(self.solver in SOLVERS, "solver", f"expected one of {list(SOLVERS)}")
        self.require(self.mom2_dtype in ("float32", "float64", "float16", "bfloat16"), "mom2_dtype",
                     "expected float32, float64, float16 or bfloat16")

    @property
    def reference(self) -> bool:
        return self.mode == "reference"

    def loss_layer(self, model, layer: int) -> int:
        """The block whose output the NLL reads: ``max(v_loss_layer, layer)`` as published."""
        last = model.adapter.num_layers - 1
        return max(last if self.v_loss_layer is None else self.v_loss_layer, layer)


@dataclass(frozen=True)
class BatchEditHParams(LocateEditHParams):
    """Fields shared by the multi-layer batch editors (MEMIT, EMMET, AlphaEdit): ENCORE's norm constraint
    (Gupta et al. 2025, "Lifelong Knowledge Editing requires Better Regularization").

    ``norm_constraint`` (λ_n) adds ``λ_n ‖W_k + Δ − W_0‖²_F`` to each layer's objective: ``W_0`` the weights
    before the first batch of an editing session, ``W_k`` before this batch. With ``norm_constraint_scope =
    "batch"`` (or outside a session, where ``W_k = W_0``) it is the published ``λ_n ‖Δ‖²_F``, i.e. ``λ_n I``
    added to the preservation matrix (ENCORE's ``update_norm_lambda``); ``"cumulative"`` also pulls the
    weights back towards ``W_0``, so the edited matrices' norms stop growing over a long stream.
    """

    norm_constraint: float = 0.0
    norm_constraint_scope: Literal["cumulative", "batch"] = "cumulative"

    def validate(self) -> None:
        super().validate()
        self.require(self.norm_constraint >= 0, "norm_constraint", "must be >= 0 (0 switches it off)")


def check_layers(hp: LocateEditHParams, model, *, ascending: bool = True) -> None:
    """Layers (and the loss layer) exist in the model; MEMIT/EMMET also need them ascending."""
    n = model.adapter.num_layers
    layers = hp.layers or []
    bad = [layer for layer in layers if layer >= n]
    if bad:
        raise HyperParamsError(f"{type(hp).__name__}.layers = {layers}: layer(s) {bad} do not exist; this model has "
                               f"layers 0..{n - 1} (override with --layers)")
    if ascending and layers != sorted(layers):
        raise HyperParamsError(f"{type(hp).__name__}.layers = {layers}: must be in ascending order (the residual "
                               "is spread from the first layer to the last)")
    if hp.v_loss_layer is not None and not 0 <= hp.v_loss_layer < n:
        raise HyperParamsError(f"{type(hp).__name__}.v_loss_layer = {hp.v_loss_layer}: this model has layers "
                               f"0..{n - 1}; the published files use the last layer (omit the key for that)")


def _same_weight(model, module_name: str, reference) -> bool:
    modules = dict(model.model.named_modules())
    module = modules.get(module_name)
    weight = getattr(module, "weight", None)
    ref_weight = getattr(reference, "weight", None)
    return weight is not None and ref_weight is not None and weight.data_ptr() == ref_weight.data_ptr() \
        and weight.shape == ref_weight.shape


def check_architecture_strings(hp: LocateEditHParams, model) -> None:
    """Compare a published file's module templates with the adapter's names for the edited layers."""
    adapter = model.adapter
    cls = type(hp).__name__
    layers = sorted(set((hp.layers or []) + [hp.loss_layer(model, max(hp.layers or [0]))]))
    per_layer = {
        "rewrite_module_tmp": ("MLP output projection", adapter.mlp_out_name),
        "layer_module_tmp": ("block", adapter.layer_name),
        "mlp_module_tmp": ("MLP", adapter.mlp_name),
        "attn_module_tmp": ("attention module", adapter.attn_name),
    }
    for key, (what, name_of) in per_layer.items():
        template = getattr(hp, key)
        if template is None:
            continue
        if template.count("{}") != 1:
            raise HyperParamsError(f"{cls}.{key} = {template!r}: expected exactly one '{{}}' for the layer number")
        for layer in layers:
            expected = name_of(layer)
            if template.format(layer) != expected:
                raise HyperParamsError(
                    f"{cls}.{key} = {template!r} names '{template.format(layer)}' for layer {layer}, but this model's "
                    f"{what} is '{expected}' (adapter '{adapter.name}'). kedit takes module names from the model "
                    "adapter: remove the key, or use hyper-parameters written for this architecture.")
    if hp.ln_f_module is not None and hp.ln_f_module != adapter.final_norm_name:
        raise HyperParamsError(f"{cls}.ln_f_module = {hp.ln_f_module!r}, but this model's final norm is "
                               f"'{adapter.final_norm_name}' (adapter '{adapter.name}')")
    if hp.lm_head_module is not None and hp.lm_head_module != adapter.unembedding_name \
            and not _same_weight(model, hp.lm_head_module, adapter.unembedding):
        raise HyperParamsError(f"{cls}.lm_head_module = {hp.lm_head_module!r} is not this model's unembedding "
                               f"'{adapter.unembedding_name}' (adapter '{adapter.name}'), nor tied to it")


def _config_matches(config, match: dict) -> bool:
    for key, expected in match.items():
        if key == "config_class":
            if type(config).__name__ != expected:
                return False
        elif getattr(config, key, None) != expected:
            return False
    return True


def published_defaults(hparams_cls, package: str, model):
    """The published settings shipped in ``<package>/hparams/`` for this model, or ``None``.

    Found by the model's name first (:func:`kedit_core.hparams.find_model_defaults`: ``gpt2-xl.json`` for
    ``openai-community/gpt2-xl``), then by its architecture: ``hparams/index.json`` lists
    ``{"file": ..., "match": {config attribute: value}, "source": ...}`` and the first entry whose
    ``match`` fits the model's config wins (so a local copy of GPT-J under any directory name gets GPT-J's
    settings).
    """
    root = Path(str(resources.files(package).joinpath("hparams")))
    path = find_model_defaults(root, model)
    if path is None:
        index = json.loads((root / "index.json").read_text(encoding="utf-8"))
        config = getattr(getattr(model, "model", None), "config", None)
        entry = next((e for e in index["models"] if config is not None and _config_matches(config, e["match"])), None)
        path = root / entry["file"] if entry is not None else None
    if path is None:
        return None
    return hparams_cls.from_dict(json.loads(path.read_text(encoding="utf-8")), source=f"{package}/hparams/{path.name}")


def inferred_layers(num_layers: int, count: int) -> list[int]:
    """Layers for a model kedit ships no settings for: ``count`` consecutive layers (fewer for shallow
    models) ending near 30% of the depth, where the published settings edit (GPT-J 3-8 of 28,
    Llama-3-8B 4-8 of 32, GPT-2 XL 13-17 of 48)."""
    count = max(1, min(count, num_layers // 4 or 1))
    end = min(max(int(round(0.3 * num_layers)), count - 1), max(num_layers - 2, 0))
    start = max(0, end - count + 1)
    return list(range(start, end + 1))
