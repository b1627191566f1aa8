"""The multi-layer batch update shared by MEMIT and EMMET (``execute_memit`` / ``execute_emmet``).

For N requests and layers ``R = l1 < ... < L``::

    z   = value optimisation at block L's output           (all requests; see values.py)
    for i, l in enumerate(R):
        K  = keys of all requests at layer l, measured on the model as edited so far   (d_k x N)
        H  = block L's output at the bare prompts, measured now                          (d x N)
        Rl = (z - H) / (|R| - i)         # the first layer takes 1/|R| of the residual, the last what remains
        X  = solve(l, K)                 # MEMIT: (λC0 + K Kᵀ)⁻¹ K;  EMMET: C⁻¹K (KᵀC⁻¹K + λ_e I)⁻¹
        Δl = Rl Xᵀ                       # added to the MLP output projection, in its own layout

The model is measured with the earlier layers' updates applied through
:func:`~kedit_core.deltas.temporarily_applied`, so it is restored bit-exactly. Reference mode reads
keys and ``H`` with one full pass per layer that stops after block L, as published; the fast mode
(:class:`~kedit_core.editing.keys.LayerByLayerKeys`) resumes each layer's pass from the cached output
of the blocks that no longer change, so all layers together cost about one forward. The editor
supplies ``solve``.

ENCORE's norm constraint on the cumulative update (``norm_constraint`` λ_n, see
:class:`~kedit_core.editing.hparams.BatchEditHParams`): every editor here minimises, per layer,
``‖Δ K − R‖² + tr(Δ C Δᵀ)`` with its own preservation matrix C (MEMIT ``λC0``, AlphaEdit the null-space
form) plus, with the constraint, ``λ_n ‖D + Δ‖²`` where ``D = W_k − W_0`` is what earlier batches of the
session changed. The editor folds ``λ_n I`` into C (so ``X`` already carries it) and the drift adds
``−λ_n D (C⁻¹ − C⁻¹ K Xᵀ)``: the same ``X`` and one more solve against C (``regulariser_solve``).
"""
from __future__ import annotations

import warnings
from typing import Callable, ClassVar, Sequence

import torch
from tqdm.auto import tqdm

from ..deltas import Deltas, temporarily_applied
from ..editors import EditContext, Editor, EditResult, PhaseTimer
from ..errors import KeditError
from ..requests import EditRequest, check_conflicts
from .hparams import (LocateEditHParams, check_architecture_strings, check_layers, inferred_layers,
                      published_defaults)
from .keys import Capture, LayerByLayerKeys, collect, group_mean_weights, rows_with_bare_prompts
from .rows import value_rows
from .solvers import CovarianceFactors
from .templates import MEMIT_RECIPE, flatten_templates, resolve_context_templates
from .values import (Injection, ValueSettings, ValueStore, optimise_values_across_ranks, optimise_values_reference,
                     parse_memory)

__all__ = ["BatchEditor", "compute_batch_edit", "covariance_factors", "value_settings", "delta_dtype", "warn_conflicts",
           "cumulative_drift"]

SolveFn = Callable[[CovarianceFactors, int, torch.Tensor], torch.Tensor]
# ``C⁻¹ B`` for the editor's preservation matrix C (its λ_n I included) and B ``[d_k, m]``.
RegulariserSolveFn = Callable[[CovarianceFactors, int, torch.Tensor], torch.Tensor]


class BatchEditor(Editor):
    """Base of the multi-layer batch editors (MEMIT, EMMET, AlphaEdit): the published settings shipped in
    the plugin's ``hparams/`` when they fit the model, else ``inferred_layer_count`` inferred layers;
    layers must exist and ascend. Subclasses set ``name``, ``HParams`` and implement ``compute``."""

    uses_covariance = True
    inferred_layer_count: ClassVar[int] = 5

    @classmethod
    def inferred_layers_for(cls, model) -> list[int]:
        return inferred_layers(model.adapter.num_layers, cls.inferred_layer_count)

    @classmethod
    def default_hparams(cls, model):
        found = published_defaults(cls.HParams, cls.__module__, model)
        return found if found is not None else cls.HParams(layers=cls.inferred_layers_for(model))

    @classmethod
    def check_hparams(cls, hparams, model) -> None:
        check_layers(hparams, model, ascending=True)
        check_architecture_strings(hparams, model)

    def edited_layers(self, model) -> list[int]:
        return list(self.hparams.layers or self.inferred_layers_for(model))


# MEMIT/EMMET: whether a request's value optimisation stops once its target is the most probable token
# everywhere (ENCORE), when the hyper-parameters leave it open. Off in both modes: on SmolLM2-135M (100
# CounterFact edits, layers 5-9, λ 15000) it cut the steps from 18.7 to 10.4 per request but cost 10 points
# of ES and 11 of PS (bench/results/vs_easyedit/); `early_stop_most_probable=true` turns it on.
EARLY_STOP_DEFAULT = {"fast": False, "reference": False}


def warn_conflicts(requests: Sequence[EditRequest], context: EditContext, *, batch: bool = True) -> list[str]:
    """Raise on contradictory requests (same subject and prompt, different targets); return (and say)
    the warnings for one subject edited through several prompts in a batch, whose keys collide."""
    found = check_conflicts(requests)
    if not batch:
        return []
    for message in found:
        context.say(f"warning: {message}")
        warnings.warn(message, stacklevel=3)
    return found


def covariance_factors(model, hp: LocateEditHParams, context: EditContext, layers: list[int], *,
                       scale: float = 1.0, shift: float = 0.0) -> CovarianceFactors:
    """C = scale · C0 + shift · I for ``layers`` from ``context.stats`` (identity when
    ``mom2_adjustment`` is off)."""
    if not hp.mom2_adjustment:
        return CovarianceFactors(model, None, layers, scale=scale, shift=shift)
    if context.stats is None:
        raise KeditError("this editor needs covariance statistics (C0) for layer(s) "
                         f"{layers}: pass --cov LAYER=PATH for each (or a statistics source in "
                         "EditContext(stats=...)), or set mom2_adjustment to false to use the identity")
    return CovarianceFactors(model, context.stats, layers, scale=scale, shift=shift)


def value_settings(hp: LocateEditHParams, *, max_memory=None, early_stop_default: bool = False) -> ValueSettings:
    """The value optimisation's settings from the hyper-parameters; ``early_stop_most_probable=None``
    takes ``early_stop_default`` (the editor's choice for the mode), ``max_memory`` (bytes or a size
    such as ``"8GB"``) bounds the batches."""
    stop = hp.early_stop_most_probable if hp.early_stop_most_probable is not None else early_stop_default
    return ValueSettings(num_steps=hp.v_num_grad_steps, lr=hp.v_lr, weight_decay=hp.v_weight_decay,
                         clamp_norm_factor=hp.clamp_norm_factor, kl_factor=hp.kl_factor, stop_when_most_probable=stop,
                         batch_requests=hp.value_batch_size,
                         memory_bytes=None if max_memory is None else parse_memory(max_memory))


def delta_dtype(model) -> torch.dtype:
    """Deltas are float32 (the published code adds ``upd.float()``), float64 for a float64 model."""
    return torch.float64 if model.dtype == torch.float64 else torch.float32


def cumulative_drift(model, context: EditContext, layer: int) -> torch.Tensor | None:
    """``D = W_k − W_0`` of ``layer``'s MLP output projection (``[d, d_k]``, float64) in an editing session
    (``context.base_weights``), or None when it is zero or unknown."""
    if not context.base_weights:
        return None
    adapter = model.adapter
    name = adapter.mlp_out_weight_name(layer)
    base = context.base_weights.get(name)
    if base is None:
        return None
    current = adapter.mlp_out_weight(layer).detach()
    drift = adapter.from_param_layout(current.to(torch.float64) - base.to(current.device, torch.float64))
    return drift if bool(drift.any()) else None


def compute_batch_edit(model, requests: Sequence[EditRequest], hp: LocateEditHParams, context: EditContext, *,
                       layers: list[int], solve: SolveFn, factors: CovarianceFactors,
                       regulariser_solve: RegulariserSolveFn | None = None,
                       prepare: Callable[[CovarianceFactors], None] | None = None) -> EditResult:
    """Run the batch update (module docstring) and return the deltas with timings and diagnostics.
    ``regulariser_solve`` is needed for a norm constraint on the cumulative update (``hp.norm_constraint``
    with scope ``"cumulative"``) inside an editing session. ``prepare`` computes what the solves need from
    the statistics before the values are optimised (default: the Cholesky factors of C when the solver
    uses them), so bad statistics fail before the expensive phase."""
    adapter, tok = model.adapter, model.tokenizer
    timer = PhaseTimer()
    found = warn_conflicts(requests, context, batch=True)
    rule = "reference" if hp.reference else "offsets"
    z_layer = layers[-1]

    with timer("context templates"):
        groups, template_record = resolve_context_templates(model, MEMIT_RECIPE, context)
        templates = flatten_templates(groups)
    with timer("statistics"):
        factors.prepare()
        if prepare is not None:
            prepare(factors)
        elif not hp.reference and hp.solver in ("auto", "woodbury"):
            factors.factor_all()
    with timer("values"):
        rows, target_lengths = value_rows(tok, requests, templates, fact_token=hp.fact_token, rule=rule,
                                          tokenization="reference" if hp.reference else "kedit")
        injection = Injection(layer=z_layer, site="block", nll_layer=hp.loss_layer(model, z_layer))
        settings = value_settings(hp, max_memory=context.max_memory, early_stop_default=EARLY_STOP_DEFAULT[hp.mode])
        store = None
        if hp.reference:
            if context.work_dir is not None:
                context.say("work_dir is not used in reference mode (the published loop keeps nothing)")
            values = optimise_values_reference(model, rows, target_lengths, settings, injection,
                                               progress=context.progress)
        else:
            if context.work_dir is not None:
                store = ValueStore(context.work_dir, context.base_fingerprint or model.fingerprint())
            values = optimise_values_across_ranks(model, rows, target_lengths, settings, injection,
                                                  progress=context.progress, store=store)
            if store is not None and store.loaded:
                context.say(f"resumed: {store.loaded} batch(es) of values loaded from {store.directory}, "
                            f"{store.saved} computed")
    resumed = None if store is None else {"batches_loaded": store.loaded, "batches_computed": store.saved,
                                          "loaded_batches_seconds_when_computed": store.loaded_seconds}
    z = values.target.to(model.device)

    krows, bare = rows_with_bare_prompts(tok, requests, templates, fact_token=hp.fact_token, rule=rule)
    n = len(requests)
    weights = group_mean_weights(groups)
    template_rows = [r for r in range(len(krows)) if krows.kind[r] == "prompt"]
    deltas: dict[str, torch.Tensor] = {}
    written_keys: dict[int, torch.Tensor] = {}
    info_layers = {}
    dtype = delta_dtype(model)
    norm_weight = float(getattr(hp, "norm_constraint", 0.0))
    cumulative = norm_weight > 0 and getattr(hp, "norm_constraint_scope", "batch") == "cumulative"
    if cumulative and regulariser_solve is None:
        raise KeditError(f"{type(hp).__name__}: this editor does not support a norm constraint on the cumulative "
                         "update (norm_constraint_scope='cumulative'); use 'batch'")

    def key_capture(layer: int) -> Capture:
        return Capture(adapter.mlp_out_name(layer), "input", template_rows, [krows.owner[r] for r in template_rows],
                       [weights[krows.template[r]] for r in template_rows], n)

    bare_capture = Capture(adapter.layer_name(z_layer), "output", bare, list(range(n)), [1.0] * n, n)
    # Families that normalise the MLP output before the residual (Gemma 2/3) need it to map the residual
    # targets into the MLP's output space (BoundAdapter.mlp_output_change).
    post_norm = adapter.post_mlp_norm_name(layers[0]) is not None
    replayed = None if hp.reference else LayerByLayerKeys(model, krows, key_capture(layers[0]), bare_capture,
                                                          layers, z_layer, progress=context.progress,
                                                          mlp_outputs=post_norm)
    for i, layer in enumerate(tqdm(layers, desc="updating layers", disable=not context.progress, leave=False)):
        with timer("keys"):
            if replayed is not None:
                keys, current, mlp_current = replayed.read(i, deltas)
            else:
                captures = [key_capture(layer), bare_capture]
                if post_norm:
                    captures.append(Capture(adapter.mlp_name(layer), "output", bare, list(range(n)), [1.0] * n, n))
                with temporarily_applied(model.model, deltas):
                    keys, current, *rest = collect(model, krows, captures, stop_after=adapter.layer_name(z_layer),
                                                   progress=context.progress, desc=f"keys at layer {layer}")
                mlp_current = rest[0] if rest else None
        with timer("solve"):
            error = (z - current.to(z.dtype)).to(torch.float64)  # subtracted in float32, as published
            residual = error / (len(layers) - i)
            if mlp_current is not None:
                residual = adapter.mlp_output_change(layer, mlp_current, residual)
            k64 = keys.to(torch.float64).T                                # [d_k, N]
            x = solve(factors, layer, k64)                                # [d_k, N]
            update = residual.T.to(x.device) @ x.T                        # [d, d_k]
            drift = cumulative_drift(model, context, layer) if cumulative else None
            if drift is not None:  # − λ_n D (C⁻¹ − C⁻¹ K Xᵀ)
                g = regulariser_solve(factors, layer, drift.T.to(x.device)).T          # D C⁻¹  [d, d_k]
                update = update - norm_weight * (g - (g @ k64.to(x.device)) @ x.T)
            written_keys[layer] = keys.detach().to("cpu")
            deltas[adapter.mlp_out_weight_name(layer)] = adapter.to_param_layout(update).to(dtype).contiguous()
        info_layers[layer] = {"z_error_mean": float(error.norm(dim=1).mean()), "update_norm": float(update.norm())}
    result = EditResult(Deltas(deltas), timings=dict(timer.seconds), keys=written_keys)
    extra = result.deltas.extra
    extra["context_templates"] = groups
    extra["context_templates_origin"] = template_record
    extra["mode"] = hp.mode
    extra["layers"] = list(layers)
    if factors.origins:
        extra["covariance"] = {str(k): v for k, v in sorted(factors.origins.items())}
    if resumed is not None:
        result.info["values_resumed"] = resumed
    if replayed is not None:
        result.info["keys_passes"] = dict(replayed.passes)
    if not hp.reference:
        result.info["value_batches"] = {"requests_per_batch": values.batches, **values.plan,
                                        "early_stop_most_probable": settings.stop_when_most_probable}
    result.info.update({"layers": info_layers, "value_steps": values.steps, "value_final_loss": values.final_loss,
                        "warnings": found, "z_init_norm_mean": float(values.init.norm(dim=1).mean()),
                        "delta_norm_mean": float(values.delta.norm(dim=1).mean())})
    return result
