"""ROME (Meng et al. 2022, "Locating and Editing Factual Associations in GPT") and r-ROME (Gupta et al.
2024, "Rebuilding ROME"): one rank-one update of one MLP output projection per fact, applied one request
after another. Composes kedit's core pieces (:mod:`kedit_core.editing`)::

    k* = mean over the context templates of the key at the subject's last token
    u  = C0⁻¹ k* / ‖C0⁻¹ k*‖                       (C0 = I when mom2_adjustment is off)
    v* = z from value optimisation at the MLP output of the layer
    ΔW = (v* − W k − b) uᵀ / (uᵀ k)                 ROME: k, W k + b at the bare prompt
    ΔW = (v* − mean(W k + b)) uᵀ / (uᵀ k*)           r-ROME (r_rome=true): the averaged key everywhere

Each request is computed on the model with the earlier requests' updates applied (temporarily), so a
list of requests is the published sequential ROME.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

import kedit_core
from kedit_core import Deltas, EditResult, Editor
from kedit_core.deltas import temporarily_applied
from kedit_core.editors import PhaseTimer
from kedit_core.editing import (Capture, Injection, LocateEditHParams, check_architecture_strings, check_layers,
                                collect, covariance_factors, delta_dtype, flat_mean_weights, flatten_templates,
                                inferred_layers, optimise_values_batched, optimise_values_reference,
                                published_defaults, resolve_context_templates, rome_left_vector, rome_recipe,
                                rows_with_bare_prompts, value_rows, value_settings, warn_conflicts)


@dataclass(frozen=True)
class RomeHParams(LocateEditHParams):
    """ROME's hyper-parameters; the keys of the published ``hparams/ROME/*.json`` files, plus ``r_rome``."""

    clamp_norm_factor: float = 4.0
    context_template_length_params: list[list[int]] = field(default_factory=lambda: [[5, 10], [10, 10]])
    r_rome: bool = False   # r-ROME: use the averaged key k* (and the averaged output) in the update

    def validate(self) -> None:
        super().validate()
        ok = all(len(pair) == 2 and pair[0] >= 1 and pair[1] >= 0 for pair in self.context_template_length_params)
        self.require(ok, "context_template_length_params", "expected [[max_tokens, count], ...] with max_tokens >= 1")


class RomeEditor(Editor):
    name = "rome"
    summary = "ROME: one rank-one MLP update per fact, applied sequentially (r_rome=true for r-ROME)"
    HParams = RomeHParams
    uses_covariance = True

    @classmethod
    def default_hparams(cls, model):
        found = published_defaults(RomeHParams, __name__, model)
        return found if found is not None else RomeHParams(layers=inferred_layers(model.adapter.num_layers, 1)[-1:])

    @classmethod
    def check_hparams(cls, hparams, model) -> None:
        check_layers(hparams, model, ascending=False)
        check_architecture_strings(hparams, model)

    def compute(self, model, requests, context):
        hp = self.hparams
        adapter, tok = model.adapter, model.tokenizer
        timer = PhaseTimer()
        warn_conflicts(requests, context, batch=False)
        layers = sorted(hp.layers or inferred_layers(adapter.num_layers, 1)[-1:])
        rule = "reference" if hp.reference else "offsets"
        with timer("context templates"):
            groups, record = resolve_context_templates(model, rome_recipe(hp.context_template_length_params), context)
            templates = flatten_templates(groups)
        factors = covariance_factors(model, hp, context, layers)
        with timer("statistics"):
            factors.prepare()
            if not hp.reference and not factors.identity:
                factors.factor_all()
        settings = value_settings(hp, max_memory=context.max_memory)
        optimise = optimise_values_reference if hp.reference else optimise_values_batched
        method = "reference" if hp.reference else "auto"
        weights = flat_mean_weights(len(templates))
        total: dict[str, torch.Tensor] = {}
        steps = []
        for req in tqdm(requests, desc="ROME requests", disable=not context.progress or len(requests) < 2, leave=False):
            for layer in layers:
                name = adapter.mlp_out_weight_name(layer)
                with temporarily_applied(model.model, total):
                    with timer("keys"):
                        rows, bare = rows_with_bare_prompts(tok, [req], templates, fact_token=hp.fact_token, rule=rule)
                        t_rows = [r for r in range(len(rows)) if rows.kind[r] == "prompt"]
                        module = adapter.mlp_out_name(layer)
                        k_star, out_star, k_bare, out_bare = collect(
                            model, rows,
                            [Capture(module, "input", t_rows, [0] * len(t_rows), weights, 1),
                             Capture(module, "output", t_rows, [0] * len(t_rows), weights, 1),
                             Capture(module, "input", bare, [0], [1.0], 1),
                             Capture(module, "output", bare, [0], [1.0], 1)],
                            stop_after=module)
                    with timer("solve"):
                        u = rome_left_vector(factors, layer, k_star[0], method).to(model.device)
                    with timer("values"):
                        vrows, lengths = value_rows(tok, [req], templates, fact_token=hp.fact_token, rule=rule,
                                                    tokenization="reference" if hp.reference else "kedit")
                        injection = Injection(layer=layer, site="mlp", nll_layer=adapter.num_layers - 1)
                        values = optimise(model, vrows, lengths, settings, injection)
                    steps.extend(values.steps)
                with timer("solve"):
                    target = values.target[0].to(model.device).float()
                    if hp.r_rome:  # rebuilding-rome: k* and the averaged output everywhere
                        key, current = k_star[0].float(), out_star[0].float()
                    else:
                        key, current = k_bare[0].float(), out_bare[0].float()
                    right = (target - current) / torch.dot(key, u)
                    update = torch.outer(right, u).to(torch.float64)          # [d, d_k]
                    update = adapter.to_param_layout(update)
                    total[name] = total[name] + update if name in total else update
        dtype = delta_dtype(model)
        result = EditResult(Deltas({k: v.to(dtype).contiguous() for k, v in total.items()}),
                            timings=dict(timer.seconds))
        extra = result.deltas.extra
        extra.update({"context_templates": groups, "context_templates_origin": record, "mode": hp.mode,
                      "layers": layers, "r_rome": hp.r_rome})
        if factors.origins:
            extra["covariance"] = {str(k): v for k, v in sorted(factors.origins.items())}
        result.info.update({"value_steps": steps})
        return result


class RRomeEditor(RomeEditor):
    """r-ROME under its own name: ROME with ``r_rome=true``."""

    name = "r-rome"
    summary = "r-ROME: ROME with the averaged key k* in the update (stable over long edit sequences)"

    @classmethod
    def default_hparams(cls, model):
        return RomeEditor.default_hparams(model).replace(r_rome=True)


@kedit_core.hookimpl
def register_editors(register):
    register(RomeEditor)
    register(RRomeEditor)
