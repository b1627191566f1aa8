"""EMMET (Gupta et al. 2024, "A Unified Framework for Model Editing"): batched ROME with equality
constraints, ``Δ = R (Kᵀ C⁻¹ K + λ_e I)⁻¹ Kᵀ C⁻¹`` with ``C = w · C0 + (μ + λ_n) I``, spread over layers as
MEMIT does (μ = ``update_norm_lambda`` is ENCORE's per-batch norm penalty as the reference names it; λ_n =
``norm_constraint`` the same penalty on the cumulative update in an editing session). Composes the same core pieces as MEMIT (:mod:`kedit_core.editing`); only the solve differs.
Settings follow ``scalable-model-editing/unified-model-editing``'s ``hparams/EMMET``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import kedit_core
from kedit_core.editing import BatchEditHParams, BatchEditor, compute_batch_edit, covariance_factors, covariance_solve, \
    emmet_solve


@dataclass(frozen=True)
class EmmetHParams(BatchEditHParams):
    """EMMET's hyper-parameters; the keys of the published ``hparams/EMMET/*.json`` files."""

    layer_selection: Literal["all", "random"] = "all"
    mom2_update_weight: float = 1.0          # w in C = w·C0 + μI
    update_norm_lambda: float = 0.0          # μ
    emmet_lambda: float = 0.1                # λ_e, regularises Kᵀ C⁻¹ K (batches of more than one)
    calculate_objective_value: bool = False  # the reference's diagnostic distances; not computed by kedit

    def validate(self) -> None:
        super().validate()
        self.require(self.mom2_update_weight > 0, "mom2_update_weight", "must be positive")
        self.require(self.update_norm_lambda >= 0, "update_norm_lambda", "must be >= 0")
        self.require(self.emmet_lambda >= 0, "emmet_lambda", "must be >= 0")


class EmmetEditor(BatchEditor):
    name = "emmet"
    summary = "EMMET: equality-constrained batch edits, Δ = R(KᵀC⁻¹K + λI)⁻¹KᵀC⁻¹"
    HParams = EmmetHParams
    inferred_layer_count = 1

    def compute(self, model, requests, context):
        hp = self.hparams
        if hp.calculate_objective_value:
            warnings.warn("EMMET: calculate_objective_value is accepted but kedit does not compute the "
                          "reference's diagnostic distances", stacklevel=2)
        layers = self.edited_layers(model)
        factors = covariance_factors(model, hp, context, layers, scale=hp.mom2_update_weight,
                                     shift=hp.update_norm_lambda + hp.norm_constraint)
        method = "reference" if hp.reference else hp.solver

        def solve(factors, layer, keys):
            return emmet_solve(factors, layer, keys, hp.emmet_lambda, method)

        return compute_batch_edit(model, requests, hp, context, layers=layers, solve=solve, factors=factors,
                                  regulariser_solve=covariance_solve)


@kedit_core.hookimpl
def register_editors(register):
    register(EmmetEditor)
