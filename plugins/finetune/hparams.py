"""Hyper-parameters of the fine-tuning editors, as validated frozen dataclasses.

Which parameters train is chosen the same way in every editor of the family: by ``layers`` and a
``module`` kind resolved through the model adapter (``mlp_out``: the MLP output projection, the
reference FT's choice; ``mlp``: the whole MLP; ``attn``: the attention module; ``block``: the whole
transformer block; ``all``: every parameter of the model), or by explicit parameter names / globs in
``params``, which replace ``layers``/``module`` when given.

The class defaults are the reference settings of Zhu et al. as shipped with ROME/MEMIT (Adam, 25
passes, lr 5e-4, stop once the mean loss < 1e-2, layer 0); per-model published values (FT-L's δ for
GPT-2 XL and GPT-J, the unconstrained FT layer) ship as JSON under ``defaults/<editor>/<model>.json``.
A reference FT hyper-parameter file (``hparams/FT/*.json`` of kmeng01/rome) is accepted as is: its
``rewrite_module_tmp`` becomes explicit ``params`` globs that are then checked against the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kedit_core import HyperParams
from kedit_core.errors import HyperParamsError

ModuleKind = Literal["mlp_out", "mlp", "attn", "block", "all"]
StageMethod = Literal["full", "lora"]

# Keys of a reference FT file that only describe GPT-2/GPT-J module paths kedit takes from the adapter.
_REFERENCE_PATH_KEYS = ("layer_module_tmp", "mlp_module_tmp", "attn_module_tmp", "ln_f_module", "lm_head_module")


def _check_selection(hp: HyperParams) -> None:
    hp.require(hp.layers is None or len(hp.layers) > 0, "layers", "needs at least one layer (or null for every layer)")
    hp.require(hp.layers is None or all(layer >= 0 for layer in hp.layers), "layers", "layers are numbered from 0")
    hp.require(hp.layers is None or len(set(hp.layers)) == len(hp.layers), "layers", "lists a layer twice")
    hp.require(all(isinstance(p, str) and p.strip() for p in hp.params), "params",
               "expected parameter names or globs (non-empty strings)")


def _check_training(hp: HyperParams, prefix: str = "") -> None:
    hp.require(getattr(hp, prefix + "num_steps") >= 0, prefix + "num_steps", "must be >= 0")
    hp.require(getattr(hp, prefix + "lr") > 0, prefix + "lr", "must be positive")
    stop = getattr(hp, prefix + "early_stop_loss")
    hp.require(stop is None or stop > 0, prefix + "early_stop_loss", "must be positive, or null to never stop early")


@dataclass(frozen=True)
class FineTuneHParams(HyperParams):
    """``ft``: Adam on the chosen parameters, loss = mean NLL of the target tokens given the prompt."""

    layers: list[int] | None = field(default_factory=lambda: [0])  # null: every layer
    module: ModuleKind = "mlp_out"
    params: list[str] = field(default_factory=list)  # explicit names or globs; replace layers/module
    include_biases: bool = True      # with layers/module: train the modules' biases too (the reference does)
    num_steps: int = 25              # passes over the requests (one Adam step per mini-batch)
    lr: float = 5e-4
    weight_decay: float = 0.0
    batch_size: int = 64
    early_stop_loss: float | None = 1e-2  # skip a batch whose loss is below it; stop once a pass's mean is

    def validate(self) -> None:
        _check_selection(self)
        _check_training(self)
        self.require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        self.require(self.batch_size >= 1, "batch_size", "must be >= 1")

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "hyper-parameters"):
        if isinstance(data, dict) and "rewrite_module_tmp" in data:
            data = _from_reference_file(cls, data, source)
        return super().from_dict(data, source=source)


@dataclass(frozen=True)
class ConstrainedFTHParams(FineTuneHParams):
    """``ft-l``: FT with every trained parameter projected into ``[θ0 − δ, θ0 + δ]`` after each step."""

    norm_constraint: float = 5e-4    # δ, the ℓ∞ radius around the original weights

    def validate(self) -> None:
        super().validate()
        self.require(self.norm_constraint > 0, "norm_constraint", "the ℓ∞ radius δ must be positive")


@dataclass(frozen=True)
class MixedFTHParams(FineTuneHParams):
    """``ft-mix``: every mini-batch of modified facts also holds unmodified facts; the loss (and the
    early-stop rule) is the mean over all examples of the mixed mini-batch."""

    # A file of unmodified facts (CounterFact, zsRE or plain records); or pass them to the edit as
    # EditContext(options={"unmodified_facts": ...}). Each is trained towards its target_true (its
    # target_new when the record has no target_true).
    unmodified_facts: str | None = None
    mix_ratio: float = 1.0           # unmodified facts per modified fact in each mini-batch

    def validate(self) -> None:
        super().validate()
        self.require(self.mix_ratio > 0, "mix_ratio", "must be positive (unmodified facts per modified fact)")


@dataclass(frozen=True)
class FLearningHParams(HyperParams):
    """``f-learning``: forget the old facts (θ' = θ − λ·(FT(θ, old) − θ)), then learn the new ones on θ'.

    Both stages train the same selected parameters, each either directly (``full``) or through LoRA
    adapters (peft) on the selected linear layers (``lora``). Not published per model; the defaults
    are kedit's: the paper's best combination, LoRA-forget then full-learn, on every block.
    """

    layers: list[int] | None = None  # null: every layer
    module: ModuleKind = "block"
    params: list[str] = field(default_factory=list)
    include_biases: bool = True
    forget_method: StageMethod = "lora"
    forget_num_steps: int = 10
    forget_lr: float = 1e-3
    forget_early_stop_loss: float | None = None  # the model knows the old facts: their loss starts low
    forget_scale: float = 1.0        # λ
    learn_method: StageMethod = "full"
    learn_num_steps: int = 25
    learn_lr: float = 5e-4
    learn_early_stop_loss: float | None = 1e-2
    batch_size: int = 64
    weight_decay: float = 0.0
    lora_rank: int = 8
    lora_alpha: float = 16.0         # LoRA scaling = lora_alpha / lora_rank

    def validate(self) -> None:
        _check_selection(self)
        _check_training(self, "forget_")
        _check_training(self, "learn_")
        self.require(self.forget_scale >= 0, "forget_scale", "λ must be >= 0")
        self.require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        self.require(self.batch_size >= 1, "batch_size", "must be >= 1")
        self.require(self.lora_rank >= 1, "lora_rank", "must be >= 1")
        self.require(self.lora_alpha > 0, "lora_alpha", "must be positive")


def _from_reference_file(cls, data: dict, source: str) -> dict:
    """A ROME/MEMIT ``hparams/FT/*.json`` dict as kedit keys. The reference picks parameters by substring
    (``rewrite_module_tmp.format(layer) in name``); kedit takes exactly the parameters under those modules."""
    data = dict(data)
    template = data.pop("rewrite_module_tmp")
    for key in _REFERENCE_PATH_KEYS:
        data.pop(key, None)
    layers = data.get("layers")
    if not isinstance(template, str) or "{}" not in template or not isinstance(layers, list):
        raise HyperParamsError(f"{source}: a reference FT file needs 'rewrite_module_tmp' with '{{}}' and a list "
                               f"of 'layers'; got {template!r} and {layers!r}")
    data["params"] = [template.format(layer) + ".*" for layer in layers]
    kl_factor = data.pop("kl_factor", 0)
    if kl_factor not in (0, 0.0, False, None):
        raise HyperParamsError(f"{source}: kl_factor = {kl_factor!r}: kedit's FT has no KL term; use 0")
    if data.get("wd_power_law") is not None:
        raise HyperParamsError(f"{source}: wd_power_law is not supported; give a fixed weight_decay instead")
    data.pop("wd_power_law", None)
    if data.get("weight_decay") is False:
        data["weight_decay"] = 0.0
    if data.get("norm_constraint") in (False, None):
        data.pop("norm_constraint", None)  # unconstrained FT
    elif "norm_constraint" not in {f for f in cls.field_names()}:
        raise HyperParamsError(f"{source}: norm_constraint = {data['norm_constraint']!r} makes this constrained "
                               "fine-tuning; use the 'ft-l' editor for it")
    return data
