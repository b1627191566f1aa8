"""Causal tracing (Meng et al. 2022, ROME §2): where a model keeps its facts, and which layers to edit.

    from kedit_core.causal_trace import TraceSettings, load_facts, run_trace

    facts = load_facts("known_1000.json")
    summary = run_trace(model, facts, TraceSettings(samples=10, window=10), "trace-out", limit=100)
    summary["suggestion"]["layers"]          # e.g. [4, 5, 6, 7, 8]: the editors' `layers`

:mod:`.engine` runs one prompt (batched over noise samples and restored states; ROME's per-cell loop is
kept as the reference), :mod:`.run` a file of facts (resumable), :mod:`.report` draws the charts. The
``kedit trace`` command wraps :func:`run_trace`.
"""
from .engine import KINDS, Cell, FactTracer, Restore, heatmap_cells, rome_forward_count, window_layers
from .facts import FACT_FORMATS, TracedFact, facts_from_records, load_facts
from .run import (MODES, TraceSettings, average_effects, fact_noise, run_trace, subject_embedding_std,
                  suggest_layers, summarise, trace_fact)

__all__ = ["KINDS", "Cell", "FactTracer", "Restore", "heatmap_cells", "rome_forward_count", "window_layers",
           "FACT_FORMATS", "TracedFact", "facts_from_records", "load_facts", "MODES", "TraceSettings",
           "average_effects", "fact_noise", "run_trace", "subject_embedding_std", "suggest_layers", "summarise",
           "trace_fact"]
