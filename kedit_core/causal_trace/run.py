"""Causal tracing over a file of facts: per-fact traces (resumable), the average indirect effects at the
subject's last token (ROME's Fig. 2) and a suggestion of the layers to edit.

For each fact the model predicts (the argmax after the prompt is the target's first token; the others
are skipped and counted), :func:`trace_fact` measures p(answer) clean, corrupted (the subject's token
embeddings plus Gaussian noise, ``samples`` draws) and with clean states restored in the corrupted run:
the hidden state of each (token, layer), and the MLP / attention outputs at each token over a window of
``window`` layers centred on each layer. The indirect effect of a state is
``p(answer | corrupted, restored) - p(answer | corrupted)``.

The noise's standard deviation is ``noise_multiple`` (3) times the standard deviation of the embedding
outputs at the subjects' tokens, measured over every fact given (ROME's ``collect_embedding_std``), unless
``noise`` gives it. Each fact's noise comes from its own generator, seeded by ``(seed, fact index)``, so
a resumed or partial run draws the same noise as a full one.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..atomic import write_bytes_atomic, write_json_atomic
from ..editing.positions import encode_prompts
from ..errors import KeditError
from ..text import encode_target
from .engine import KINDS, FactTracer, heatmap_cells, rome_forward_count
from .facts import TracedFact

__all__ = ["TraceSettings", "TRACE_TOKENS", "default_trace_tokens", "subject_embedding_std", "fact_noise",
           "trace_fact", "average_effects", "summarise", "suggest_layers", "run_trace", "MODES", "FACT_DIR",
           "HEATMAP_DIR", "SUMMARY_FILE", "CURVES_PNG"]

MODES = ("batched", "per_cell")
FACT_DIR, HEATMAP_DIR = "facts", "heatmaps"
SETTINGS_FILE, SUMMARY_FILE, CURVES_PNG = "settings.json", "trace.json", "average_effects.png"
# Where the average curves are read: the subject's last token (ROME's Fig. 2) and the prompt's last token.
POSITIONS = ("subject_last", "last")

# Computed (row x position) tokens per batched forward when none is given. Rows join a pack at their own
# block (engine.joining_rows), so a larger pack costs no extra block computations, only fewer forward
# passes; on CPU the larger matrices are slower per token (bench/results/trace/pack_budget_cpu.json: one
# SmolLM2 fact, 512 tokens 112 s / 71 forwards, 2048 tokens 124 s / 22 forwards), so CPU keeps 512.
TRACE_TOKENS = {"cpu": 512, "cuda": 8192}


def default_trace_tokens(device) -> int:
    """The pack budget :func:`trace_fact` uses on ``device`` when ``max_tokens`` is not set."""
    return TRACE_TOKENS.get(torch.device(device).type, 4096)


@dataclass(frozen=True)
class TraceSettings:
    """What a trace computes. ``noise`` is the absolute noise standard deviation (None: ``noise_multiple``
    × the measured subject-embedding std); ``suggest_size`` the number of consecutive layers suggested
    for editing; ``max_tokens`` the computed tokens per batched forward (None: the device's default)."""

    samples: int = 10
    noise: float | None = None
    noise_multiple: float = 3.0
    window: int = 10
    kinds: tuple[str, ...] = KINDS
    seed: int = 0
    suggest_size: int = 5
    mode: str = "batched"
    max_tokens: int | None = None

    def validate(self) -> "TraceSettings":
        if not isinstance(self.samples, int) or self.samples < 1:
            raise KeditError(f"samples: expected a positive number of noise samples; got {self.samples!r}")
        if self.noise is not None and not self.noise > 0:
            raise KeditError(f"noise: expected a positive standard deviation; got {self.noise!r}")
        if not self.noise_multiple > 0:
            raise KeditError(f"noise_multiple: expected a positive number; got {self.noise_multiple!r}")
        if not isinstance(self.window, int) or self.window < 1:
            raise KeditError(f"window: expected a positive number of layers; got {self.window!r}")
        kinds = tuple(self.kinds)
        if not kinds or any(k not in KINDS for k in kinds) or len(set(kinds)) != len(kinds):
            raise KeditError(f"kinds: expected distinct values among {', '.join(KINDS)}; got {list(kinds)}")
        if not isinstance(self.suggest_size, int) or self.suggest_size < 1:
            raise KeditError(f"suggest_size: expected a positive number of layers; got {self.suggest_size!r}")
        if self.mode not in MODES:
            raise KeditError(f"mode: expected one of {', '.join(MODES)}; got {self.mode!r}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise KeditError(f"max_tokens: expected a positive number of tokens; got {self.max_tokens!r}")
        return replace(self, kinds=kinds)


def _subject_positions(tokenizer, facts: Sequence[TracedFact]) -> list[tuple[list[int], int, int]]:
    """Each fact's token ids and its subject's first and last token index."""
    templates, subjects = [f.template for f in facts], [f.subject for f in facts]
    firsts = encode_prompts(tokenizer, templates, subjects, fact_token="subject_first")
    lasts = encode_prompts(tokenizer, templates, subjects, fact_token="subject_last")
    return [(a.ids, a.index, b.index) for a, b in zip(firsts, lasts)]


@torch.no_grad()
def subject_embedding_std(model, facts: Sequence[TracedFact]) -> float:
    """The standard deviation of the embedding layer's outputs over every subject token of ``facts``, as
    they appear in their prompts (one number over all tokens and dimensions)."""
    if not facts:
        raise KeditError("no facts to measure the subject embeddings on")
    ids = [i for ids, first, last in _subject_positions(model.tokenizer, facts) for i in ids[first:last + 1]]
    embedded = model.adapter.embedding(torch.tensor(ids, device=model.device))
    return float(embedded.double().std())


def fact_noise(seed: int, fact_index: int, samples: int, num_tokens: int, hidden_size: int,
               scale: float) -> torch.Tensor:
    """``[samples, num_tokens, hidden_size]`` Gaussian noise of standard deviation ``scale`` from a CPU
    generator seeded by ``(seed, fact_index)``."""
    state = np.random.SeedSequence([int(seed), int(fact_index)]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randn(samples, num_tokens, hidden_size, generator=generator, dtype=torch.float32) * scale


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def trace_fact(model, fact: TracedFact, settings: TraceSettings, noise_scale: float) -> dict:
    """Trace one fact; returns its record (see the module docstring). A fact the model does not predict
    gets ``status: "not_predicted"`` and no scores."""
    settings = settings.validate()
    started = time.perf_counter()
    tokenizer = model.tokenizer
    [(ids, first, last)] = _subject_positions(tokenizer, [fact])
    answer_id = encode_target(tokenizer, fact.target)[0]
    num_layers, num_tokens = model.adapter.num_layers, len(ids)
    noise = fact_noise(settings.seed, fact.index, settings.samples, last - first + 1, model.adapter.hidden_size,
                       noise_scale)
    max_tokens = settings.max_tokens or default_trace_tokens(model.device)
    tracer = FactTracer(model, ids, (first, last), answer_id, noise, max_tokens=max_tokens)
    p_clean, predicted = tracer.run_clean()
    record = {**fact.to_dict(), "prompt": fact.prompt,
              "tokens": [_token_text(tokenizer, i) for i in ids], "token_ids": list(ids),
              "subject_range": [first, last + 1], "answer": _token_text(tokenizer, answer_id), "answer_id": answer_id,
              "predicted": _token_text(tokenizer, predicted), "predicted_id": predicted, "p_clean": p_clean}
    if predicted != answer_id:
        record.update(status="not_predicted", forwards=tracer.forwards, seconds=time.perf_counter() - started)
        return record
    p_corrupted = tracer.run_corrupted()
    cells = {kind: heatmap_cells(kind, num_layers, range(num_tokens), settings.window) for kind in settings.kinds}
    if settings.mode == "batched":
        flat = [c for kind in settings.kinds for c in cells[kind]]
        probs = tracer.restored_probabilities(flat).view(len(settings.kinds), num_tokens, num_layers)
        scores = {kind: probs[i] for i, kind in enumerate(settings.kinds)}
    else:
        tracer.rome_overhead_forwards(len(settings.kinds))
        scores = {kind: tracer.restored_probabilities_per_cell(cells[kind]).view(num_tokens, num_layers)
                  for kind in settings.kinds}
    record.update(status="traced", p_corrupted=p_corrupted,
                  scores={kind: [[round(float(v), 7) for v in row] for row in scores[kind].tolist()]
                          for kind in settings.kinds},
                  forwards=tracer.forwards,
                  rome_forwards=rome_forward_count(num_tokens, num_layers, len(settings.kinds)),
                  seconds=time.perf_counter() - started)
    return record


def _position(record: dict, where: str) -> int:
    return record["subject_range"][1] - 1 if where == "subject_last" else len(record["tokens"]) - 1


def average_effects(records: Sequence[dict], kinds: Sequence[str]) -> dict:
    """The average indirect effect per layer, over the traced records, at the subject's last token and
    at the prompt's last token: ``{position: {kind: [one value per layer]}}``."""
    traced = [r for r in records if r.get("status") == "traced"]
    out: dict = {}
    for where in POSITIONS:
        out[where] = {}
        for kind in kinds:
            if not traced:
                out[where][kind] = []
                continue
            rows = np.array([np.asarray(r["scores"][kind][_position(r, where)]) - r["p_corrupted"] for r in traced])
            out[where][kind] = [float(v) for v in rows.mean(axis=0)]
    return out


def suggest_layers(curve: Sequence[float], size: int) -> list[int]:
    """The ``size`` consecutive layers with the highest total of ``curve`` (ties: the lowest layers)."""
    values = np.asarray(curve, dtype=np.float64)
    if values.size == 0:
        return []
    size = min(size, values.size)
    totals = np.convolve(values, np.ones(size), mode="valid")
    start = int(np.argmax(totals))
    return list(range(start, start + size))


def _fact_path(out: Path, fact: TracedFact) -> Path:
    return out / FACT_DIR / f"{fact.index:05d}.json"


def _heatmap_path(out: Path, record: dict) -> Path:
    return out / HEATMAP_DIR / f"{record['index']:05d}.png"


def _read_record(path: Path) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("status") in ("traced", "not_predicted") else None


def _identity(settings: TraceSettings, identity: dict) -> dict:
    """What a resumed run must share with the finished facts (the batch size changes only the speed)."""
    data = asdict(settings)
    data.pop("max_tokens")
    data["kinds"] = list(data["kinds"])
    return {**identity, "settings": data}


def _same_settings(a, b) -> bool:
    """Equal, floats to 1e-9 relative: the measured noise scale's last bits change with the number of
    threads summing it, which must not stop a run from resuming on another machine."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_settings(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_settings(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _check_resume(out: Path, expected: dict, fresh: bool) -> None:
    path = out / SETTINGS_FILE
    if fresh:
        for sub in (FACT_DIR, HEATMAP_DIR):
            shutil.rmtree(out / sub, ignore_errors=True)
    elif path.exists():
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            found = None
        expected_json = json.loads(json.dumps(expected, default=str))
        if not _same_settings(found, expected_json):
            differing = sorted(k for k in set(expected_json) | set(found or {})
                               if not _same_settings((found or {}).get(k), expected_json.get(k)))
            raise KeditError(f"{out} holds a trace made with other settings ({', '.join(differing) or 'unreadable'} "
                             f"differ; see {path}): pass --fresh to replace it, or choose another --out")
    write_json_atomic(path, expected)


def run_trace(model, facts: Sequence[TracedFact], settings: TraceSettings, out_dir: str | Path | None = None, *,
              limit: int | None = None, noise_facts: Sequence[TracedFact] | None = None, resume: bool = True,
              heatmaps: bool = True, progress: bool = True, identity: dict | None = None,
              metadata: dict | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Trace ``facts`` in order until ``limit`` of them are traced (default: all), skipping and counting
    those the model does not predict. With ``out_dir`` every fact's record is written atomically as soon
    as it is done (``facts/NNNNN.json``, its heatmaps ``heatmaps/NNNNN.png``) and a rerun skips the
    finished facts; the summary goes to ``trace.json`` and the curves to ``average_effects.png``.

    ``noise_facts`` are the facts whose subjects set the noise level (default: ``facts``). ``identity``
    (model fingerprint, data hash...) must match for a rerun to reuse finished facts; ``metadata`` (the
    command...) is only recorded in the summary. Returns the summary.
    """
    from tqdm.auto import tqdm

    from .report import plot_average_effects, plot_fact

    settings = settings.validate()
    say = log or (lambda message: None)
    if limit is not None and limit < 1:
        raise KeditError(f"limit: expected a positive number of facts; got {limit}")
    measured_std = subject_embedding_std(model, list(noise_facts or facts))
    noise_scale = settings.noise if settings.noise is not None else settings.noise_multiple * measured_std
    out = Path(out_dir) if out_dir is not None else None
    identity = dict(identity or {})
    if out is not None:
        _check_resume(out, _identity(settings, {**identity, "noise_scale": noise_scale}), fresh=not resume)

    records: list[dict] = []
    traced = skipped = resumed = 0
    total = limit if limit is not None else len(facts)
    bar = tqdm(total=total, desc="causal trace", unit="fact", disable=not progress, dynamic_ncols=True)
    try:
        for fact in facts:
            if limit is not None and traced >= limit:
                break
            record = _read_record(_fact_path(out, fact)) if out is not None else None
            if record is not None:
                resumed += 1
            else:
                record = trace_fact(model, fact, settings, noise_scale)
                if out is not None:
                    write_json_atomic(_fact_path(out, fact), record, indent=None)
            if record["status"] == "traced":
                traced += 1
                if out is not None and heatmaps and not _heatmap_path(out, record).exists():
                    write_bytes_atomic(_heatmap_path(out, record),
                                       plot_fact(record, window=settings.window, model_name=_model_name(identity)))
            else:
                skipped += 1
            records.append(record)
            if limit is None or record["status"] == "traced":
                bar.update(1)
            bar.set_postfix(traced=traced, not_predicted=skipped, refresh=False)
    finally:
        bar.close()
    if resumed:
        say(f"reused {resumed} finished fact(s) from {out / FACT_DIR}")

    summary = summarise(records, settings, noise_scale=noise_scale, measured_std=measured_std,
                        num_layers=model.adapter.num_layers, identity=identity, limit=limit,
                        facts_available=len(facts))
    summary.update(metadata or {})
    if out is not None:
        write_json_atomic(out / SUMMARY_FILE, summary)
        if traced:
            write_bytes_atomic(out / CURVES_PNG, plot_average_effects(summary))
    return summary


def _model_name(identity: dict) -> str:
    source = str((identity.get("model") or {}).get("source") or "model")
    return Path(source).name or source


def summarise(records: Sequence[dict], settings: TraceSettings, *, noise_scale: float, measured_std: float,
              num_layers: int, identity: dict | None = None, limit: int | None = None,
              facts_available: int | None = None) -> dict:
    """The summary of a run: counts, forward passes against ROME's loop, average effects, suggestion."""
    traced = [r for r in records if r["status"] == "traced"]
    skipped = [r for r in records if r["status"] == "not_predicted"]
    effects = average_effects(traced, settings.kinds)
    forwards = sum(r["forwards"] for r in records)
    forwards_traced = sum(r["forwards"] for r in traced)
    rome = sum(r["rome_forwards"] for r in traced)
    summary = {
        **(identity or {}),
        "settings": {**asdict(settings), "kinds": list(settings.kinds),
                     "max_tokens": settings.max_tokens, "noise_scale": noise_scale,
                     "subject_embedding_std": measured_std,
                     "noise_rule": ("given (--noise)" if settings.noise is not None else
                                    f"{settings.noise_multiple} x the std of the embedding outputs at the subject "
                                    "tokens of every fact in the file"),
                     "noise_seeding": "torch.randn on a CPU generator seeded by numpy SeedSequence([seed, fact "
                                      "index]); the same samples for every cell of a fact",
                     "window_rule": "MLP/attention cells restore layers center - window//2 .. "
                                    "center + ceil(window/2) - 1 (ROME)"},
        "counts": {"facts_in_file": facts_available, "facts_examined": len(records), "traced": len(traced),
                   "not_predicted": len(skipped), "limit": limit,
                   "not_predicted_ids": [r.get("fact_id", r["index"]) for r in skipped]},
        "forward_passes": {"total": forwards, "traced_facts": forwards_traced,
                           "skipped_facts": forwards - forwards_traced,
                           "rome_loop_traced_facts": rome,
                           "rome_over_ours": (rome / forwards_traced) if forwards_traced else None,
                           "rome_loop_rule": "per traced fact and kind: T x L cells + a prediction + a corrupted "
                                             "baseline (experiments/causal_trace.py calculate_hidden_flow)"},
        "seconds": {"total": sum(r.get("seconds", 0.0) for r in records),
                    "traced_facts": sum(r.get("seconds", 0.0) for r in traced)},
        "num_layers": num_layers,
        "mean_p_clean": float(np.mean([r["p_clean"] for r in traced])) if traced else None,
        "mean_p_corrupted": float(np.mean([r["p_corrupted"] for r in traced])) if traced else None,
        "average_indirect_effect": effects,
    }
    if traced and "mlp" in settings.kinds:
        curve = effects["subject_last"]["mlp"]
        layers = suggest_layers(curve, settings.suggest_size)
        peak = int(np.argmax(curve))
        summary["suggestion"] = {
            "layers": layers,
            "rule": f"the {len(layers)} consecutive layers with the highest average MLP indirect effect at the "
                    f"subject's last token (the curve is indexed by the centre of each {settings.window}-layer "
                    "restored window)",
            "mean_effect": float(np.mean([curve[i] for i in layers])),
            "peak_layer": peak, "peak_effect": float(curve[peak]),
            "memit": {"layers": layers}, "rome": {"layers": [peak]},
        }
    return summary
