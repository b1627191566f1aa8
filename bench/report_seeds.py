"""Report: the three seed papers' experiments on a real model (issue 16): Zhu et al.'s constrained
fine-tuning, MEMIT's scaling comparison, F-Learning's forget-then-learn.

    python bench/report_seeds.py                          # SmolLM2-135M at the default sizes (about an hour on 2 cores)
    python bench/report_seeds.py --full                   # the committed report's sizes (about 8 hours; resumable)
    python bench/report_seeds.py --quick                  # the same tables, tiny sizes (the slow test)
    python bench/report_seeds.py --model gemma3-270m --editors alphaedit --set memit.layers=[4,5,6,7,8]

Every edit is ``kedit_core.compute_edit`` with a registered editor (by name), applied, measured with
``kedit_core.evaluation`` and reverted; the report code only chooses requests, fact sets and settings.

1. **Zhu et al. 2020** (``zhu``). M = the first |M| CounterFact records (``--zhu-sizes``: 32 by default, 32/128/512 with ``--full``), each
   rewritten to its ``target_new``; F\\S = facts the unedited model gets right (all target tokens are its
   argmax, i.e. its greedy answer) among ``known_1000.json`` and the CounterFact records' neighbourhood
   prompts, with any prompt that names a subject of M left out; a seeded split keeps ``--zhu-mix-pool`` of
   them for FT-Mix to train on and evaluates ``--zhu-unmodified`` others. Runs: FT of every block, FT-Mix of
   every block, FT-L (ℓ∞ ball) of one block over a δ sweep at ``--zhu-layer``, then FT and FT-L of each block
   in ``--zhu-layers``. ``A_M``, ``A_{F\\S}``, ``Ā`` (:class:`kedit_core.evaluation.FactProbe`), with the
   paper's BERT numbers beside them. The headline δ is the sweep's best Ā at the smallest |M| (ties: the
   smaller δ), Zhu et al.'s own rule for choosing settings.
2. **MEMIT** (``memit``, Fig. 5 / Tables 1-2 of Meng et al. 2023). The first n CounterFact and zsRE records
   for each n of ``--cf-sizes`` / ``--zsre-sizes``, edited at once by FT-W (``ft`` on one block at 78% of the
   depth, GPT-J's layer 21 of 28, with the reference's weight-decay power law in n), FT-L (``ft-l`` with the
   editor's defaults), ROME (sequential; up to ``--rome-max-edits``), MEMIT, EMMET, AlphaEdit when installed,
   and any ``--editors``. ES/PS/NS/Score, GE on the first ``--ge-records`` edited records, rewrite/paraphrase
   accuracy (CounterFact); efficacy/paraphrase/specificity (zsRE), via ``evaluate_cases``/``aggregate``.
   GE is measured at the largest CounterFact size only: on CPU each prompt length costs 100 sequential
   decoding steps (~10-20 s for SmolLM2), more than scoring all the other metrics of 100 records.
   MEMIT-family values are kept in a shared ``work_dir`` with ``value_batch_size`` = the smallest size, so
   the values of the first n requests are computed once for all sizes and all editors with the same
   settings (the value-store key is everything a value depends on; nothing else is shared).
3. **F-Learning** (``flearning``, Ni et al.). For ``--fl-records`` CounterFact and zsRE records (zsRE: old =
   ``answers[0]``, new = ``alt``): stage 0 teaches the base model the old facts (``ft`` of every block on
   ``target_true``, ``--fl-stage0-epochs`` passes, as the paper does); on that model: full FT, LoRA (F-Learning
   with no forget step), FT-c (``ft-l``), F-Learning full/LoRA forget × full/LoRA learn (the forget step trains
   the old facts for the stage-0 epochs at ``--fl-stage0-lr`` when full, ``--fl-lora-lr`` when LoRA), ROME, MEMIT (and
   ``--editors``). Reliability, generality, locality (the evaluation module's definitions, measured against
   the stage-0 model) and the old facts' accuracy; seconds per method.
4. **Findings**: each seed finding with "reproduces / does not reproduce on <model>" and the numbers.

Settings: every editor starts from its shipped defaults for the model (``kedit_core.resolve_hparams``); the
report sets what the experiment defines (layers, module, δ, epochs; listed per run); ``--set EDITOR.KEY=VALUE``
or ``--set RUN_ID.KEY=VALUE`` (run ids: ``zhu-ft``, ``ft-w``, ``fl-lora``, ... see ``--list-runs``) override the
rest. Every run's resolved hyper-parameters, seed, seconds and load average are written with its metrics.

Resuming: each finished run is kept under ``OUT/runs/`` keyed by everything it depends on (model
fingerprint, requests, resolved hyper-parameters, what it measures, seed); a rerun skips it.

Outputs (``--out``, default ``bench/results/seeds/<model>``, ``<model>-full`` with ``--full``, ``<model>-quick``
with ``--quick``): ``seeds_report.md`` (tables, findings),
``seeds_report.json`` (everything), ``zhu.csv``, ``memit.csv``, ``flearning.csv``, and ``zhu_methods.png``,
``zhu_layers.png``, ``zhu_delta.png``, ``memit_counterfact.png``, ``memit_zsre.png``, ``flearning.png``.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import platform
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

import kedit_core as kedit
from kedit_core import EditContext
from kedit_core.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic
from kedit_core.deltas import Deltas
from kedit_core.editors import get_editor, list_editors, resolve_hparams
from kedit_core.errors import KeditError
from kedit_core.evaluation import (EvalSettings, Fact, FactProbe, GenerationSettings, accuracy, aggregate,
                                   counterfact_generation, evaluate_cases, load_cases, locality, predict_facts)
from kedit_core.evaluation.aggregate import mean
from kedit_core.evaluation.datasets import CounterFactCase, ZsreCase
from kedit_core.hparams import parse_assignments
from kedit_core.requests import read_records, requests_sha256
from kedit_core.stats import CachedCovariance
from kedit_core.zoo import kedit_cache_dir

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

SHARED_DATA = REPO.parent / "shared" / "data"
DATA = SHARED_DATA if SHARED_DATA.is_dir() else REPO / "tests" / "fixtures" / "data"  # byte-identical copies
CACHE_FORMAT = 1  # bump when what a cached run holds changes meaning

# Published numbers held beside ours (not targets: other models, other data).
ZHU_BERT = {  # Zhu et al. 2020, BERT-Base on T-REx, 32 modified facts: (A_M, A_F\S)
    "ft": (75.00, 0.30), "ft-l": (71.25, 46.47), "ft-mix": (73.31, 18.51)}
MEMIT_GPTJ = {  # Meng et al. 2023, MEMIT on GPT-J at 10,000 edits (docs/ALGORITHMS.md §9)
    "counterfact": {"ES": 98.9, "PS": 88.6, "NS": 73.7, "GE": 619.9, "Score": 85.8},
    "zsre": {"efficacy": 96.7, "paraphrase": 89.7, "specificity": 26.6}}
FTW_WD_POWER_LAW = (-0.87028798, 0.15589562)  # kmeng01/memit hparams/FT/EleutherAI_gpt-j-6B_wd.json: n^a · e^b

CF_METRICS = ("ES", "PS", "NS", "Score", "GE", "rewrite_acc", "paraphrase_acc", "neighborhood_acc")
ZSRE_METRICS = ("efficacy", "paraphrase", "specificity")


# --------------------------------------------------------------------------------------------------
# Sizes: the default run and --quick

FULL = dict(zhu_sizes="32,128,512", zhu_layers="spread:4", zhu_layer=0, zhu_deltas="1e-4,3e-4,1e-3,3e-3",
            zhu_unmodified=300, zhu_mix_pool=100, zhu_neighbours=5, zhu_known=None, zhu_lr=5e-4, zhu_passes=10,
            zhu_ft_layers_at="32,128", cf_sizes="10,30,100", zsre_sizes="10,30,100", rome_max_edits=10,
            ge_records=5, ge_prompts=1, fl_records=16, fl_neighbours=3, fl_lr=1e-4, fl_lora_lr=1e-3,
            fl_passes=10, fl_batch=8, fl_stage0_epochs=3, fl_stage0_lr=1e-4, c0_tokens=100_000)
# The default: the same experiments at the sizes that fit about an hour on 2 cores (one |M|, two edit counts).
DEFAULT = dict(FULL, zhu_sizes="32", zhu_ft_layers_at="32", cf_sizes="10,30", zsre_sizes="10,30")
# --quick keeps every table and plot of the full run at the smallest sizes that still give each one a
# row (two sizes per plot line), so the slow test checks the whole pipeline in minutes.
QUICK = dict(FULL, zhu_sizes="16", zhu_layers="0,last", zhu_deltas="1e-3", zhu_unmodified=100, zhu_mix_pool=16,
             zhu_known=300, zhu_neighbours=1, zhu_passes=5, zhu_ft_layers_at="16", cf_sizes="1,2", zsre_sizes="1,2",
             rome_max_edits=1, ge_records=1, ge_prompts=1, fl_records=2, fl_neighbours=2, fl_passes=5,
             fl_batch=4, c0_tokens=20_000)


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{what}: expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise SystemExit(f"{what}: sizes must be >= 1, got {text!r}")
    return sorted(set(values))


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{what}: expected comma-separated numbers, got {text!r}") from None


def layer_list(spec: str, num_layers: int, what: str) -> list[int]:
    """``spread:K`` (K layers evenly from the first to the last), ``all``, or a list with ``last``."""
    if spec.startswith("spread:"):
        k = max(1, int(spec.split(":", 1)[1]))
        layers = sorted({round(i * (num_layers - 1) / max(k - 1, 1)) for i in range(k)})
    elif spec == "all":
        layers = list(range(num_layers))
    else:
        layers = sorted({num_layers - 1 if x.strip() == "last" else int(x) for x in spec.split(",") if x.strip()})
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise SystemExit(f"{what}: layer(s) {bad} out of range 0..{num_layers - 1}")
    return layers


# --------------------------------------------------------------------------------------------------
# Runs: one edit, computed by a registered editor, applied, measured, reverted; cached on disk

@dataclass(frozen=True)
class MethodSpec:
    """One method of a comparison. ``settings``: what the report chooses (``--set`` overrides them);
    ``fixed``: what the experiment varies (a layer, δ; wins over ``--set``); ``options``: EditContext
    options (FT-Mix's unmodified facts)."""

    run_id: str
    label: str
    editor: str
    settings: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)
    options: dict = field(default_factory=dict)
    max_edits: int | None = None     # larger edit counts are skipped (cost), with the reason recorded


def digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def facts_digest(facts: Sequence[Fact]) -> str:
    return digest([[f.prompt, f.target] for f in facts])


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def describe_options(options: dict) -> dict:
    """Options as recorded: fact lists by count and hash."""
    out = {}
    for key, value in options.items():
        if isinstance(value, (list, tuple)):
            out[key] = {"count": len(value), "sha256": digest([list(v) if isinstance(v, tuple) else v for v in value])}
        else:
            out[key] = value
    return out


class Runner:
    """Runs specs on the model as it is now and caches each finished run under ``OUT/runs/<part>/``."""

    def __init__(self, model, out: Path, *, seed: int, stats, user_sets: dict[str, list[str]], started: float,
                 work_dir: Path):
        self.model, self.seed, self.stats, self.started = model, seed, stats, started
        self.cache_dir = out / "runs"
        self.work_dir = work_dir
        self.user_sets = user_sets
        self.fingerprint = model.fingerprint()

    def refresh_fingerprint(self) -> None:
        """Call after changing the model's weights (F-Learning's stage 0)."""
        self.fingerprint = self.model.fingerprint()

    def overrides(self, spec: MethodSpec) -> dict:
        editor_cls = get_editor(spec.editor)
        user: dict = {}
        for scope in (spec.editor, spec.run_id):   # an editor's flags, then the run's own
            if scope in self.user_sets:
                user.update(parse_assignments(editor_cls.HParams, self.user_sets[scope]))
        return {**spec.settings, **user, **spec.fixed}

    def resolve(self, spec: MethodSpec):
        return resolve_hparams(get_editor(spec.editor), self.model, None, **self.overrides(spec))

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def run(self, part: str, spec: MethodSpec, requests, measure: "Measure", tags: dict) -> dict:
        hp = self.resolve(spec)
        key = digest({"format": CACHE_FORMAT, "part": part, "editor": spec.editor, "hparams": hp.to_dict(),
                      "options": describe_options(spec.options), "requests": requests_sha256(requests),
                      "model": self.fingerprint, "measure": measure.identity, "seed": self.seed})
        # Named by the key alone: the same edit listed in two tables (a δ of the sweep that is also the
        # headline run) is computed once.
        path = self.cache_dir / part / f"{slug(spec.run_id)}-{key[:20]}.json"
        if path.exists():
            try:
                cached = json.loads(path.read_text(encoding="utf-8"))
                if cached.get("key") == key:
                    return dict(cached["row"], label=spec.label, tags=tags, cached=True)
            except (OSError, ValueError):
                pass  # unreadable: recompute
        load_before = os.getloadavg()
        context = EditContext(seed=self.seed, progress=False, stats=self.stats, options=dict(spec.options),
                              work_dir=self.work_dir if "value_batch_size" in hp.to_dict() else None)
        start = time.perf_counter()
        result = kedit.compute_edit(self.model, requests, spec.editor, hp, context=context)
        edit_seconds = time.perf_counter() - start
        start = time.perf_counter()
        with result.deltas.apply(self.model.model):
            metrics = measure(self.model)
        stage1 = None
        if "forget_deltas" in result.info:  # F-Learning after forgetting, before learning
            with result.info["forget_deltas"].apply(self.model.model, check_fingerprint=False):
                stage1 = measure(self.model)
        measure_seconds = time.perf_counter() - start
        if self.model.fingerprint() != self.fingerprint:
            raise KeditError(f"{spec.label}: the model's weights changed after reverting the edit (a bug)")
        extra = result.deltas.extra
        row = {"part": part, "run_id": spec.run_id, "label": spec.label, "editor": spec.editor, "tags": tags,
               "hparams": hp.to_dict(), "report_settings": spec.settings, "experiment_settings": spec.fixed,
               "options": describe_options(spec.options), "seed": self.seed, "num_requests": len(requests),
               "metrics": metrics, "stage1": stage1,
               "train": extra.get("stages"), "max_abs_change": extra.get("max_abs_change"),
               "value_steps_mean": mean(result.info.get("value_steps") or []),
               "seconds": {"edit": edit_seconds, "measure": measure_seconds,
                           "phases": {k: float(v) for k, v in result.timings.items()}},
               "load_average": {"before": load_before, "after": os.getloadavg()},
               "threads": torch.get_num_threads()}
        write_json_atomic(path, {"key": key, "row": row}, indent=1)
        tqdm.write(f"[{self.elapsed():7.1f}s] {part} {spec.label} {tags}: "
                   + "  ".join(f"{k} {v:.1f}" for k, v in metrics.items() if isinstance(v, float) and k in SHOWN)
                   + f"  (edit {edit_seconds:.1f}s)")
        return dict(row, cached=False)


SHOWN = {"A_M", "A_F_minus_S", "A_bar", "ES", "PS", "NS", "Score", "efficacy", "specificity", "reliability",
         "generality", "locality"}


class Measure:
    """What a run measures on the edited model: ``identity`` keys the cache, ``__call__`` the metrics."""

    identity: str

    def __call__(self, model) -> dict:
        raise NotImplementedError


class ZhuMeasure(Measure):
    """A_M, A_{F\\S}, Ā (and locality on F\\S) around an edit."""

    def __init__(self, model, modified: list[Fact], unmodified: list[Fact], max_tokens: int | None):
        self.probe = FactProbe(model, modified=modified, unmodified=unmodified, max_tokens=max_tokens)
        self.identity = digest({"zhu": 1, "modified": facts_digest(modified), "unmodified": facts_digest(unmodified)})

    def __call__(self, model) -> dict:
        post = self.probe.measure(model)["post"]
        return {k: post[k] for k in ("A_M", "A_F_minus_S", "A_bar", "locality")}


class CaseMeasure(Measure):
    """CounterFact or zsRE metrics of the edited records (``evaluate_cases`` → ``aggregate``), with GE
    from the generation prompts of the first ``ge_cases``."""

    def __init__(self, fmt: str, cases: list, ge_cases: list, settings: EvalSettings,
                 generation: GenerationSettings):
        self.fmt, self.cases, self.ge_cases, self.settings, self.generation = fmt, cases, ge_cases, settings, generation
        self.identity = digest({"cases": 1, "fmt": fmt, "ids": [c.case_id for c in cases],
                                "requests": requests_sha256([c.request for c in cases]),
                                "ge": [[c.case_id, list(c.generation_prompts)] for c in ge_cases]
                                if fmt == "counterfact" else [], "settings": settings.to_dict()})

    def __call__(self, model) -> dict:
        records = evaluate_cases(model, self.cases, self.fmt, self.settings)
        agg = aggregate(records, self.fmt)
        keys = CF_METRICS if self.fmt == "counterfact" else ZSRE_METRICS
        out = {k: agg.get(k) for k in keys}
        if self.fmt == "counterfact" and self.ge_cases:
            gens = counterfact_generation(model.model, model.tokenizer, self.ge_cases, self.generation)
            out["GE"] = mean(g["metrics"]["GE"] for g in gens)
            out["GE_records"] = len(self.ge_cases)
        return out


class FLearningMeasure(Measure):
    """Ni et al.'s reliability, generality and locality against the model the probe was built on (the
    stage-0 model), plus the old facts' accuracy (does the model still give the old answer?)."""

    def __init__(self, model, new: list[Fact], paraphrases: list[Fact], unrelated: list[Fact], old: list[Fact],
                 max_tokens: int | None, base_key: str):
        self.probe = FactProbe(model, modified=new, paraphrases=paraphrases, unrelated=unrelated,
                               max_tokens=max_tokens)
        self.old, self.max_tokens = old, max_tokens
        self.identity = digest({"flearning": 1, "new": facts_digest(new), "para": facts_digest(paraphrases),
                                "unrelated": facts_digest(unrelated), "old": facts_digest(old), "base": base_key})

    def __call__(self, model) -> dict:
        post = self.probe.measure(model)["post"]
        out = {k: post[k] for k in ("reliability", "generality", "locality", "locality_token_agreement")}
        out["A_old"] = accuracy(predict_facts(model, self.old, max_tokens=self.max_tokens))
        return out


# --------------------------------------------------------------------------------------------------
# Part 1: Zhu et al.

def zhu_fact_pool(model, cases: list[CounterFactCase], known: list[dict], args, cache: Path,
                  say) -> dict:
    """F\\S candidates (known_1000 facts and neighbourhood prompts naming no edited subject), scored once
    on the unedited model; the correct ones, split by a seeded shuffle into FT-Mix's pool and the
    evaluated set."""
    edited_subjects = {c.request.subject for c in cases}

    def names_edited(prompt: str) -> bool:
        return any(s in prompt for s in edited_subjects)

    candidates, sources, seen = [], [], set()
    for item in known[:args.zhu_known] if args.zhu_known else known:
        fact = Fact(item["prompt"], " " + item["attribute"].strip())
        if item["subject"] not in edited_subjects and not names_edited(fact.prompt) and fact.prompt not in seen:
            candidates.append(fact)
            sources.append("known_1000")
            seen.add(fact.prompt)
    for case in cases:
        for prompt in case.neighborhood_prompts[:args.zhu_neighbours]:
            if not names_edited(prompt) and prompt not in seen:
                candidates.append(Fact(prompt, case.request.target_true))
                sources.append("neighbourhood")
                seen.add(prompt)
    key = digest({"model": model.fingerprint(), "candidates": facts_digest(candidates)})
    path = cache / f"zhu-candidates-{key[:16]}.json"
    correct = None
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            correct = data["correct"] if data.get("key") == key else None
        except (OSError, ValueError, KeyError):
            correct = None
    if correct is None:
        say(f"zhu: scoring {len(candidates)} candidate unmodified facts on the unedited model")
        scores = predict_facts(model, candidates, max_tokens=args.score_tokens, progress=True)
        correct = [bool(s.correct) for s in scores]
        write_json_atomic(path, {"key": key, "correct": correct}, indent=None)
    kept = [(f, src) for f, src, ok in zip(candidates, sources, correct) if ok]
    rng = random.Random(f"kedit-report-seeds-zhu-{args.seed}")
    rng.shuffle(kept)
    pool = kept[:args.zhu_mix_pool]
    evaluated = kept[args.zhu_mix_pool:args.zhu_mix_pool + args.zhu_unmodified]
    if not evaluated:
        raise KeditError(f"zhu: the model gets only {len(kept)} of {len(candidates)} candidate facts right; none "
                         f"is left to evaluate after FT-Mix's pool of {args.zhu_mix_pool} (lower --zhu-mix-pool)")
    by_source = {}
    for name in ("known_1000", "neighbourhood"):
        total = sum(s == name for s in sources)
        right = sum(s == name for _, s in kept)
        by_source[name] = {"candidates": total, "correct": right,
                           "evaluated": sum(s == name for _, s in evaluated), "in_mix_pool": sum(s == name for _, s in pool)}
    return {"pool": [f for f, _ in pool], "evaluated": [f for f, _ in evaluated],
            "describe": {"candidates": len(candidates), "correct": len(kept), "by_source": by_source,
                         "mix_pool": len(pool), "evaluated": len(evaluated),
                         "split_seed": f"random.Random('kedit-report-seeds-zhu-{args.seed}')",
                         "evaluated_sha256": facts_digest([f for f, _ in evaluated]),
                         "examples": [[f.prompt, f.target] for f, _ in evaluated[:5]]}}


def best_delta(rows: Sequence[dict]) -> float:
    """The δ with the best Ā (ties: the smaller δ)."""
    best = max(rows, key=lambda r: (r["metrics"]["A_bar"], -r["hparams"]["norm_constraint"]))
    return best["hparams"]["norm_constraint"]


def part_zhu(runner: Runner, args, say) -> dict:
    model = runner.model
    sizes = _ints(args.zhu_sizes, "--zhu-sizes")
    num_layers = model.adapter.num_layers
    layers = layer_list(args.zhu_layers, num_layers, "--zhu-layers")
    if not 0 <= args.zhu_layer < num_layers:
        raise SystemExit(f"--zhu-layer {args.zhu_layer}: the model has layers 0..{num_layers - 1}")
    layers = sorted(set(layers) | {args.zhu_layer})  # the comparison layer is always in the layer table
    ft_layer_sizes = set(_ints(args.zhu_ft_layers_at, "--zhu-ft-layers-at")) if args.zhu_ft_layers_at else set()
    deltas = _floats(args.zhu_deltas, "--zhu-deltas")
    records = read_records(args.counterfact)
    if max(sizes) > len(records):
        raise SystemExit(f"--zhu-sizes: {max(sizes)} modified facts asked, {args.counterfact} has {len(records)}")
    _, cases = load_cases(args.counterfact, limit=max(sizes))
    known = json.loads(Path(args.known).read_text(encoding="utf-8"))
    facts = zhu_fact_pool(model, cases, known, args, runner.cache_dir, say)
    pool = [(f.prompt, f.target) for f in facts["pool"]]
    train = {"lr": args.zhu_lr, "num_steps": args.zhu_passes, "batch_size": 64, "early_stop_loss": 1e-2}
    every_block = {"layers": None, "module": "block"}

    def one_block(layer: int) -> dict:
        return {"layers": [layer], "module": "block"}

    rows: list[dict] = []
    chosen = None
    bar = tqdm(total=len(sizes), desc="zhu sizes", unit="size")
    for size in sizes:
        requests = [c.request for c in cases[:size]]
        modified = [Fact.from_request(r) for r in requests]
        measure = ZhuMeasure(model, modified, facts["evaluated"], args.score_tokens)
        pre = measure.probe.measure(model)["pre"]
        rows.append({"part": "zhu", "run_id": "unedited", "label": "unedited", "editor": None,
                     "tags": {"size": size}, "metrics": {k: pre[k] for k in ("A_M", "A_F_minus_S", "A_bar")},
                     "hparams": {}, "seconds": {"edit": 0.0, "measure": 0.0}})

        def run(spec: MethodSpec, **tags) -> dict:
            row = runner.run("zhu", spec, requests, measure, {"size": size, **tags})
            rows.append(row)
            return row

        if chosen is None:  # δ sweep at the smallest |M|
            sweep = [run(MethodSpec("zhu-ft-l", f"FT-L L{args.zhu_layer} δ={d:g}", "ft-l", train,
                                    {**one_block(args.zhu_layer), "norm_constraint": d}), group="delta_sweep")
                     for d in deltas]
            chosen = best_delta(sweep)
        run(MethodSpec("zhu-ft", "FT (all blocks)", "ft", train, every_block), group="methods")
        run(MethodSpec("zhu-ft-mix", "FT-Mix (all blocks)", "ft-mix", {**train, "mix_ratio": 1.0}, every_block,
                       options={"unmodified_facts": pool}), group="methods")
        for layer in layers:
            run(MethodSpec("zhu-ft-l", f"FT-L L{layer}", "ft-l", train, {**one_block(layer), "norm_constraint": chosen}),
                group="layers", layer=layer)
            if size in ft_layer_sizes:
                run(MethodSpec("zhu-ft", f"FT L{layer}", "ft", train, one_block(layer)), group="layers", layer=layer)
        bar.update(1)
    bar.close()
    return {"facts": facts["describe"], "sizes": sizes, "layers": layers, "ft_layer_sizes": sorted(ft_layer_sizes),
            "deltas": deltas, "delta_choice": {"rule": "best Ā of the δ sweep at the smallest |M| (ties: smaller δ)",
                                               "layer": args.zhu_layer, "delta": chosen},
            "train": train, "rows": rows}


# --------------------------------------------------------------------------------------------------
# Part 2: MEMIT's comparison

def ftw_layer(num_layers: int) -> int:
    """FT-W's block at GPT-J's relative depth (layer 21 of 0..27)."""
    return round(21 / 27 * (num_layers - 1))


def ftw_weight_decay(num_edits: int) -> float:
    a, b = FTW_WD_POWER_LAW
    return num_edits ** a * math.exp(b)


def memit_specs(model, extra_editors: Sequence[str], value_batch: int, rome_max: int) -> list[MethodSpec]:
    installed = list_editors()
    specs = [MethodSpec("ft-w", "FT-W", "ft", {"layers": [ftw_layer(model.adapter.num_layers)], "module": "block",
                                                "lr": 5e-4, "num_steps": 25}),
             MethodSpec("ft-l", "FT-L", "ft-l"),
             MethodSpec("rome", "ROME", "rome", max_edits=rome_max)]
    names = ["memit", "emmet"] + (["alphaedit"] if "alphaedit" in installed else [])
    names += [n for n in extra_editors if n not in names and n not in ("rome", "ft", "ft-l")]
    for name in names:
        if name not in installed:
            raise SystemExit(f"--editors: no editor named {name!r}; installed: {', '.join(installed)}")
        fields = get_editor(name).HParams.field_names()
        settings = {"value_batch_size": value_batch} if "value_batch_size" in fields else {}
        label = {"memit": "MEMIT", "emmet": "EMMET", "alphaedit": "AlphaEdit"}.get(name, name)
        specs.append(MethodSpec(name, label, name, settings))
    return specs


def trimmed_generation(case: CounterFactCase, prompts: int) -> CounterFactCase:
    return dataclasses.replace(case, generation_prompts=case.generation_prompts[:prompts])


def part_memit(runner: Runner, args, say) -> dict:
    model = runner.model
    datasets = [("counterfact", args.counterfact, _ints(args.cf_sizes, "--cf-sizes")),
                ("zsre", args.zsre, _ints(args.zsre_sizes, "--zsre-sizes"))]
    value_batch = min(min(s) for _, _, s in datasets)
    specs = memit_specs(model, args.editors, value_batch, args.rome_max_edits)
    settings = EvalSettings(max_tokens=args.score_tokens, generation=False, progress=False)
    generation = GenerationSettings(seed=args.seed)
    rows, unedited, skipped = [], {}, []
    total = sum(len(sizes) for _, _, sizes in datasets) * len(specs)
    bar = tqdm(total=total, desc="memit comparison", unit="run")
    for dataset, path, sizes in datasets:
        fmt, cases = load_cases(path, limit=max(sizes))
        if len(cases) < max(sizes):
            raise SystemExit(f"{dataset} sizes {sizes}: {path} has only {len(cases)} records")
        ge_cases = [trimmed_generation(c, args.ge_prompts) for c in cases[:args.ge_records]] \
            if fmt == "counterfact" else []
        for n in sizes:  # the unedited model on the same records (the dashed lines)
            measure = CaseMeasure(fmt, cases[:n], ge_cases[:n] if n == max(sizes) else [], settings, generation)
            key = digest({"model": runner.fingerprint, "measure": measure.identity})
            cache = runner.cache_dir / "memit" / f"unedited-{dataset}-{n}-{key[:12]}.json"
            metrics = None
            if cache.exists():
                data = json.loads(cache.read_text(encoding="utf-8"))
                metrics = data["metrics"] if data.get("key") == key else None
            if metrics is None:
                start = time.perf_counter()
                metrics = measure(model)
                write_json_atomic(cache, {"key": key, "metrics": metrics, "seconds": time.perf_counter() - start})
            unedited[f"{dataset}:{n}"] = metrics
            rows.append({"part": "memit", "run_id": "unedited", "label": "unedited", "editor": None,
                         "tags": {"dataset": dataset, "edits": n}, "metrics": metrics, "hparams": {},
                         "seconds": {"edit": 0.0, "measure": 0.0}})
        for spec in specs:
            for n in sizes:
                bar.update(1)
                if spec.max_edits is not None and n > spec.max_edits:
                    skipped.append({"label": spec.label, "dataset": dataset, "edits": n,
                                    "reason": f"--rome-max-edits {spec.max_edits}: sequential ROME costs one value "
                                              "optimisation over 21 templates per edit"})
                    continue
                run_spec = spec
                if spec.run_id == "ft-w":  # the reference's weight decay for n edits
                    run_spec = dataclasses.replace(spec, settings={**spec.settings, "weight_decay": ftw_weight_decay(n)})
                measure = CaseMeasure(fmt, cases[:n], ge_cases[:n] if n == max(sizes) else [], settings, generation)
                rows.append(runner.run("memit", run_spec, [c.request for c in cases[:n]], measure,
                                       {"dataset": dataset, "edits": n}))
    bar.close()
    return {"datasets": {d: {"path": str(p), "sizes": s} for d, p, s in datasets}, "rows": rows, "skipped": skipped,
            "value_batch_size": value_batch, "ge": {"records": args.ge_records, "prompts_per_record": args.ge_prompts,
                                                    "settings": dataclasses.asdict(generation)}}


# --------------------------------------------------------------------------------------------------
# Part 3: F-Learning

@dataclass
class FLearningData:
    dataset: str
    requests: list            # target_new = the new fact, target_true = the old one
    paraphrases: list[Fact]   # the new fact under other wordings
    unrelated: list[Fact]     # locality
    describe: dict


def flearning_data(dataset: str, path: str, n: int, neighbours: int) -> FLearningData:
    if dataset == "counterfact":
        _, cases = load_cases(path, limit=n)
        requests = [c.request for c in cases]
        paraphrases = [Fact(p, c.request.target_new) for c in cases for p in c.paraphrase_prompts]
        unrelated = [Fact(p, c.request.target_true) for c in cases for p in c.neighborhood_prompts[:neighbours]]
        old_new = "old = target_true, new = target_new"
    else:
        records = read_records(path)
        requests, paraphrases, unrelated = [], [], []
        for index, record in enumerate(records):
            if len(requests) == n:
                break
            alt, answers = str(record.get("alt", "")).strip(), record.get("answers") or []
            if not alt or not answers or alt == str(answers[0]).strip():
                continue  # no distinct new answer
            case = ZsreCase.from_record({**record, "case_id": index}, source=path, index=index)
            request = dataclasses.replace(case.request, target_new=alt, target_true=case.request.target_new)
            requests.append(request)
            paraphrases.append(Fact(case.rephrase, request.target_new))
            unrelated.append(Fact(case.loc_prompt, case.loc_target))
        old_new = "old = answers[0], new = alt (records whose alt equals answers[0] skipped)"
    if len(requests) < n:
        raise SystemExit(f"--fl-records {n}: {path} gives only {len(requests)} usable records")
    return FLearningData(dataset, requests, paraphrases, unrelated,
                         {"path": str(path), "records": len(requests), "paraphrases": len(paraphrases),
                          "unrelated": len(unrelated), "old_new": old_new,
                          "case_ids": [r.case_id for r in requests]})


def old_fact_requests(requests) -> list:
    """Stage 0 trains each prompt towards its old answer."""
    return [dataclasses.replace(r, target_new=r.target_true, target_true=None) for r in requests]


def flearning_specs(args, extra_editors: Sequence[str]) -> list[MethodSpec]:
    every_block = {"layers": None, "module": "block"}
    full = {"lr": args.fl_lr, "num_steps": args.fl_passes, "batch_size": args.fl_batch}
    # The forget step repeats stage 0's training of the old facts (its epochs) through the stage's own
    # parameters: full weights at stage 0's lr, LoRA adapters at LoRA's lr (zero-initialised adapters at
    # 1e-4 moved so little in 6 steps that "forgetting" left 87.5% of the old CounterFact facts standing).
    forget = {"full": {"forget_num_steps": args.fl_stage0_epochs, "forget_lr": args.fl_stage0_lr},
              "lora": {"forget_num_steps": args.fl_stage0_epochs, "forget_lr": args.fl_lora_lr}}
    learn = {"full": {"learn_method": "full", "learn_lr": args.fl_lr, "learn_num_steps": args.fl_passes},
             "lora": {"learn_method": "lora", "learn_lr": args.fl_lora_lr, "learn_num_steps": args.fl_passes}}
    specs = [MethodSpec("fl-ft", "full FT", "ft", full, every_block),
             MethodSpec("fl-lora", "LoRA", "f-learning", {**learn["lora"], "batch_size": args.fl_batch},
                        {**every_block, "forget_num_steps": 0}),
             MethodSpec("fl-ft-c", "FT-c (FT-L)", "ft-l", {**full, "norm_constraint": args.fl_ftc_delta}, every_block)]
    for forget_method in ("full", "lora"):
        for learn_method in ("full", "lora"):
            specs.append(MethodSpec(f"fl-{forget_method}-{learn_method}",
                                    f"F-Learning {forget_method} forget → {learn_method} learn", "f-learning",
                                    {**forget[forget_method], "forget_scale": 1.0, "batch_size": args.fl_batch,
                                     **learn[learn_method]}, {**every_block, "forget_method": forget_method},
                                    options={"keep_stage_deltas": True}))
    specs += [MethodSpec("fl-rome", "ROME", "rome"), MethodSpec("fl-memit", "MEMIT", "memit")]
    specs += [MethodSpec(f"fl-{n}", n, n) for n in extra_editors if n not in ("rome", "memit")]
    return specs


def part_flearning(runner: Runner, args, say) -> dict:
    model = runner.model
    specs = flearning_specs(args, args.editors)
    datasets = [("counterfact", args.counterfact), ("zsre", args.zsre)]
    stage0_spec = MethodSpec("fl-stage0", "stage 0: learn the old facts", "ft",
                             {"lr": args.fl_stage0_lr, "num_steps": args.fl_stage0_epochs, "batch_size": args.fl_batch,
                              "early_stop_loss": None}, {"layers": None, "module": "block"})
    # C0 of the base model: the locate-then-edit editors on the stage-0 model read the statistics the
    # model was prepared with (as the reference's stats cache, keyed by model name, would give them).
    if runner.stats is not None:
        layers = set()
        for spec in specs:
            hp = runner.resolve(spec)
            if getattr(get_editor(spec.editor), "uses_covariance", False):
                layers.update(hp.to_dict().get("layers") or [])
        runner.stats.prepare(model, sorted(layers))
    rows, stage0 = [], {}
    bar = tqdm(total=len(datasets) * len(specs), desc="F-Learning", unit="run")
    for dataset, path in datasets:
        data = flearning_data(dataset, path, args.fl_records, args.fl_neighbours)
        old_requests = old_fact_requests(data.requests)
        old = [Fact.from_request(r) for r in old_requests]
        new = [Fact.from_request(r) for r in data.requests]
        base_scores = predict_facts(model, old + data.unrelated, max_tokens=args.score_tokens)
        hp0 = runner.resolve(stage0_spec)
        # The thread count is in the key: training on 1 and on 2 threads rounds differently, so the stage-0
        # weights (and the fingerprint every F-Learning run is keyed by) differ in their last bits.
        key = digest({"model": runner.fingerprint, "requests": requests_sha256(old_requests), "hparams": hp0.to_dict(),
                      "seed": args.seed, "threads": torch.get_num_threads()})
        # The stage-0 deltas touch every block (~800 MB for SmolLM2): kept in kedit's cache, not beside the
        # committed results; the runs measured on the stage-0 model are keyed by its fingerprint.
        path0 = kedit_cache_dir() / "report_seeds" / f"stage0-{dataset}-{key[:12]}.safetensors"
        start = time.perf_counter()
        if path0.exists():
            deltas0 = Deltas.load(path0)
            seconds0 = float(deltas0.extra.get("report_seconds", 0.0))
        else:
            say(f"flearning {dataset}: stage 0, teaching the base model {len(old)} old facts")
            result = kedit.compute_edit(model, old_requests, "ft", hp0, context=EditContext(seed=args.seed, progress=False))
            deltas0 = result.deltas
            seconds0 = time.perf_counter() - start
            deltas0.extra["report_seconds"] = seconds0
            path0.parent.mkdir(parents=True, exist_ok=True)
            deltas0.save(path0)
        with deltas0.apply(model.model):
            runner.refresh_fingerprint()
            after0 = predict_facts(model, old + data.unrelated, max_tokens=args.score_tokens)
            stage0[dataset] = {"hparams": hp0.to_dict(), "seconds": seconds0, "train": deltas0.extra.get("stages"),
                               "A_old_before": accuracy(base_scores[:len(old)]), "A_old_after": accuracy(after0[:len(old)]),
                               "locality_vs_base": locality(base_scores[len(old):], after0[len(old):]),
                               "fingerprint": runner.fingerprint, "data": data.describe}
            say(f"flearning {dataset}: stage 0 old-fact accuracy {stage0[dataset]['A_old_before']:.1f} -> "
                f"{stage0[dataset]['A_old_after']:.1f}")
            measure = FLearningMeasure(model, new, data.paraphrases, data.unrelated, old, args.score_tokens,
                                       base_key=runner.fingerprint)
            pre = measure.probe.measure(model)["pre"]
            rows.append({"part": "flearning", "run_id": "stage0", "label": "stage-0 model (no edit)", "editor": None,
                         "tags": {"dataset": dataset},
                         "metrics": {"reliability": pre["reliability"], "generality": pre["generality"],
                                     "locality": 100.0, "A_old": stage0[dataset]["A_old_after"]},
                         "hparams": {}, "seconds": {"edit": 0.0, "measure": 0.0}})
            for spec in specs:
                rows.append(runner.run("flearning", spec, data.requests, measure, {"dataset": dataset}))
                bar.update(1)
        runner.refresh_fingerprint()
    bar.close()
    return {"stage0": stage0, "rows": rows}


# --------------------------------------------------------------------------------------------------
# Findings

def _pick(rows, **match) -> dict | None:
    for row in rows:
        if all((row.get(k) if k in ("run_id", "label") else row["tags"].get(k)) == v for k, v in match.items()):
            return row
    return None


def _m(row: dict | None, key: str) -> float | None:
    return None if row is None else row["metrics"].get(key)


def _f(value, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def findings(model_name: str, results: dict) -> list[dict]:
    """Each seed finding: the claim, the verdict on this model (a fixed rule, stated), the numbers."""
    out = []

    def add(paper, claim, rule, holds, numbers, reason=None):
        verdict = None if holds is None else ("reproduces" if holds else "does not reproduce")
        out.append({"paper": paper, "claim": claim, "rule": rule, "verdict": verdict,
                    "line": f"{'not measured' if verdict is None else verdict} on {model_name}", "numbers": numbers,
                    "reason": reason})

    zhu = results.get("zhu")
    if zhu:
        rows, sizes = zhu["rows"], zhu["sizes"]
        small = sizes[0]
        ft = _pick(rows, run_id="zhu-ft", size=small, group="methods")
        ftl = _pick(rows, label=f"FT-L L{zhu['delta_choice']['layer']}", size=small)
        mix = _pick(rows, run_id="zhu-ft-mix", size=small)
        add("Zhu et al.", "Unconstrained fine-tuning on M wipes out the unmodified facts (BERT: A_M 75.0, A_F\\S 0.3)",
            "FT of every block: A_M >= 50 and A_F\\S <= 20 at the smallest |M|",
            None if ft is None else (_m(ft, "A_M") >= 50 and _m(ft, "A_F_minus_S") <= 20),
            f"|M| = {small}: FT A_M {_f(_m(ft, 'A_M'))}, A_F\\S {_f(_m(ft, 'A_F_minus_S'))} (unedited A_F\\S 100 by construction)",
            _ft_reason(ft, [_pick(rows, run_id="zhu-ft", size=s, group="methods") for s in sizes]))
        add("Zhu et al.", "The ℓ∞ constraint keeps much more of F\\S at a similar A_M (BERT layer 0: 71.3 / 46.5)",
            "FT-L at the comparison layer (headline δ): A_F\\S > FT's and Ā > FT's",
            None if ft is None or ftl is None else (_m(ftl, "A_F_minus_S") > _m(ft, "A_F_minus_S")
                                                   and _m(ftl, "A_bar") > _m(ft, "A_bar")),
            f"|M| = {small}: FT-L (δ={zhu['delta_choice']['delta']:g}) A_M {_f(_m(ftl, 'A_M'))}, A_F\\S "
            f"{_f(_m(ftl, 'A_F_minus_S'))}, Ā {_f(_m(ftl, 'A_bar'))} vs FT Ā {_f(_m(ft, 'A_bar'))}")
        reason = None
        if mix and ftl and _m(mix, "A_bar") is not None and _m(mix, "A_bar") >= _m(ftl, "A_bar"):
            reason = (f"FT-Mix keeps A_F\\S {_f(_m(mix, 'A_F_minus_S'))} on facts outside its pool while learning "
                      f"A_M {_f(_m(mix, 'A_M'))}: the unmodified facts mixed in (from the same sources as F\\S) protect "
                      "what full fine-tuning disturbs better than a small ℓ∞ box on one block does")
        add("Zhu et al.", "Mixing unmodified facts into each mini-batch helps less than the constraint (BERT FT+mix: 73.3 / 18.5)",
            "Ā of FT-L (headline δ, comparison layer) > Ā of FT-Mix at the smallest |M|",
            None if mix is None or ftl is None else _m(ftl, "A_bar") > _m(mix, "A_bar"),
            f"|M| = {small}: FT-Mix A_M {_f(_m(mix, 'A_M'))}, A_F\\S {_f(_m(mix, 'A_F_minus_S'))}, Ā {_f(_m(mix, 'A_bar'))}; "
            f"FT-L Ā {_f(_m(ftl, 'A_bar'))}", reason)
        best = zhu_best_layers(zhu)
        holds = None
        if len(best) >= 2:
            seq = [best[s]["layer"] for s in sizes if s in best]
            holds = all(b <= a for a, b in zip(seq, seq[1:])) and seq[-1] < seq[0]
        layer_reason = None
        if holds is False and best:
            first = best[sizes[0]] if sizes[0] in best else next(iter(best.values()))
            runner_up = max((r for r in rows if r["run_id"] == "zhu-ft-l" and r["tags"].get("group") == "layers"
                             and r["tags"].get("size") == sizes[0] and r["tags"]["layer"] != first["layer"]),
                            key=lambda r: r["metrics"]["A_bar"], default=None)
            lowest = min(zhu["layers"])
            layer_reason = (f"the best layer is already layer {first['layer']} at |M| = {sizes[0]}"
                            + (f" (Ā {first['A_bar']:.1f}, next best layer {runner_up['tags']['layer']} Ā "
                               f"{runner_up['metrics']['A_bar']:.1f})" if runner_up else "")
                            + (", the lowest layer tested, so it has nowhere lower to move"
                               if first["layer"] == lowest else ""))
        add("Zhu et al.", "As |M| grows the best layer to fine-tune moves toward the first (BERT: 11 → 0)",
            "FT-L's best-Ā layer never moves up and ends lower than it started as |M| grows",
            holds, "; ".join(f"|M| = {s}: best layer {b['layer']} (Ā {b['A_bar']:.1f})" for s, b in best.items()),
            layer_reason)
    memit = results.get("memit")
    if memit:
        rows = memit["rows"]
        for dataset, key, name in (("counterfact", "Score", "Score"), ("zsre", "efficacy", "efficacy")):
            sizes = memit["datasets"][dataset]["sizes"]
            top = sizes[-1]
            at_top = {r["label"]: _m(r, key) for r in rows if r["tags"].get("dataset") == dataset
                      and r["tags"].get("edits") == top and r["run_id"] != "unedited" and _m(r, key) is not None}
            if not at_top or "MEMIT" not in at_top:
                continue
            others = {k: v for k, v in at_top.items() if k not in ("MEMIT", "EMMET", "AlphaEdit")}
            holds = all(at_top["MEMIT"] >= v for v in others.values()) if others else None
            reason = None
            if holds is False:
                winner = max(others, key=others.get)
                para = "paraphrase" if dataset == "zsre" else "PS"
                w_row = _pick(rows, label=winner, dataset=dataset, edits=top)
                m_row = _pick(rows, label="MEMIT", dataset=dataset, edits=top)
                reason = (f"{name} is measured on the very prompts {winner} trains on, which fine-tuning fits directly; "
                          f"on other wordings the two are close ({para}: {winner} {_f(_m(w_row, para))}, MEMIT "
                          f"{_f(_m(m_row, para))})")
            add("Meng et al. (MEMIT)", f"MEMIT beats the fine-tuning baselines and ROME at many edits ({dataset}, {name})",
                f"MEMIT's {name} at the largest size >= every FT/ROME {name} measured there",
                holds, f"{top} edits: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(at_top.items(), key=lambda kv: -kv[1])),
                reason)
        memit_rows = [r for r in rows if r["label"] == "MEMIT" and r["tags"].get("dataset") == "counterfact"]
        if memit_rows:
            top = max(memit_rows, key=lambda r: r["tags"]["edits"])
            gptj = MEMIT_GPTJ["counterfact"]
            add("Meng et al. (MEMIT)", "MEMIT's CounterFact efficacy and generalisation stay high (GPT-J, 10k edits: "
                f"ES {gptj['ES']}, PS {gptj['PS']}, NS {gptj['NS']})",
                "ES >= 90 and PS >= 70 at the largest CounterFact size",
                _m(top, "ES") >= 90 and _m(top, "PS") >= 70,
                f"{top['tags']['edits']} edits: ES {_f(_m(top, 'ES'))}, PS {_f(_m(top, 'PS'))}, NS {_f(_m(top, 'NS'))}, "
                f"GE {_f(_m(top, 'GE'))}")
    fl = results.get("flearning")
    if fl:
        rows = fl["rows"]
        for dataset in ("counterfact", "zsre"):
            ft, lora = _pick(rows, run_id="fl-ft", dataset=dataset), _pick(rows, run_id="fl-lora", dataset=dataset)
            best_fl = _pick(rows, run_id="fl-lora-full", dataset=dataset)
            full_forget = _pick(rows, run_id="fl-full-full", dataset=dataset)
            rome = _pick(rows, run_id="fl-rome", dataset=dataset)
            stage0 = fl.get("stage0", {}).get(dataset) or {}
            described = stage0.get("data") or {}
            n_records, n_unrelated = described.get("records"), described.get("unrelated")
            if ft and lora:
                ceiling = _m(ft, "reliability") == _m(lora, "reliability") == 100.0
                add("Ni et al. (F-Learning)", f"Full fine-tuning learns new knowledge better than LoRA ({dataset})",
                    "reliability of full FT > reliability of LoRA", _m(ft, "reliability") > _m(lora, "reliability"),
                    f"full FT {_f(_m(ft, 'reliability'))}, LoRA {_f(_m(lora, 'reliability'))}",
                    f"both learn every edited fact (reliability 100, a ceiling on {n_records} records); on paraphrases "
                    f"full FT {_f(_m(ft, 'generality'))}, LoRA {_f(_m(lora, 'generality'))}" if ceiling else None)
            if ft and best_fl:
                better = [k for k in ("reliability", "generality", "locality") if _m(best_fl, k) > _m(ft, k)]
                add("Ni et al. (F-Learning)", f"LoRA-forget then full-learn updates knowledge better than full FT ({dataset})",
                    "F-Learning LoRA→full beats full FT on at least two of reliability/generality/locality, losing none "
                    "by more than 1 point",
                    len(better) >= 2 and all(_m(best_fl, k) >= _m(ft, k) - 1 for k in ("reliability", "generality",
                                                                                       "locality")),
                    "F-Learning LoRA→full " + " / ".join(_f(_m(best_fl, k)) for k in ("reliability", "generality",
                                                                                     "locality"))
                    + " vs full FT " + " / ".join(_f(_m(ft, k)) for k in ("reliability", "generality", "locality")),
                    None if len(better) >= 2 else _forget_reason(best_fl, stage0.get("A_old_after")))
            if full_forget and full_forget.get("stage1") and best_fl and best_fl.get("stage1"):
                s_full, s_lora = full_forget["stage1"], best_fl["stage1"]
                add("Ni et al. (F-Learning)", f"Subtracting full-FT knowledge parameters damages the model more than "
                    f"subtracting LoRA's ({dataset})",
                    "after the forget step alone: locality with full forgetting < locality with LoRA forgetting",
                    s_full["locality"] < s_lora["locality"],
                    f"after forgetting: full locality {_f(s_full['locality'])}, old facts {_f(s_full['A_old'])}; "
                    f"LoRA locality {_f(s_lora['locality'])}, old facts {_f(s_lora['A_old'])}",
                    _forget_damage_reason(s_full, s_lora, n_records, n_unrelated))
            if rome:
                add("Ni et al. (F-Learning)", f"ROME keeps locality but barely changes the in-scope answers ({dataset})",
                    "ROME: locality >= 90 and reliability < 50", _m(rome, "locality") >= 90 and _m(rome, "reliability") < 50,
                    f"ROME reliability {_f(_m(rome, 'reliability'))}, generality {_f(_m(rome, 'generality'))}, "
                    f"locality {_f(_m(rome, 'locality'))}", _rome_reason(rome, results.get("memit"), dataset))
            timed = {r["label"]: r["seconds"]["edit"] for r in rows if r["tags"].get("dataset") == dataset
                     and r["run_id"] in ("fl-ft", "fl-lora-full", "fl-rome", "fl-memit")}
            if len(timed) == 4:
                add("Ni et al. (F-Learning)", f"F-Learning is slower than FT (two trainings) but faster than the "
                    f"locate-then-edit methods ({dataset})",
                    "seconds: full FT < F-Learning LoRA→full < min(ROME, MEMIT)",
                    timed["full FT"] < timed["F-Learning lora forget → full learn"] < min(timed["ROME"], timed["MEMIT"]),
                    ", ".join(f"{k} {v:.1f} s" for k, v in timed.items()),
                    _timing_reason([r for r in rows if r["tags"].get("dataset") == dataset],
                                   ("full FT", "F-Learning lora forget → full learn"))
                    if timed["full FT"] >= timed["F-Learning lora forget → full learn"] else None)
    return out


def _forget_damage_reason(s_full: dict, s_lora: dict, n_records: int | None, n_unrelated: int | None) -> str | None:
    """Why LoRA forgetting was not the gentler one: the unrelated facts it left, and the old facts it removed."""
    if s_full["locality"] < s_lora["locality"]:
        return None
    reason = (f"both forget steps leave the same share of the {n_unrelated} unrelated facts"
              if s_full["locality"] == s_lora["locality"] else "LoRA forgetting disturbs more unrelated facts")
    if n_unrelated:
        reason += f" (one fact is {100 / n_unrelated:.1f} points)"
    one_record = 100 / max(n_records or 1, 1)
    if s_lora["A_old"] <= s_full["A_old"] + one_record:  # within one record of full forgetting's removal
        reason += (f"; LoRA forgetting removes about as many old facts (left: LoRA {_f(s_lora['A_old'])}, full "
                   f"{_f(s_full['A_old'])}), so here it is no gentler a subtraction")
    return reason


def _rome_reason(rome: dict, memit: dict | None, dataset: str) -> str | None:
    """What ROME did on the stage-0 model, beside what it did on the base model in the MEMIT comparison."""
    rel, loc = _m(rome, "reliability"), _m(rome, "locality")
    if loc >= 90 and rel < 50:
        return None
    base = None
    if memit:
        runs = [r for r in memit["rows"] if r["label"] == "ROME" and r["tags"].get("dataset") == dataset]
        base = max(runs, key=lambda r: r["tags"]["edits"], default=None)
    key, spec = ("ES", "NS") if dataset == "counterfact" else ("efficacy", "specificity")
    on_base = (f"; on the base model ROME's {base['tags']['edits']} sequential edits reach {key} {_f(_m(base, key))} "
               f"with {spec} {_f(_m(base, spec))}" if base else "")
    if rel >= 50:
        return (f"kedit's ROME (the shipped SmolLM2 settings) does change the in-scope answers: reliability {_f(rel)} "
                f"after {rome['num_requests']} sequential edits of one layer, which cost locality ({_f(loc)})" + on_base)
    return (f"after {rome['num_requests']} sequential edits of one layer of the stage-0 model, ROME keeps neither the new "
            f"answers (reliability {_f(rel)}) nor the unrelated ones (locality {_f(loc)})" + on_base
            + ": the fine-tuned stage-0 model and the longer sequence are what differ")


def _ft_reason(ft: dict | None, per_size: Sequence[dict | None]) -> str | None:
    """Why FT kept F\\S: it did not learn M, or it learned M and stopped (the loss threshold) before it
    had moved far enough to erase the rest, at every |M|."""
    if ft is None or _m(ft, "A_F_minus_S") <= 20:
        return None
    if _m(ft, "A_M") < 50:
        return f"FT did not learn M with the report's lr/passes (final loss {_train_loss(ft)})"
    trained = [r for r in per_size if r and r.get("train")]
    steps = "; ".join(f"|M| = {r['tags']['size']}: {r['train'][-1]['optimizer_steps']} steps, A_F\\S "
                      f"{_f(_m(r, 'A_F_minus_S'))}" for r in trained)
    stop = ("stops as soon as its loss on M is below the report's threshold" if ft["train"][-1].get("stopped_early")
            else "trains all its passes")
    trend = ""
    if len(trained) >= 2:
        change = _m(trained[-1], "A_F_minus_S") - _m(trained[0], "A_F_minus_S")
        trend = (f"; from |M| = {trained[0]['tags']['size']} to {trained[-1]['tags']['size']} the share of F\\S kept "
                 f"changes by {change:+.1f} points")
    return (f"FT learns M and {stop} (final loss {_train_loss(ft)}), having moved the weights only as far as M "
            f"needs{trend} ({steps})")


def _train_loss(row: dict) -> str:
    stages = row.get("train") or []
    return _f(stages[-1].get("final_loss"), 3) if stages else "—"


def _forget_reason(row: dict, stage0_old: float | None) -> str | None:
    """Why forgetting did not help, from what the forget step measured: it either barely moved the old facts
    (the learn stage then repeats plain FT) or removed them together with unrelated facts."""
    s1 = row.get("stage1")
    if not s1:
        return None
    forget = next((t for t in row.get("train") or [] if "forget" in t.get("name", "")), None)
    losses = ""
    if forget:
        losses = f" (its training loss on the old facts went {_f(forget['first_loss'], 3)} → {_f(forget['final_loss'], 3)}"
        # A first loss this low means the stage-0 model already fits the old facts: little left to learn, so
        # the delta the forget step learns, and subtracts, is small.
        losses += (": the stage-0 model already fits them, so the delta it learns, and subtracts, is small)"
                   if forget["first_loss"] < 0.5 else ")")
    before = f"{_f(stage0_old)}% after stage 0" if stage0_old is not None else "stage 0"
    if stage0_old is None or s1["A_old"] >= stage0_old - 15:
        return (f"the forget step left the old facts at {_f(s1['A_old'])}% ({before}){losses}; the learn stage then "
                "does the same work as plain FT")
    return (f"the forget step took the old facts from {before} to {_f(s1['A_old'])}%, but unrelated facts with them "
            f"(locality {_f(s1['locality'])}% after forgetting): subtracting the delta removes more than the old "
            "facts, and the learn stage does not bring the unrelated ones back")


def _timing_reason(rows: Sequence[dict], labels: Sequence[str]) -> str:
    """Seconds per optimizer step and the load each run saw: timings of runs made at different loads differ
    by more than the extra training costs."""
    parts = []
    for row in rows:
        if row["label"] not in labels:
            continue
        steps = sum(t.get("optimizer_steps", 0) for t in row.get("train") or [])
        load = (row.get("load_average") or {}).get("before") or [None]
        per_step = f", {row['seconds']['edit'] / steps:.1f} s per optimizer step over {steps}" if steps else ""
        parts.append(f"{row['label']}: load {_f(load[0], 2)}{per_step}")
    return ("the runs were timed on a shared machine at different loads (" + "; ".join(parts) + "), so the ordering "
            "of the two trainings' seconds is within the load's noise")


def zhu_best_layers(zhu: dict) -> dict:
    out = {}
    for size in zhu["sizes"]:
        layer_rows = [r for r in zhu["rows"] if r["run_id"] == "zhu-ft-l" and r["tags"].get("group") == "layers"
                      and r["tags"].get("size") == size]
        if layer_rows:
            best = max(layer_rows, key=lambda r: (r["metrics"]["A_bar"], -r["tags"]["layer"]))
            out[size] = {"layer": best["tags"]["layer"], "A_bar": best["metrics"]["A_bar"]}
    return out


# --------------------------------------------------------------------------------------------------
# Tables

def _cell(value, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(head: Sequence[str], rows: Sequence[Sequence]) -> str:
    out = io.StringIO()
    out.write("| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
    for row in rows:
        out.write("| " + " | ".join(_cell(c) for c in row) + " |\n")
    return out.getvalue()


def _settings_text(row: dict) -> str:
    hp = row.get("hparams") or {}
    keys = ("layers", "module", "norm_constraint", "lr", "num_steps", "weight_decay", "forget_method", "learn_method",
            "forget_lr", "learn_lr", "mom2_update_weight")
    parts = []
    for k in keys:
        if k in hp:
            v = hp[k]
            if k == "layers":
                v = "all" if v is None else (f"{v[0]}-{v[-1]}" if len(v) > 2 else ",".join(map(str, v)))
            parts.append(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def zhu_markdown(zhu: dict) -> str:
    rows = zhu["rows"]
    out = io.StringIO()
    d = zhu["facts"]
    out.write(f"F\\S: {d['correct']} of {d['candidates']} candidate facts are right on the unedited model "
              f"(known_1000: {d['by_source']['known_1000']['correct']}/{d['by_source']['known_1000']['candidates']}, "
              f"neighbourhood prompts: {d['by_source']['neighbourhood']['correct']}/"
              f"{d['by_source']['neighbourhood']['candidates']}); {d['evaluated']} evaluated, {d['mix_pool']} in "
              f"FT-Mix's pool. Training: Adam lr {zhu['train']['lr']:g}, ≤ {zhu['train']['num_steps']} passes, "
              f"batch 64, stop at loss < 0.01. Headline δ = {zhu['delta_choice']['delta']:g} "
              f"({zhu['delta_choice']['rule']}).\n\n")
    out.write("**Methods** (paper: BERT-Base, T-REx, |M| = 32)\n\n")
    table = []
    layer = zhu["delta_choice"]["layer"]
    for size in zhu["sizes"]:
        chosen = [r for r in rows if r["tags"].get("size") == size and (
            r["run_id"] == "unedited" or r["tags"].get("group") in ("methods", "delta_sweep")
            or (r["run_id"] == "zhu-ft-l" and r["tags"].get("layer") == layer))]
        for row in chosen:
            label = row["label"]
            if row["tags"].get("group") == "layers":
                label = f"{label} (headline δ={row['hparams']['norm_constraint']:g})"
            paper = {"zhu-ft": ZHU_BERT["ft"], "zhu-ft-mix": ZHU_BERT["ft-mix"]}.get(row["run_id"])
            if row["tags"].get("group") == "layers" and layer == 0:
                paper = ZHU_BERT["ft-l"]
            m = row["metrics"]
            table.append((size, label, m["A_M"], m["A_F_minus_S"], m["A_bar"],
                          None if paper is None else f"{paper[0]:.1f} / {paper[1]:.1f}",
                          row.get("seconds", {}).get("edit")))
    out.write(_table(("|M|", "run", "A_M", "A_F\\S", "Ā", "paper A_M / A_F\\S", "edit s"), table))
    out.write("\n**Per layer** (one block trained; FT-L at the headline δ): Ā (A_M / A_F\\S)\n\n")
    layers = zhu["layers"]
    table = []
    for size in zhu["sizes"]:
        for run_id, name in (("zhu-ft-l", "FT-L"), ("zhu-ft", "FT")):
            cells = []
            for layer in layers:
                r = _pick(rows, run_id=run_id, size=size, layer=layer)
                cells.append("" if r is None else f"{r['metrics']['A_bar']:.1f} ({r['metrics']['A_M']:.0f} / "
                                                  f"{r['metrics']['A_F_minus_S']:.0f})")
            if any(cells):
                table.append((size, name, *cells))
    out.write(_table(("|M|", "method", *[f"L{layer}" for layer in layers]), table))
    best = zhu_best_layers(zhu)
    if best:
        out.write("\nFT-L's best layer by Ā: " + "; ".join(f"|M| = {s}: layer {b['layer']} (Ā {b['A_bar']:.1f})"
                                                         for s, b in best.items()) + ".\n")
    return out.getvalue()


def memit_markdown(memit: dict) -> str:
    out = io.StringIO()
    for dataset, keys in (("counterfact", ("ES", "PS", "NS", "Score", "GE", "rewrite_acc", "paraphrase_acc")),
                          ("zsre", ZSRE_METRICS)):
        rows = [r for r in memit["rows"] if r["tags"].get("dataset") == dataset]
        if not rows:
            continue
        out.write(f"\n**{dataset}** (GPT-J, MEMIT at 10,000 edits: "
                  + ", ".join(f"{k} {v}" for k, v in MEMIT_GPTJ[dataset].items()) + ")\n\n")
        table = []
        for row in sorted(rows, key=lambda r: (r["tags"]["edits"], r["run_id"] != "unedited")):
            m = row["metrics"]
            table.append((row["tags"]["edits"], row["label"], *[m.get(k) for k in keys], row["seconds"]["edit"],
                          _settings_text(row)))
        head = ("edits", "method", *[{"rewrite_acc": "rewrite acc.", "paraphrase_acc": "para. acc."}.get(k, k)
                                     for k in keys], "edit s", "settings")
        out.write(_table(head, table))
    if memit.get("skipped"):
        out.write("\nNot run: " + "; ".join(f"{s['label']} at {s['edits']} {s['dataset']} edits ({s['reason']})"
                                            for s in memit["skipped"]) + ".\n")
    return out.getvalue()


def flearning_markdown(fl: dict) -> str:
    out = io.StringIO()
    for dataset, s0 in fl["stage0"].items():
        out.write(f"\n**{dataset}** ({s0['data']['records']} records; {s0['data']['old_new']}). Stage 0 "
                  f"({s0['hparams']['num_steps']} epochs of FT on every block, lr {s0['hparams']['lr']:g}, batch "
                  f"{s0['hparams']['batch_size']}, {s0['seconds']:.1f} s) takes the old facts from "
                  f"{s0['A_old_before']:.1f}% to {s0['A_old_after']:.1f}% (locality vs the base model "
                  f"{_cell(s0['locality_vs_base'])}).\n\n")
        table = []
        for row in fl["rows"]:
            if row["tags"].get("dataset") != dataset:
                continue
            m, s1 = row["metrics"], row.get("stage1") or {}
            table.append((row["label"], m.get("reliability"), m.get("generality"), m.get("locality"), m.get("A_old"),
                          s1.get("A_old"), s1.get("locality"), row["seconds"]["edit"], _settings_text(row)))
        out.write(_table(("method", "reliability", "generality", "locality", "old facts", "after forget: old",
                          "after forget: loc.", "edit s", "settings"), table))
    return out.getvalue()


def findings_markdown(items: Sequence[dict]) -> str:
    out = io.StringIO()
    for item in items:
        out.write(f"- **{item['paper']}: {item['claim']}: {item['line']}.** {item['numbers']}. "
                  f"(Rule: {item['rule']}.)" + (f" Measured reason: {item['reason']}." if item.get("reason") else "")
                  + "\n")
    return out.getvalue()


# --------------------------------------------------------------------------------------------------
# CSV and plots

CSV_FIELDS = ("part", "run_id", "label", "editor", "dataset", "size", "edits", "layer", "group", "seed",
              "A_M", "A_F_minus_S", "A_bar", "locality", *CF_METRICS, *ZSRE_METRICS, "reliability", "generality",
              "A_old", "stage1_A_old", "stage1_locality", "edit_seconds", "measure_seconds", "load_average_1min",
              "cached", "hparams")


def csv_bytes(rows: Sequence[dict]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        m, tags, s1 = row["metrics"], row["tags"], row.get("stage1") or {}
        out = {"part": row["part"], "run_id": row["run_id"], "label": row["label"], "editor": row.get("editor"),
               "seed": row.get("seed"), "edit_seconds": row["seconds"]["edit"],
               "measure_seconds": row["seconds"]["measure"],
               "load_average_1min": (row.get("load_average") or {}).get("before", [None])[0],
               "cached": row.get("cached"), "hparams": json.dumps(row.get("hparams") or {}, sort_keys=True),
               "stage1_A_old": s1.get("A_old"), "stage1_locality": s1.get("locality")}
        out.update({k: tags.get(k) for k in ("dataset", "size", "edits", "layer", "group")})
        out.update({k: m.get(k) for k in CSV_FIELDS if k in m})
        writer.writerow({k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v)) for k, v in out.items()})
    return buf.getvalue().encode("utf-8")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def plot_all(results: dict, out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name):
        fig.tight_layout()
        written.append(write_bytes_atomic(out / name, _png(fig)))
        plt.close(fig)

    zhu = results.get("zhu")
    if zhu:
        rows = zhu["rows"]
        sizes = zhu["sizes"]
        layer = zhu["delta_choice"]["layer"]
        methods = [("unedited", "unedited"), ("zhu-ft", "FT (all blocks)"), ("zhu-ft-mix", "FT-Mix (all blocks)"),
                   ("zhu-ft-l", f"FT-L L{layer}")]
        fig, axes = plt.subplots(1, len(sizes), figsize=(4.2 * len(sizes), 3.8), squeeze=False)
        for ax, size in zip(axes[0], sizes):
            picked = []
            for run_id, label in methods:
                r = _pick(rows, run_id=run_id, size=size, layer=layer) if run_id == "zhu-ft-l" else \
                    _pick(rows, run_id=run_id, size=size)
                if r is not None:
                    picked.append((label, r["metrics"]))
            x = range(len(picked))
            for i, (key, color) in enumerate((("A_M", "#2f6fdb"), ("A_F_minus_S", "#e07b39"), ("A_bar", "#555555"))):
                ax.bar([j + (i - 1) * 0.27 for j in x], [m[key] for _, m in picked], 0.27, color=color,
                       label={"A_M": "A_M", "A_F_minus_S": "A_F\\S", "A_bar": "Ā"}[key])
            ax.set_xticks(list(x), [p[0] for p in picked], fontsize=7, rotation=15)
            ax.set_ylim(0, 105)
            ax.set_title(f"|M| = {size}", fontsize=9)
        axes[0][0].legend(fontsize=7)
        axes[0][0].set_ylabel("accuracy (%)")
        fig.suptitle(f"Zhu et al. methods — {title}", fontsize=9)
        save(fig, "zhu_methods.png")

        fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
        for key, ax in zip(("A_bar", "A_M", "A_F_minus_S"), axes):
            for size in sizes:
                for run_id, style in (("zhu-ft-l", "-o"), ("zhu-ft", "--x")):
                    pts = sorted((r["tags"]["layer"], r["metrics"][key]) for r in rows if r["run_id"] == run_id
                                 and r["tags"].get("group") == "layers" and r["tags"].get("size") == size)
                    if pts:
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], style,
                                label=f"{'FT-L' if run_id == 'zhu-ft-l' else 'FT'} |M|={size}")
            ax.set_title({"A_bar": "Ā", "A_M": "A_M", "A_F_minus_S": "A_F\\S"}[key])
            ax.set_xlabel("trained block")
            ax.set_ylim(-3, 103)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"Zhu et al. per layer — {title}", fontsize=9)
        save(fig, "zhu_layers.png")

        sweep = sorted((r["hparams"]["norm_constraint"], r["metrics"]) for r in rows
                       if r["tags"].get("group") == "delta_sweep")
        if sweep:
            fig, ax = plt.subplots(figsize=(4.5, 3.5))
            for key, label in (("A_M", "A_M"), ("A_F_minus_S", "A_F\\S"), ("A_bar", "Ā")):
                ax.plot([s[0] for s in sweep], [s[1][key] for s in sweep], "-o", label=label)
            ax.set_xscale("log")
            ax.set_xlabel("δ (ℓ∞ radius)")
            ax.set_ylim(-3, 103)
            ax.legend(fontsize=7)
            ax.set_title(f"FT-L δ sweep (|M| = {sizes[0]}, block {layer})", fontsize=9)
            save(fig, "zhu_delta.png")

    memit = results.get("memit")
    if memit:
        for dataset, keys in (("counterfact", ("ES", "PS", "NS", "Score", "GE")), ("zsre", ZSRE_METRICS)):
            rows = [r for r in memit["rows"] if r["tags"].get("dataset") == dataset]
            if not rows:
                continue
            fig, axes = plt.subplots(1, len(keys), figsize=(3.3 * len(keys), 3.4), squeeze=False)
            labels = list(dict.fromkeys(r["label"] for r in rows))
            for ax, key in zip(axes[0], keys):
                for label in labels:
                    pts = sorted((r["tags"]["edits"], r["metrics"].get(key)) for r in rows if r["label"] == label
                                 and r["metrics"].get(key) is not None)
                    if not pts:
                        continue
                    style = dict(linestyle="--", color="black", marker=None) if label == "unedited" else dict(marker="o")
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **style)
                ax.set_xscale("log")
                ax.set_xlabel("edits")
                ax.set_title(key, fontsize=9)
                if key != "GE":
                    ax.set_ylim(-3, 103)
            axes[0][0].legend(fontsize=6)
            fig.suptitle(f"{dataset}: metric vs number of edits (dashed: unedited) — {title}", fontsize=9)
            save(fig, f"memit_{dataset}.png")

    fl = results.get("flearning")
    if fl:
        datasets = list(fl["stage0"])
        fig, axes = plt.subplots(1, len(datasets), figsize=(7 * len(datasets), 4.2), squeeze=False)
        for ax, dataset in zip(axes[0], datasets):
            rows = [r for r in fl["rows"] if r["tags"].get("dataset") == dataset]
            x = range(len(rows))
            for i, (key, color) in enumerate((("reliability", "#2f6fdb"), ("generality", "#5aa469"),
                                              ("locality", "#e07b39"))):
                ax.bar([j + (i - 1) * 0.27 for j in x], [r["metrics"].get(key) or 0 for r in rows], 0.27, color=color,
                       label=key)
            ax.set_xticks(list(x), [r["label"].replace("F-Learning ", "FL ").replace(" forget → ", "→")
                                    .replace(" learn", "") for r in rows], fontsize=7, rotation=30, ha="right")
            ax.set_ylim(0, 105)
            ax.set_title(f"{dataset} (after stage 0)", fontsize=9)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"F-Learning comparison — {title}", fontsize=9)
        save(fig, "flearning.png")
    return written


# --------------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="zoo alias, .gguf file or model directory (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: bench/results/seeds/<model>, "
                                                           "with -full or -quick appended for those presets)")
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="tiny sizes (minutes): the slow test's configuration")
    preset.add_argument("--full", action="store_true", help="the committed report's sizes (|M| 32/128/512, 10/30/100 "
                                                            "edits; about 8 hours on 2 cores, resumable)")
    p.add_argument("--parts", default="zhu,memit,flearning", help="which comparisons (default: %(default)s)")
    p.add_argument("--editors", default="", help="more installed editors to add to the MEMIT and F-Learning "
                                                 "comparisons, by name (e.g. alphaedit,r-rome)")
    p.add_argument("--set", action="append", default=[], metavar="SCOPE.KEY=VALUE", dest="sets",
                   help="override a hyper-parameter for an editor (memit.layers=[5,6,7,8,9]) or one run id "
                        "(zhu-ft.lr=1e-4); repeatable")
    p.add_argument("--list-runs", action="store_true", help="print the run ids and their editors, then exit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    p.add_argument("--counterfact", default=str(DATA / "counterfact_dev.json"))
    p.add_argument("--zsre", default=str(DATA / "zsre_dev.json"))
    p.add_argument("--known", default=str(DATA / "known_1000.json"))
    p.add_argument("--corpus", default=str(DATA / "wikitext-2-raw" / "wiki.test.raw"), help="C0 corpus")
    p.add_argument("--score-tokens", type=int, default=4096, help="padded tokens per scoring batch")
    sizes = p.add_argument_group("sizes and settings (the default run; --full and --quick where they differ)")
    for name, value in DEFAULT.items():
        kind = type(value) if value is not None else int
        other = "".join(f"; {flag} {preset[name]}" for flag, preset in (("full", FULL), ("quick", QUICK))
                        if preset[name] != value)
        sizes.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=f"default {value}{other}")
    sizes.add_argument("--fl-ftc-delta", type=float, default=1e-3, help="FT-c's δ in the F-Learning comparison")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL if args.full else DEFAULT
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.editors = [e.strip() for e in args.editors.split(",") if e.strip()]
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = sorted(set(args.parts) - {"zhu", "memit", "flearning"})
    if bad:
        raise SystemExit(f"--parts: unknown part(s) {bad}; expected zhu, memit, flearning")
    return args


def user_assignments(sets: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in sets:
        scope, dot, rest = item.partition(".")
        if not dot or "=" not in rest:
            raise SystemExit(f"--set {item!r}: expected SCOPE.KEY=VALUE, e.g. memit.layers=[5,6,7,8,9]")
        out.setdefault(scope, []).append(rest)
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    suffix = "-full" if args.full else "-quick" if args.quick else ""
    out = args.out or HERE / "results" / "seeds" / (slug(Path(args.model).name) + suffix)
    out.mkdir(parents=True, exist_ok=True)

    def say(message: str) -> None:
        tqdm.write(f"[{time.perf_counter() - started:7.1f}s] {message}")

    say(f"loading {args.model}")
    model = kedit.load_model(args.model, device="cpu")
    if args.list_runs:
        for part, specs in (("memit", memit_specs(model, args.editors, 1, args.rome_max_edits)),
                            ("flearning", flearning_specs(args, args.editors))):
            for spec in specs:
                print(f"{part:10} {spec.run_id:14} {spec.editor:12} {spec.label}")
        print("zhu        zhu-ft / zhu-ft-l / zhu-ft-mix (ft / ft-l / ft-mix)")
        return {}
    user_sets = user_assignments(args.sets)
    run_editors = {spec.run_id: spec.editor for spec in [*memit_specs(model, args.editors, 1, args.rome_max_edits),
                                                          *flearning_specs(args, args.editors)]}
    run_editors.update({"zhu-ft": "ft", "zhu-ft-l": "ft-l", "zhu-ft-mix": "ft-mix", "fl-stage0": "ft"})
    for scope, items in user_sets.items():  # check every flag now, not an hour in
        editor = scope if scope in list_editors() else run_editors.get(scope)
        if editor is None:
            raise SystemExit(f"--set {scope}.{items[0]}: {scope!r} is neither an installed editor nor a run id "
                             "(--list-runs shows them)")
        parse_assignments(get_editor(editor).HParams, items)
    stats = CachedCovariance(args.corpus, None, tokens=args.c0_tokens, progress=True)
    runner = Runner(model, out, seed=args.seed, stats=stats, user_sets=user_sets, started=started,
                    work_dir=out / "runs" / "values")
    load_start = os.getloadavg()
    results: dict = {}
    part_seconds = {}
    for part, fn in (("zhu", part_zhu), ("memit", part_memit), ("flearning", part_flearning)):
        if part in args.parts:
            start = time.perf_counter()
            results[part] = fn(runner, args, say)
            part_seconds[part] = time.perf_counter() - start
            say(f"{part}: {part_seconds[part]:.0f} s")
    name = Path(args.model).name
    items = findings(name, results)
    total = time.perf_counter() - started
    command = "python bench/report_seeds.py " + " ".join(argv if argv is not None else sys.argv[1:])
    all_rows = [r for part in results.values() for r in part["rows"]]
    cached = sum(bool(r.get("cached")) for r in all_rows)
    # What the whole report cost, also when it was resumed: every run's own edit + measure seconds.
    run_seconds = sum(r["seconds"]["edit"] + r["seconds"]["measure"] for r in all_rows)
    computed = sum(r.get("cached") is False for r in all_rows)
    document = {
        "report": "the seed papers' experiments on a real model (bench/report_seeds.py, issue 16)",
        "command": command.strip(),
        "model": {"name": args.model, "source": model.source, "fingerprint": runner.fingerprint,
                  "num_layers": model.adapter.num_layers, "parameters": sum(p.numel() for p in model.model.parameters())},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seeds": {"seed": args.seed, "uses": "EditContext(seed) for every edit (FT-Mix's sampler, LoRA init, context "
                  "templates); the F\\S split random.Random('kedit-report-seeds-zhu-<seed>'); GE sampling "
                  "GenerationSettings(seed) per prompt"},
        "c0": {"corpus": args.corpus, "tokens": args.c0_tokens},
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
                        "cpu_count": os.cpu_count(), "machine": platform.machine(), "load_average_start": load_start,
                        "load_average_end": os.getloadavg()},
        "seconds": {"total": total, "parts": part_seconds, "sum_of_runs": run_seconds},
        "runs_computed": computed, "runs_from_cache": cached,
        "paper_numbers": {"zhu_bert_trex_32": ZHU_BERT, "memit_gptj_10k": MEMIT_GPTJ},
        "findings": items,
        "results": results,
    }
    write_json_atomic(out / "seeds_report.json", document, indent=1)
    for part in results:
        write_bytes_atomic(out / f"{part}.csv", csv_bytes(results[part]["rows"]))
    title = f"{name}, seed {args.seed}"
    plots = plot_all(results, out, title)
    md = io.StringIO()
    md.write(f"# The seed papers' experiments on {name}\n\n`{document['command']}` — {total:.0f} s "
             f"({computed} runs computed, {cached} from the cache; the runs themselves took {run_seconds:.0f} s when "
             f"computed; {args.threads} threads; load average "
             f"{load_start[0]:.2f} at start). Every run's resolved hyper-parameters, seed and seconds are in "
             "`seeds_report.json` and the CSV files.\n")
    if "zhu" in results:
        md.write(f"\n## 1. Zhu et al. 2020: constrained fine-tuning\n\n{zhu_markdown(results['zhu'])}\n"
                 "![](zhu_methods.png)\n![](zhu_layers.png)\n![](zhu_delta.png)\n")
    if "memit" in results:
        md.write(f"\n## 2. MEMIT: editing many facts\n{memit_markdown(results['memit'])}\n"
                 "![](memit_counterfact.png)\n![](memit_zsre.png)\n")
    if "flearning" in results:
        md.write(f"\n## 3. F-Learning: forget, then learn\n{flearning_markdown(results['flearning'])}\n"
                 "![](flearning.png)\n")
    md.write(f"\n## 4. Findings\n\n{findings_markdown(items)}")
    write_text_atomic(out / "seeds_report.md", md.getvalue())
    say("wrote " + ", ".join(str(p) for p in [out / "seeds_report.md", out / "seeds_report.json", *plots]))
    return document


if __name__ == "__main__":
    try:
        main()
    except KeditError as exc:
        print(f"report_seeds: error: {exc}", file=sys.stderr)
        sys.exit(2)
