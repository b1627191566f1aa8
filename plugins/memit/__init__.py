"""MEMIT (Meng et al. 2023, "Mass-Editing Memory in a Transformer"): thousands of facts at once, spread
over a range of MLP output projections. Composes kedit's core pieces
(:mod:`kedit_core.editing`): context templates, batched value optimisation at the last edited layer,
per-layer key extraction on the partially edited model, and ``Δ = R Kᵀ (λ C0 + K Kᵀ)⁻¹`` (``λ C0 + λ_n I`` with
ENCORE's norm constraint, ``norm_constraint`` = λ_n).
Published settings for GPT-2 XL, GPT-J, GPT-NeoX-20B and Llama-3-8B ship in ``hparams/``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import kedit_core
from kedit_core.editing import BatchEditHParams, BatchEditor, compute_batch_edit, covariance_factors, covariance_solve, \
    memit_solve


@dataclass(frozen=True)
class MemitHParams(BatchEditHParams):
    """MEMIT's hyper-parameters; the keys of the published ``hparams/MEMIT/*.json`` files."""

    layer_selection: Literal["all", "random"] = "all"   # recorded; the published code ignores it too
    mom2_update_weight: float = 15000.0                  # λ on the normalised C0

    def validate(self) -> None:
        super().validate()
        self.require(self.mom2_update_weight > 0, "mom2_update_weight", "must be positive")


class MemitEditor(BatchEditor):
    name = "memit"
    summary = "MEMIT: batch edits spread over several MLP layers, Δ = R Kᵀ(λC0 + KKᵀ)⁻¹"
    HParams = MemitHParams

    def compute(self, model, requests, context):
        hp = self.hparams
        layers = self.edited_layers(model)
        factors = covariance_factors(model, hp, context, layers, scale=hp.mom2_update_weight,
                                     shift=hp.norm_constraint)
        method = "reference" if hp.reference else hp.solver

        def solve(factors, layer, keys):
            return memit_solve(factors, layer, keys, method)

        return compute_batch_edit(model, requests, hp, context, layers=layers, solve=solve, factors=factors,
                                  regulariser_solve=covariance_solve)


@kedit_core.hookimpl
def register_editors(register):
    register(MemitEditor)
