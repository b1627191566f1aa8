"""The building blocks of the locate-then-edit editors (MEMIT, ROME, EMMET), composed by the plugins in
``plugins/``: context templates, subject positions, token rows, key extraction, value optimisation,
covariance factors and solvers, the multi-layer batch update, and shared hyper-parameter pieces.

Every piece exists once here; an editor only decides how to combine them.
"""
from .batch import (BatchEditor, compute_batch_edit, covariance_factors, cumulative_drift, delta_dtype, value_settings,
                    warn_conflicts)
from .hparams import (BatchEditHParams, LocateEditHParams, check_architecture_strings, check_layers, inferred_layers,
                      published_defaults)
from .keys import Capture, collect, flat_mean_weights, group_mean_weights, rows_with_bare_prompts
from .positions import FACT_TOKENS, EncodedPrompt, encode_prompts
from .rows import KL_PROMPT, TokenRows, key_rows, value_rows
from .solvers import (CovarianceFactors, FactorCache, alphaedit_regulariser_solve, alphaedit_solve, covariance_solve,
                      emmet_solve, factor_cache_for, memit_solve, rome_left_vector)
from .templates import (MEMIT_RECIPE, TemplateRecipe, flatten_templates, generate_context_templates,
                        load_context_templates, resolve_context_templates, rome_recipe, validate_template_groups)
from .values import (Injection, ValueResult, ValueSettings, optimise_values_across_ranks, optimise_values_batched,
                     optimise_values_reference, parse_memory, plan_value_batches)

__all__ = [
    "BatchEditHParams", "BatchEditor", "alphaedit_regulariser_solve", "alphaedit_solve", "covariance_solve", "cumulative_drift",
    "Capture", "CovarianceFactors", "EncodedPrompt", "FACT_TOKENS", "FactorCache", "Injection", "KL_PROMPT",
    "LocateEditHParams", "MEMIT_RECIPE", "TemplateRecipe", "TokenRows", "ValueResult", "ValueSettings",
    "check_architecture_strings", "check_layers", "collect", "compute_batch_edit", "covariance_factors", "delta_dtype",
    "emmet_solve", "encode_prompts", "factor_cache_for", "flat_mean_weights", "flatten_templates",
    "generate_context_templates", "group_mean_weights", "inferred_layers", "key_rows", "load_context_templates",
    "memit_solve", "optimise_values_across_ranks", "optimise_values_batched", "optimise_values_reference",
    "parse_memory", "plan_value_batches", "published_defaults",
    "resolve_context_templates", "rome_left_vector", "rome_recipe", "rows_with_bare_prompts",
    "validate_template_groups", "value_rows", "value_settings", "warn_conflicts",
]
