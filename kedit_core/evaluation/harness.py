"""Evaluate a model before and after an edit, at one or several edit counts.

:func:`evaluate_cases` scores a model on CounterFact or zsRE cases; :func:`run_evaluation` evaluates the
unedited model, then for each edit count ``n`` computes an edit of the first ``n`` requests (any
registered editor, through :func:`kedit_core.compute_edit`) or applies saved deltas, evaluates the
first ``n`` cases, and reverts, so every count starts from the same base weights (checked by
fingerprint). Each finished phase is saved under ``out_dir/partial/`` with a key of everything it depends
on, so an interrupted sweep resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from .._version import __version__
from ..atomic import write_json_atomic
from ..deltas import Deltas
from ..editors import EditContext, compute_edit, get_editor, resolve_hparams
from ..errors import KeditError, KeditRuntimeError
from ..models import LoadedModel
from ..requests import requests_sha256
from ..text import default_score_tokens
from .counterfact import (GENERATION_METRICS, PROBABILITY_METRICS, ReferenceTexts, aggregate_counterfact,
                          counterfact_generation, score_counterfact)
from .datasets import file_sha256
from .generation import GenerationSettings
from .text_metrics import TfidfModel
from .zsre import ZSRE_METRICS, aggregate_zsre, score_zsre

__all__ = ["EvalSettings", "EditPlan", "evaluate_cases", "aggregate", "run_evaluation", "metric_names",
           "headline_metrics"]


@dataclass(frozen=True)
class EvalSettings:
    """How cases are scored. ``generation`` switches CounterFact's GE/RS on (they sample text, which
    costs far more than the probability metrics)."""

    max_tokens: int | None = None
    generation: bool = True
    generation_settings: GenerationSettings = field(default_factory=GenerationSettings)
    progress: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("progress")
        return d


@dataclass
class EditPlan:
    """What happens between the evaluations: run ``method`` (with ``hparams``: None for the editor's
    defaults for this model, a dict, a JSON file or a HyperParams object; then ``overrides``), or apply
    the ``deltas`` file."""

    method: str | None = None
    hparams: Any = None
    overrides: dict = field(default_factory=dict)   # hyper-parameter keyword overrides on top of ``hparams``
    deltas: str | Path | None = None
    seed: int = 0
    stats: Any = None                       # a kedit_core.stats CovarianceSource for editors that read C0
    context_templates: list[list[str]] | None = None
    check_fingerprint: bool = True          # refuse deltas made for another model / other requests
    describe_stats: Any = None              # how the C0 source was specified (recorded with the results)
    # Where the editor keeps its value batches across runs (kept afterwards), instead of the run's own
    # ``partial/work_<n>`` (removed once the run is saved). Plans that differ only in how the values are
    # carried into the weights (MEMIT's λ, say) then optimise each value once; the store's keys hold
    # everything a value depends on, so a plan whose values differ never reads another's.
    values_dir: str | Path | None = None

    def __post_init__(self):
        if (self.method is None) == (self.deltas is None):
            raise KeditError("an edit plan needs exactly one of: an editor name (--method) or a delta file (--deltas)")


def metric_names(fmt: str) -> tuple[str, ...]:
    return PROBABILITY_METRICS + GENERATION_METRICS if fmt == "counterfact" else ZSRE_METRICS


def headline_metrics(fmt: str) -> tuple[str, ...]:
    """The metrics plotted against the number of edits."""
    return ("ES", "PS", "NS", "Score") if fmt == "counterfact" else ZSRE_METRICS


def evaluate_cases(model: LoadedModel, cases: Sequence, fmt: str, settings: EvalSettings = EvalSettings(), *,
                   references: ReferenceTexts | None = None, tfidf: TfidfModel | None = None) -> list[dict]:
    """Score ``model`` on ``cases``; one dict per case with ``case_id``, ``metrics`` (×100) and the
    details behind them (NLLs or token hits; generated ``texts`` for CounterFact with generation on)."""
    if not cases:
        return []
    if fmt == "counterfact":
        records = score_counterfact(model.model, model.tokenizer, cases, max_tokens=settings.max_tokens,
                                    progress=settings.progress)
        if settings.generation:
            gens = counterfact_generation(model.model, model.tokenizer, cases, settings.generation_settings,
                                          references=references, tfidf=tfidf, progress=settings.progress)
            for record, gen in zip(records, gens):
                record["metrics"].update(gen["metrics"])
                record["texts"] = gen["texts"]
        return records
    if fmt == "zsre":
        return score_zsre(model.model, model.tokenizer, cases, max_tokens=settings.max_tokens,
                          progress=settings.progress)
    raise KeditError(f"unknown evaluation format {fmt!r}; expected counterfact or zsre")


def aggregate(records: Sequence[dict], fmt: str) -> dict:
    """Aggregate per-record results (as :func:`evaluate_cases` returns them) into the reported numbers."""
    metrics = [r["metrics"] for r in records]
    return aggregate_counterfact(metrics) if fmt == "counterfact" else aggregate_zsre(metrics)


# --------------------------------------------------------------------------------------------------
# resumable phases

def _key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _cases_sha256(cases: Sequence) -> str:
    return _key([asdict(c) for c in cases])


def _write_json_atomic(path: Path, data) -> None:
    write_json_atomic(path, data, indent=1)


def _load_phase(path: Path | None, key: str):
    if path is None or not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # unreadable, not UTF-8, not JSON: recomputed, never trusted
        return None
    return data.get("result") if isinstance(data, dict) and data.get("key") == key else None


def _save_phase(path: Path | None, key: str, result) -> None:
    if path is not None:
        _write_json_atomic(path, {"key": key, "result": result})


# --------------------------------------------------------------------------------------------------

def _check_sizes(sizes: Sequence[int] | None, num_cases: int) -> list[int]:
    sizes = sorted(set(int(s) for s in (sizes or [num_cases])))
    bad = [s for s in sizes if s < 1 or s > num_cases]
    if bad:
        raise KeditError(f"edit count(s) {bad} are out of range: there are {num_cases} records to edit "
                         "(raise --n, or use counts between 1 and that)")
    return sizes


def run_evaluation(model: LoadedModel, cases: Sequence, fmt: str, *, plan: EditPlan | None = None,
                   sizes: Sequence[int] | None = None, settings: EvalSettings = EvalSettings(),
                   references: ReferenceTexts | None = None, tfidf: TfidfModel | None = None,
                   out_dir: str | Path | None = None, resume: bool = True,
                   log: Callable[[str], None] | None = None, metadata: dict | None = None) -> dict:
    """Evaluate the unedited model and, with a ``plan``, the model edited with the first ``n`` requests
    for each ``n`` in ``sizes`` (default: all cases). Returns the result document that
    :func:`kedit_core.evaluation.report.write_report` writes (settings, seed, resolved hyper-parameters,
    per-record and aggregate metrics before and after, timings). The model's weights are the same
    afterwards as before (checked); a failed edit leaves them untouched."""
    say = log or (lambda message: None)
    if settings.max_tokens is None:  # record the budget actually used
        settings = replace(settings, max_tokens=default_score_tokens(model.device))
    cases = list(cases)
    if not cases:
        raise KeditError("no records to evaluate")
    partial = Path(out_dir) / "partial" if out_dir is not None and resume else None
    base_fingerprint = model.fingerprint()
    sizes = _check_sizes(sizes, len(cases)) if plan is not None else []
    evaluated = cases[:max(sizes)] if sizes else cases
    common = {"kedit": __version__, "model": base_fingerprint, "format": fmt, "settings": settings.to_dict(),
              "references": None if references is None else _key(sorted(references.texts.items())),
              "tfidf": None if tfidf is None else _key(sorted(tfidf.idf.items()))}

    edit_info: dict = {"mode": "none"}
    hparams_obj = None
    deltas_file = None
    if plan is not None:
        if plan.method is not None:
            editor_cls = get_editor(plan.method)
            hparams_obj = resolve_hparams(editor_cls, model, plan.hparams, **plan.overrides)
            edit_info = {"mode": "method", "editor": editor_cls.name, "hparams": hparams_obj.to_dict(),
                         "seed": plan.seed, "stats": plan.describe_stats,
                         "uses_covariance": bool(getattr(editor_cls, "uses_covariance", False)),
                         "context_templates": plan.context_templates}
        else:
            deltas_file = Deltas.load(plan.deltas, model=model.model)
            if len(sizes) != 1:
                raise KeditError("a delta file holds one edit; sweeping over edit counts needs --method")
            edit_info = {"mode": "deltas", "deltas_file": str(plan.deltas), "editor": deltas_file.editor,
                         "hparams": deltas_file.hparams, "seed": deltas_file.extra.get("seed"),
                         "requests_sha256": deltas_file.requests_sha256,
                         "base_fingerprint": deltas_file.base_fingerprint,
                         "deltas_file_sha256": file_sha256(plan.deltas)}
            expected = deltas_file.requests_sha256
            actual = requests_sha256([c.request for c in evaluated])
            if plan.check_fingerprint and expected and expected != actual:
                n_req = deltas_file.extra.get("num_requests")
                hint = f" (the file says it holds {n_req} requests: try --n {n_req})" if n_req else ""
                raise KeditError(f"{plan.deltas} was computed for other requests than the first {len(evaluated)} "
                                 f"records of the data{hint}; pass --force to evaluate anyway")

    # -- before -------------------------------------------------------------------------------
    pre_key = _key({**common, "cases": _cases_sha256(evaluated)})
    pre_path = None if partial is None else partial / "pre.json"
    pre = _load_phase(pre_path, pre_key)
    if pre is not None:
        say(f"unedited model: reusing {pre_path}")
    else:
        say(f"evaluating the unedited model on {len(evaluated)} {fmt} records")
        start = time.perf_counter()
        pre = {"records": evaluate_cases(model, evaluated, fmt, settings, references=references, tfidf=tfidf)}
        pre["seconds"] = time.perf_counter() - start
        _save_phase(pre_path, pre_key, pre)

    runs = []
    if plan is None:
        runs.append(_run_entry(fmt, 0, pre["records"], None, {"eval_pre": pre["seconds"]}))
    for n in sizes:
        subset = cases[:n]
        run_key = _key({**common, "pre": pre_key, "n": n, "cases": _cases_sha256(subset),
                        "edit": {k: v for k, v in edit_info.items() if k != "stats"}, "stats": str(plan.describe_stats)})
        run_path = None if partial is None else partial / f"edits_{n}.json"
        post = _load_phase(run_path, run_key)
        # the editor keeps its finished pieces of work (MEMIT's value batches) here, so a run cut short
        # during the edit resumes it; once the phase is saved they are no longer needed (a run killed between
        # the two leaves them: the next run removes them)
        kept_values = plan is not None and plan.values_dir is not None
        work_dir = None if partial is None or kept_values else partial / f"work_{n}"
        if post is not None:
            say(f"{n} edits: reusing {run_path}")
        else:
            post = _edit_and_evaluate(model, subset, fmt, plan, hparams_obj, deltas_file, settings, references, tfidf,
                                      base_fingerprint, say,
                                      work_dir=Path(plan.values_dir) if kept_values else work_dir)
            _save_phase(run_path, run_key, post)
        if work_dir is not None:
            shutil.rmtree(work_dir, ignore_errors=True)
        runs.append(_run_entry(fmt, n, pre["records"][:n], post,
                               {"eval_pre": pre["seconds"] * n / len(evaluated), **post["timings"]}))

    return {
        "kedit_version": __version__,
        "format": fmt,
        "model": {"source": model.source, "fingerprint": base_fingerprint, **model.info},
        "settings": {**settings.to_dict(), "sizes": sizes, "num_records": len(evaluated),
                     "metrics_scale": "percent (x100); nll values are raw nats per token"},
        "edit": edit_info,
        **(metadata or {}),
        "runs": runs,
    }


def _edit_and_evaluate(model, subset, fmt, plan, hparams_obj, deltas_file, settings, references, tfidf,
                       base_fingerprint, say, work_dir=None) -> dict:
    n = len(subset)
    timings: dict = {}
    start = time.perf_counter()
    if deltas_file is None:
        say(f"{n} edits: computing with '{plan.method}' (seed {plan.seed})")
        context = EditContext(seed=plan.seed, progress=settings.progress, stats=plan.stats,
                              context_templates=plan.context_templates, log=say, work_dir=work_dir)
        result = compute_edit(model, [c.request for c in subset], plan.method, hparams_obj, context=context)
        deltas = result.deltas
        timings["editor_phases"] = dict(result.timings)
        info = {"deltas_norms": deltas.norms(), "editor_info": result.info}
    else:
        deltas = deltas_file
        info = {"deltas_norms": deltas.norms()}
    timings["edit"] = time.perf_counter() - start
    applied = deltas.apply(model.model, check_fingerprint=plan.check_fingerprint)
    try:
        say(f"{n} edits: evaluating the edited model")
        start = time.perf_counter()
        records = evaluate_cases(model, subset, fmt, settings, references=references, tfidf=tfidf)
        timings["eval_post"] = time.perf_counter() - start
    finally:
        applied.revert()
    if model.fingerprint() != base_fingerprint:
        raise KeditRuntimeError("the model's weights differ from the base after reverting an edit (a bug: please report)")
    return {"records": records, "timings": timings, **info}


def _run_entry(fmt: str, n: int, pre_records: list[dict], post: dict | None, timings: dict) -> dict:
    entry = {"num_edits": n, "aggregate": {"pre": aggregate(pre_records, fmt)}, "timings": timings}
    if post is not None:
        entry["aggregate"]["post"] = aggregate(post["records"], fmt)
        entry["deltas_norms"] = post.get("deltas_norms")
        if post.get("editor_info"):
            entry["editor_info"] = post["editor_info"]
    def strip(record: dict) -> dict:
        return {k: v for k, v in record.items() if k != "case_id"}

    records = []
    for i, pre_record in enumerate(pre_records):
        row = {"case_id": pre_record["case_id"], "pre": strip(pre_record)}
        if post is not None:
            row["post"] = strip(post["records"][i])
        records.append(row)
    entry["records"] = records
    return entry
