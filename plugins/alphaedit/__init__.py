"""AlphaEdit (Fang et al., ICLR 2025, "AlphaEdit: Null-Space Constrained Knowledge Editing for Language
Models"): MEMIT's batch update projected onto the null space of the preserved knowledge, so that edits
leave the keys of generic text (C0) and of earlier edits untouched, which is what keeps a model usable
over thousands of sequential edits.

Composes the same core pieces as MEMIT (:mod:`kedit_core.editing`: context templates, batched values at the
last edited layer, per-layer keys on the partially edited model, the residual spread over layers); only
the solve differs::

    Û  = eigenvectors of the normalised C0 with eigenvalue < nullspace_threshold      (P = Û Ûᵀ)
    Δl = R Kᵀ P (P (K Kᵀ + Σ K_p K_pᵀ) + L2 · I)⁻¹                                     (as published)
       = R (Û S⁻¹ Ûᵀ K)ᵀ,   S = Ûᵀ (K Kᵀ + Σ K_p K_pᵀ) Û + L2 · I                    (kedit: r × r, exact)

``Σ K_p K_pᵀ`` (the keys of earlier edits) comes from an editing session (``EditContext.preserved_keys``,
kept on disk by :mod:`kedit_core.session`); a single edit outside a session has none. Reference mode
follows jianghoucheng/AlphaEdit: a float32 SVD of C0, the full ``d_k × d_k`` projector, a float32 solve.
Published settings (GPT-2 XL, GPT-J, Llama-3-8B) ship in ``hparams/``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

import kedit_core
from kedit_core.editing import (BatchEditHParams, BatchEditor, alphaedit_regulariser_solve, alphaedit_solve,
                                compute_batch_edit, covariance_factors)


@dataclass(frozen=True)
class AlphaEditHParams(BatchEditHParams):
    """AlphaEdit's hyper-parameters; the keys of the published ``hparams/AlphaEdit/*.json`` files."""

    layer_selection: Literal["all", "random"] = "all"
    mom2_update_weight: float = 15000.0      # in the published files, but unused by AlphaEdit's update
    nullspace_threshold: float = 2e-2        # keep C0's eigenvectors with eigenvalue below this
    L2: float = 10.0                         # α, the ridge on the projected update

    def validate(self) -> None:
        super().validate()
        self.require(self.nullspace_threshold > 0, "nullspace_threshold", "must be positive")
        self.require(self.L2 > 0, "L2", "must be positive (the projected system is singular without it)")


# Above this share of C0's energy in the kept directions, the "null space" protects little (reported).
KEPT_ENERGY_WARNING = 0.05


def kept_energy(factors, layer: int, threshold: float) -> float:
    """tr(Ûᵀ C0 Û) / tr(C0): the share of the preserved keys' energy an update inside Û can still change."""
    basis = factors.nullspace(layer, threshold)
    moment = factors.moment(layer)
    return float((basis * (moment @ basis)).sum() / torch.trace(moment))


class AlphaEditEditor(BatchEditor):
    name = "alphaedit"
    summary = "AlphaEdit: MEMIT's update projected onto the null space of C0 and of earlier edits' keys"
    HParams = AlphaEditHParams

    def compute(self, model, requests, context):
        hp = self.hparams
        layers = self.edited_layers(model)
        factors = covariance_factors(model, hp, context, layers)
        preserved = dict(context.preserved_keys or {})
        # λ_n of the norm constraint joins the ridge: both penalise ‖Δ‖²_F on the kept directions.
        ridge = hp.L2 + hp.norm_constraint
        method = "reference" if hp.reference else "fast"

        def solve(factors, layer, keys):
            return alphaedit_solve(factors, layer, keys, threshold=hp.nullspace_threshold, l2=ridge,
                                   preserved_gram=preserved.get(layer), method=method)

        def regulariser_solve(factors, layer, rhs):
            return alphaedit_regulariser_solve(factors, layer, rhs, threshold=hp.nullspace_threshold, l2=ridge,
                                               preserved_gram=preserved.get(layer))

        def prepare(factors):  # a threshold that keeps no direction fails here, before the values
            for layer in layers:
                if hp.reference:
                    factors.reference_projector(layer, hp.nullspace_threshold)
                else:
                    factors.nullspace(layer, hp.nullspace_threshold)

        result = compute_batch_edit(model, requests, hp, context, layers=layers, solve=solve, factors=factors,
                                    regulariser_solve=regulariser_solve, prepare=prepare)
        if not hp.reference:
            result.info["nullspace_dims"] = {layer: int(factors.nullspace(layer, hp.nullspace_threshold).shape[1])
                                             for layer in layers}
            result.info["nullspace_energy"] = energy = {layer: kept_energy(factors, layer, hp.nullspace_threshold)
                                                        for layer in layers}
            leaky = {layer: share for layer, share in energy.items() if share > KEPT_ENERGY_WARNING}
            if leaky:
                worst = max(leaky, key=leaky.get)
                context.say(f"alphaedit: nullspace_threshold {hp.nullspace_threshold:g} keeps directions holding "
                            f"{100 * leaky[worst]:.0f} % of C0's energy at layer {worst} "
                            f"({len(leaky)} of {len(layers)} layers above {100 * KEPT_ENERGY_WARNING:.0f} %): "
                            f"this is not a null space of the preserved keys on this model, and edits will reach "
                            f"generic text; the threshold is absolute (the published 2e-2 suits GPT-J's key "
                            f"scale), so choose it from this model's C0 spectrum")
        else:
            result.info["nullspace_dims"] = {}
        result.info["preserved_layers"] = sorted(layer for layer in layers if layer in preserved)
        return result


@kedit_core.hookimpl
def register_editors(register):
    register(AlphaEditEditor)
