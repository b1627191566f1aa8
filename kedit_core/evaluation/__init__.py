"""Evaluation: CounterFact and zsRE metrics, the seed papers' fact metrics, and reports.

::

    from kedit_core.evaluation import load_cases, run_evaluation, EditPlan, write_report

    fmt, cases = load_cases("counterfact.json", limit=100)
    result = run_evaluation(model, cases, fmt, plan=EditPlan(method="memit"), sizes=[10, 100])
    write_report(result, "out/")          # metrics.json, metrics.csv, records.csv, metrics.png, scaling.png

    from kedit_core.evaluation import Fact, FactProbe
    probe = FactProbe(model, modified=[Fact("The Eiffel Tower is in", " Rome")], unmodified=kept)
    ... edit ...
    probe.measure(model)                  # A_M, A_F_minus_S, A_bar, reliability, generality, locality

Metric definitions: :mod:`.counterfact`, :mod:`.zsre`, :mod:`.facts`; scoring is
:func:`kedit_core.text.score_targets` (teacher forced, batched by tokens).
"""
from .aggregate import aggregate_records, harmonic_mean
from .counterfact import (GENERATION_METRICS, PROBABILITY_METRICS, ReferenceTexts, aggregate_counterfact,
                          counterfact_generation, score_counterfact)
from .datasets import CounterFactCase, ZsreCase, cases_from_records, load_cases
from .facts import (Fact, FactProbe, FLearningMetrics, RetentionMetrics, accuracy, locality, predict_facts,
                    retention_metrics, token_agreement)
from .generation import GenerationSettings, greedy_completions, prompt_seed, sample_ids, sample_texts
from .harness import EditPlan, EvalSettings, aggregate, evaluate_cases, run_evaluation
from .perplexity import documents_covering, perplexity
from .report import format_summary, plot_before_after, plot_scaling, write_report
from .text_metrics import TfidfModel, generation_entropy, ngram_entropy, word_tokenize
from .zsre import ZSRE_METRICS, aggregate_zsre, score_zsre

__all__ = [
    "CounterFactCase", "EditPlan", "EvalSettings", "FLearningMetrics", "Fact", "FactProbe", "GENERATION_METRICS",
    "GenerationSettings", "PROBABILITY_METRICS", "ReferenceTexts", "RetentionMetrics", "TfidfModel", "ZSRE_METRICS",
    "ZsreCase", "accuracy", "aggregate", "aggregate_counterfact", "aggregate_records", "aggregate_zsre",
    "cases_from_records", "counterfact_generation", "evaluate_cases", "format_summary", "generation_entropy",
    "documents_covering", "harmonic_mean", "load_cases", "locality", "ngram_entropy", "perplexity", "plot_before_after", "plot_scaling", "predict_facts",
    "prompt_seed", "retention_metrics", "run_evaluation", "sample_ids", "sample_texts", "score_counterfact", "score_zsre",
    "token_agreement", "word_tokenize", "write_report",
]
