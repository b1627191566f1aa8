"""Report: the fine-tuning family (``ft``, ``ft-l``, ``ft-mix``, ``f-learning``) on the toy fact world,
checked against the qualitative findings of the seed papers (issue 7, item 6).

What it measures, on the committed toy model (``kedit.load_model("toy")``, whatever its size):

- **M**, the modified facts: the first ``--num-modified`` records of ``toyworld.make_records`` (seeded);
  each rewrites one fact to another object of the same relation. ``A_M`` is the share of their rewrite
  prompts whose whole new target is the argmax (teacher forced); *generality* the same on the record's
  paraphrase prompts; ``A_old`` the share that still give the old object.
- **F\\S**, the unmodified facts: every other fact of the world, under one seeded template each. A seeded
  pool of ``--mix-pool`` of them is set aside as FT-Mix's unmodified training facts; ``A_{F\\S}``
  (``A_F_minus_S``) and F-Learning's *locality* (share of facts whose argmax target tokens did not
  change) are measured on the rest, which no method trains on. ``Ā = (A_M + A_{F\\S}) / 2`` (Zhu et al.).
  ``→new`` (``leak_to_new``) is the share of them now answered wrongly with one of the edits' new objects.

Runs (every one through ``kedit.compute_edit`` → deltas applied, measured, reverted):

1. ``ft`` and ``ft-l`` with the plugin's own defaults (for the record: on a 1.4M-parameter model
   25 Adam steps at lr 5e-4 barely move the targets), then the report's settings (``--lr``,
   ``--steps``) at the comparison layer ``--layer``: ``ft`` (unconstrained), ``ft-l`` over the δ
   sweep ``--deltas`` and ``ft-mix`` (``--mix-ratio``). The headline FT-L δ is the sweep's best Ā
   (ties: the smaller δ), the rule Zhu et al. use to pick settings.
2. The layer sweep: ``ft`` and ``ft-l`` (headline δ) at every layer 0 … last.
3. F-Learning with the plugin's defaults (all blocks; forget 10 passes, λ = 1; learn 25 passes, full),
   the forget stage ``lora`` (the paper's best) and ``full``; the model after stage 1 is measured from
   ``info["forget_deltas"]`` (``EditContext(options={"keep_stage_deltas": True})``). Its baseline is
   plain ``ft`` on the same parameters with the learn stage's settings.

Outputs (``--out``, default ``bench/results/finetune_report/``): ``finetune_report.json`` (settings,
seeds, the resolved hyper-parameters of every run, metrics, timings, environment),
``finetune_report.csv`` (one row per run), ``finetune_report.md`` (the tables printed to stdout),
``methods.png``, ``delta_sweep.png``, ``layer_sweep.png``. Wall-clock seconds on a machine shared with
other jobs are indicative only; the elapsed time is printed as runs finish.

    python bench/report_finetune.py                      # the full report (≈ a few minutes on 2 cores)
    python bench/report_finetune.py --num-modified 8 --layers 0 --deltas 0.01 --steps 3 --no-flearning
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import kedit_core as kedit  # noqa: E402
from kedit_core import EditContext, toyworld  # noqa: E402
from kedit_core.atomic import write_json_atomic, write_text_atomic  # noqa: E402
from kedit_core.editors import get_editor  # noqa: E402
from kedit_core.evaluation import Fact, accuracy, locality, predict_facts, token_agreement  # noqa: E402
from kedit_core.hparams import parse_assignments  # noqa: E402
from kedit_core.requests import requests_from_records  # noqa: E402

DEFAULT_OUT = HERE / "results" / "finetune_report"
KEEP_STAGE_DELTAS = "keep_stage_deltas"  # the f-learning plugin's EditContext option
METRICS = ("A_M", "A_F_minus_S", "A_bar", "generality", "locality", "A_old", "A_mix_pool", "leak_to_new")
CSV_FIELDS = ("run", "seed", "group", "method", "layers", "module", "norm_constraint", "lr", "num_steps",
              *METRICS, "stage1_A_old", "stage1_A_F_minus_S", "stage1_locality", "optimizer_steps",
              "final_loss", "edit_seconds", "measure_seconds")


# --------------------------------------------------------------------------------------------------
# The fact sets

class FactSets:
    """Modified facts (new targets), their paraphrases and old targets, FT-Mix's pool and the held-out
    unmodified facts, drawn from the toy world with ``seed``."""

    def __init__(self, world, *, num_modified: int, mix_pool: int, num_unmodified: int | None, seed: int):
        records = toyworld.make_records(world, num_modified, seed=seed)
        self.requests = requests_from_records(records, "counterfact", source="toy world records")
        self.modified = [Fact(r.filled_prompt, r.target_new) for r in self.requests]
        self.old = [Fact(r.filled_prompt, r.target_true) for r in self.requests]
        self.paraphrases = [Fact(p, req.target_new) for rec, req in zip(records, self.requests)
                            for p in rec["paraphrase_prompts"]]
        touched = {(r["requested_rewrite"]["subject"], r["requested_rewrite"]["relation_id"]) for r in records}
        rest = world.facts_excluding(touched)
        rng = random.Random(f"kedit-report-finetune-{seed}")
        rng.shuffle(rest)  # seeded: which facts go to the mix pool, which are evaluated, which template
        if mix_pool >= len(rest):
            raise ValueError(f"--mix-pool {mix_pool} leaves no unmodified facts to evaluate ({len(rest)} remain)")
        as_fact = [Fact(world.prompt(f, rng.randrange(len(world.relation(f.relation_id).templates))),
                        " " + f.object) for f in rest]
        self.mix_pool = as_fact[:mix_pool]
        held_out = as_fact[mix_pool:]
        self.unmodified = held_out if num_unmodified is None else held_out[:num_unmodified]

    def describe(self) -> dict:
        return {"modified": len(self.modified), "paraphrases": len(self.paraphrases),
                "mix_pool": len(self.mix_pool), "unmodified_evaluated": len(self.unmodified),
                "first_requests": [{"prompt": r.filled_prompt, "target_true": r.target_true,
                                    "target_new": r.target_new} for r in self.requests[:5]]}


class Meter:
    """Scores every fact group in one batched pass; locality against the unedited model's predictions."""

    def __init__(self, model, facts: FactSets, max_tokens: int):
        self.facts, self.max_tokens = facts, max_tokens
        self.groups = {"modified": facts.modified, "paraphrases": facts.paraphrases, "old": facts.old,
                       "unmodified": facts.unmodified, "mix_pool": facts.mix_pool}
        self.before = self._scores(model)

    def _scores(self, model) -> dict:
        flat = [f for group in self.groups.values() for f in group]
        scores = predict_facts(model, flat, max_tokens=self.max_tokens)
        out, start = {}, 0
        for name, group in self.groups.items():
            out[name] = scores[start:start + len(group)]
            start += len(group)
        return out

    def measure(self, model) -> dict:
        s = self._scores(model)
        a_m, a_f = accuracy(s["modified"]), accuracy(s["unmodified"])
        return {"A_M": a_m, "A_F_minus_S": a_f, "A_bar": (a_m + a_f) / 2, "generality": accuracy(s["paraphrases"]),
                "locality": locality(self.before["unmodified"], s["unmodified"]),
                "locality_token_agreement": token_agreement(self.before["unmodified"], s["unmodified"]),
                "A_old": accuracy(s["old"]), "A_mix_pool": accuracy(s["mix_pool"]),
                "leak_to_new": leak_to_new_objects(s["modified"], s["unmodified"])}


def leak_to_new_objects(modified, unmodified) -> float | None:
    """Share (×100) of the unmodified facts the model now gets wrong by predicting one of the edits'
    new targets: how much of the damage is the edit spilling over to other subjects of a relation."""
    if not unmodified:
        return None
    new_targets = {tuple(s.target_ids) for s in modified}
    return 100.0 * sum(not s.correct and tuple(s.argmax_ids) in new_targets for s in unmodified) / len(unmodified)


# --------------------------------------------------------------------------------------------------
# Runs

class Report:
    """Runs edits of one seed's fact sets and appends a row per run to ``rows`` (shared across seeds)."""

    def __init__(self, model, facts: FactSets, meter: Meter, *, seed: int, primary: bool, rows: list, bar,
                 started: float):
        self.model, self.facts, self.meter, self.seed = model, facts, meter, seed
        self.rows, self.bar, self.started = rows, bar, started
        # The primary seed's runs make the full report; another seed's repeat the comparison runs.
        self.suffix = "" if primary else f" [seed {seed}]"

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def _say(self, run_id: str, metrics: dict, stage1: dict | None, seconds: float) -> None:
        tqdm.write(f"[{self.elapsed():6.1f}s] {run_id:<36} A_M {metrics['A_M']:5.1f}  A_F\\S {metrics['A_F_minus_S']:5.1f}"
                   f"  Ā {metrics['A_bar']:5.1f}  loc {metrics['locality']:5.1f}"
                   + (f"  | stage 1: A_old {stage1['A_old']:5.1f} loc {stage1['locality']:5.1f}" if stage1 else "")
                   + f"  ({seconds:.1f}s)")

    def unedited(self) -> dict:
        metrics = self.meter.measure(self.model)
        row = {"run": "unedited" + self.suffix, "name": "unedited", "group": "base" if not self.suffix else "seed_repeats",
               "method": None, "hparams": {}, "overrides": {}, "seed": self.seed, "metrics": metrics, "stage1": None,
               "stages": [], "max_abs_change": None, "trained_parameters": 0, "delta_norm": 0.0,
               "timings": {"edit_seconds": 0.0, "measure_seconds": 0.0, "editor_phases": {}}}
        self.rows.append(row)
        self._say(row["run"], metrics, None, 0.0)
        return row

    def run(self, name: str, group: str, method: str, overrides: dict, *, options: dict | None = None) -> dict:
        """compute_edit → apply → measure → revert; one row of the report."""
        context = EditContext(seed=self.seed, progress=False, options=dict(options or {}))
        start = time.perf_counter()
        result = kedit.compute_edit(self.model, self.facts.requests, method, context=context, **overrides)
        edit_seconds = time.perf_counter() - start
        start = time.perf_counter()
        with result.deltas.apply(self.model.model):
            metrics = self.meter.measure(self.model)
        stage1 = None
        if "forget_deltas" in result.info:
            with result.info["forget_deltas"].apply(self.model.model, check_fingerprint=False):
                stage1 = self.meter.measure(self.model)
        measure_seconds = time.perf_counter() - start
        row = {"run": name + self.suffix, "name": name, "group": group if not self.suffix else "seed_repeats",
               "method": method, "hparams": dict(result.deltas.hparams), "overrides": overrides, "seed": self.seed,
               "metrics": metrics, "stage1": stage1, "stages": result.deltas.extra.get("stages", []),
               "max_abs_change": result.deltas.extra.get("max_abs_change"),
               "trained_parameters": len(result.deltas.tensors),
               "delta_norm": math.sqrt(sum(v ** 2 for v in result.deltas.norms().values())),
               "timings": {"edit_seconds": edit_seconds, "measure_seconds": measure_seconds,
                           "editor_phases": dict(result.timings)}}
        self.rows.append(row)
        self.bar.update(1)
        self._say(row["run"], metrics, stage1, edit_seconds)
        return row

    def reuse(self, row: dict, name: str, group: str) -> dict:
        """A row already measured, listed again under another table (marked ``same_as``)."""
        copy = dict(row, run=name + self.suffix, name=name, group=group, same_as=row["run"])
        self.rows.append(copy)
        return copy


def best_delta(rows: Sequence[dict]) -> float:
    """The δ with the best Ā (ties: the smaller δ)."""
    best = max(rows, key=lambda r: (r["metrics"]["A_bar"], -r["hparams"]["norm_constraint"]))
    return best["hparams"]["norm_constraint"]


# --------------------------------------------------------------------------------------------------
# Tables and plots

def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def csv_row(row: dict) -> dict:
    hp, m, s1 = row["hparams"], row["metrics"], row["stage1"] or {}
    lr = hp.get("lr", hp.get("learn_lr"))
    steps = hp.get("num_steps", hp.get("learn_num_steps"))
    last = row["stages"][-1] if row["stages"] else {}
    out = {"run": row["run"], "seed": row["seed"], "group": row["group"], "method": row["method"],
           "layers": "all" if hp.get("layers") is None else "+".join(map(str, hp["layers"])),
           "module": hp.get("module"), "norm_constraint": hp.get("norm_constraint"), "lr": lr, "num_steps": steps}
    out.update({k: m.get(k) for k in METRICS})
    out.update({"stage1_A_old": s1.get("A_old"), "stage1_A_F_minus_S": s1.get("A_F_minus_S"),
                "stage1_locality": s1.get("locality"),
                "optimizer_steps": sum(st.get("optimizer_steps", 0) for st in row["stages"]),
                "final_loss": last.get("final_loss"), "edit_seconds": row["timings"]["edit_seconds"],
                "measure_seconds": row["timings"]["measure_seconds"]})
    return out


def markdown_tables(rows: Sequence[dict]) -> str:
    groups = [("Method comparison (Zhu et al.)", ("base", "defaults", "methods")),
              ("FT-L δ sweep", ("delta_sweep",)), ("Layer sweep", ("layer_sweep",)),
              ("F-Learning (Ni et al.)", ("f_learning",))]
    head = ("run", "layers", "δ", "lr", "steps", "A_M", "A_F\\S", "Ā", "gen.", "locality", "A_old", "→new",
            "stage-1 A_old", "stage-1 loc.", "s")
    out = io.StringIO()
    for title, names in groups:
        chosen = [r for r in rows if r["group"] in names]
        if not chosen:
            continue
        out.write(f"\n**{title}**\n\n| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
        for row in chosen:
            c = csv_row(row)
            cells = (c["run"], c["layers"] if row["group"] != "base" else "—", f"{c['norm_constraint']:g}"
                     if c["norm_constraint"] is not None else "—", _fmt(c["lr"]) if c["lr"] is None else f"{c['lr']:g}",
                     _fmt(c["num_steps"]), _fmt(c["A_M"]), _fmt(c["A_F_minus_S"]), _fmt(c["A_bar"]),
                     _fmt(c["generality"]), _fmt(c["locality"]), _fmt(c["A_old"]), _fmt(c["leak_to_new"]),
                     _fmt(c["stage1_A_old"]),
                     _fmt(c["stage1_locality"]), _fmt(c["edit_seconds"]))
            out.write("| " + " | ".join(cells) + " |\n")
    return out.getvalue()


def plot_all(rows: Sequence[dict], summary: Sequence[dict], out: Path, title: str) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    by_group = lambda g: [r for r in rows if r["group"] == g]  # noqa: E731
    colours = {"A_M": "tab:red", "A_F_minus_S": "tab:blue", "A_bar": "black"}
    labels = {"A_M": "A_M (modified)", "A_F_minus_S": "A_F\\S (unmodified)", "A_bar": "Ā"}
    over_seeds = {e["run"]: e for e in summary}

    def value(row: dict, key: str) -> tuple[float | None, float]:
        """Mean and sd over seeds where the run was repeated, else the row's own value (sd 0)."""
        stage1 = key.startswith("stage1_")
        entry = over_seeds.get(row["name"])
        if entry is not None and entry.get(key) is not None:
            return entry[key]["mean"], entry[key]["sd"]
        v = (row["stage1"] or {}).get(key[len("stage1_"):]) if stage1 else row["metrics"][key]
        return v, 0.0

    def bars(ax, chosen, keys, width):
        for k, (key, label, colour) in enumerate(keys):
            xs = [i + (k - (len(keys) - 1) / 2) * width for i in range(len(chosen))]
            pairs = [(x, *value(r, key)) for x, r in zip(xs, chosen)]
            pairs = [p for p in pairs if p[1] is not None]
            ax.bar([p[0] for p in pairs], [p[1] for p in pairs], width, color=colour, label=label, alpha=0.85)
            spread = [p for p in pairs if p[2] > 0]
            if spread:
                ax.errorbar([p[0] for p in spread], [p[1] for p in spread], yerr=[p[2] for p in spread], fmt="none",
                            ecolor="0.2", elinewidth=0.8, capsize=2)
            for x, v, sd in pairs:
                ax.text(x, v + sd + 1, f"{v:.0f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(chosen)))
        ax.set_xticklabels([r["name"] for r in chosen], rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 132)
        ax.set_yticks(range(0, 101, 20))
        ax.legend(fontsize=7, loc="upper center", ncol=len(keys) if len(keys) <= 3 else 2, frameon=False)

    zhu = by_group("base") + by_group("defaults") + by_group("methods")
    fl = by_group("f_learning")
    fig, axes = plt.subplots(1, 2 if fl else 1, figsize=(14 if fl else 8, 5), squeeze=False,
                             gridspec_kw={"width_ratios": [len(zhu), len(fl)]} if fl else None)
    bars(axes[0][0], zhu, [(k, labels[k], colours[k]) for k in ("A_M", "A_F_minus_S", "A_bar")], 0.27)
    axes[0][0].set_ylabel("accuracy (%)")
    axes[0][0].set_title("FT / FT-L / FT-Mix at the comparison layer", fontsize=10)
    if fl:
        bars(axes[0][1], fl, (("stage1_A_old", "old facts after stage 1", "tab:orange"),
                              ("stage1_locality", "locality after stage 1", "tab:cyan"),
                              ("A_M", "A_M (reliability)", "tab:red"), ("locality", "locality", "tab:blue")), 0.2)
        axes[0][1].set_title("F-Learning vs plain FT on the same parameters", fontsize=10)
    note = "bars: mean ± sd over seeds where repeated (the others: the first seed)" if summary else ""
    fig.suptitle(title + ("\n" + note if note else ""), fontsize=9)
    fig.tight_layout()
    written.append(out / "methods.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    # δ sweep
    sweep = sorted(by_group("delta_sweep"), key=lambda r: r["hparams"]["norm_constraint"])
    ft = next((r for r in by_group("methods") if r["method"] == "ft"), None)
    if sweep:
        fig, ax = plt.subplots(figsize=(8, 5.5))
        xs = [r["hparams"]["norm_constraint"] for r in sweep]
        for key in ("A_M", "A_F_minus_S", "A_bar"):
            ax.plot(xs, [r["metrics"][key] for r in sweep], "o-", color=colours[key], label=f"FT-L {labels[key]}")
            if ft is not None:
                ax.axhline(ft["metrics"][key], color=colours[key], ls=":", lw=1,
                           label=f"FT (δ = ∞) {labels[key]}")
        ax.set_xscale("log")
        ax.set_xlabel("δ (ℓ∞ bound on every trained weight)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-3, 103)
        layer = "+".join(map(str, sweep[0]["hparams"]["layers"]))
        ax.set_title(f"FT-L δ sweep, layer {layer}, {sweep[0]['hparams']['module']} (dotted: unconstrained FT)",
                     fontsize=10)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
        fig.tight_layout()
        written.append(out / "delta_sweep.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

    # layer sweep
    layer_rows = by_group("layer_sweep")
    if layer_rows:
        fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=True)
        for ax, key in zip(axes, ("A_M", "A_F_minus_S", "A_bar")):
            for method, style in (("ft", "s--"), ("ft-l", "o-")):
                pts = sorted((r["hparams"]["layers"][0], r["metrics"][key]) for r in layer_rows if r["method"] == method)
                if pts:
                    delta = next((r["hparams"].get("norm_constraint") for r in layer_rows if r["method"] == method), None)
                    name = "FT" if method == "ft" else f"FT-L (δ = {delta:g})"
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
            ax.set_title(labels[key])
            ax.set_xlabel("tuned layer")
            ax.set_ylim(-3, 103)
            ax.set_xticks(sorted({r["hparams"]["layers"][0] for r in layer_rows}))
        axes[0].set_ylabel("accuracy (%)")
        axes[0].legend(fontsize=8)
        fig.suptitle(f"Layer sweep ({layer_rows[0]['hparams']['module']})", fontsize=10)
        fig.tight_layout()
        written.append(out / "layer_sweep.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


# --------------------------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    p.add_argument("--model", default="toy", help="a toy-world checkpoint (default: the committed one)")
    p.add_argument("--seeds", default="0,1,2",
                   help="seeds of the records, fact split, templates and editors; the first makes the full report, "
                        "the others repeat the method comparison and F-Learning (default: %(default)s)")
    p.add_argument("--num-modified", type=int, default=64, help="modified facts M (default: %(default)s)")
    p.add_argument("--mix-pool", type=int, default=128,
                   help="unmodified facts set aside for FT-Mix to train on, not evaluated (default: %(default)s)")
    p.add_argument("--num-unmodified", type=int, default=None,
                   help="unmodified facts to evaluate (default: all others)")
    p.add_argument("--layer", type=int, default=0, help="layer of the method comparison and δ sweep (default: 0)")
    p.add_argument("--layers", default="all", help="layer sweep: 'all', 'none' or a list like 0,2,5")
    p.add_argument("--module", default="mlp_out", help="trained module kind for FT/FT-L/FT-Mix (default: %(default)s)")
    p.add_argument("--lr", type=float, default=5e-3, help="FT/FT-L/FT-Mix learning rate (default: %(default)s)")
    p.add_argument("--steps", type=int, default=25, help="FT/FT-L/FT-Mix passes (default: %(default)s)")
    p.add_argument("--deltas", default="1e-3,3e-3,1e-2,3e-2,1e-1", help="FT-L δ sweep (default: %(default)s)")
    p.add_argument("--mix-ratio", type=float, default=1.0, help="FT-Mix unmodified facts per modified fact")
    p.add_argument("--no-defaults", action="store_true", help="skip the runs with the plugin's defaults")
    p.add_argument("--no-flearning", action="store_true", help="skip F-Learning")
    p.add_argument("--fl-set", action="append", default=[], metavar="KEY=VALUE",
                   help="F-Learning hyper-parameter overrides (default: the plugin's defaults)")
    p.add_argument("--forget-methods", default="lora,full", help="F-Learning forget stages (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    p.add_argument("--score-tokens", type=int, default=4096, help="padded tokens per scoring batch")
    return p.parse_args(argv)


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"{what}: expected comma-separated integers, got {text!r}") from None


def comparison_and_flearning(report: Report, args, *, delta: float | None, fl: dict | None,
                             ft_row: dict | None = None, ftl_row: dict | None = None) -> None:
    """The runs repeated for every seed: FT, FT-L (δ), FT-Mix at the comparison layer, and F-Learning
    beside plain FT on the same parameters. ``ft_row``/``ftl_row``: already measured (primary seed)."""
    where = {"layers": [args.layer], "module": args.module, "lr": args.lr, "num_steps": args.steps}
    if ft_row is None:
        report.run("ft", "methods", "ft", where)
    if delta is not None:
        if ftl_row is None:
            report.run(f"ft-l (δ={delta:g})", "methods", "ft-l", dict(where, norm_constraint=delta))
        else:
            report.reuse(ftl_row, f"ft-l (δ={delta:g})", "methods")
    pool = [(f.prompt, f.target) for f in report.facts.mix_pool]
    report.run("ft-mix", "methods", "ft-mix", dict(where, mix_ratio=args.mix_ratio), options={"unmodified_facts": pool})
    if fl is None:
        return
    hp, overrides = fl["hparams"], fl["overrides"]
    if hp.learn_method == "full":
        baseline = {"layers": hp.layers, "module": hp.module, "params": list(hp.params),
                    "include_biases": hp.include_biases, "lr": hp.learn_lr, "num_steps": hp.learn_num_steps,
                    "early_stop_loss": hp.learn_early_stop_loss, "batch_size": hp.batch_size,
                    "weight_decay": hp.weight_decay}
        report.run("ft (F-Learning's params)", "f_learning", "ft", baseline)
    else:  # plain LoRA fine-tuning is F-Learning without a forget stage
        report.run("lora-ft (no forgetting)", "f_learning", "f-learning", dict(overrides, forget_num_steps=0))
    for method in fl["forget_methods"]:
        report.run(f"f-learning {method}→{hp.learn_method}", "f_learning", "f-learning",
                   dict(overrides, forget_method=method), options={KEEP_STAGE_DELTAS: True})


def seed_summary(rows: Sequence[dict]) -> list[dict]:
    """Mean and sample standard deviation over seeds of every run repeated for each seed."""
    names: dict[str, list[dict]] = {}
    for row in rows:
        if row["group"] in ("base", "methods", "f_learning", "seed_repeats"):
            names.setdefault(row["name"], []).append(row)
    out = []
    for name, group in names.items():
        if len(group) < 2:
            continue
        entry = {"run": name, "seeds": [r["seed"] for r in group]}
        for key in ("A_M", "A_F_minus_S", "A_bar", "generality", "locality", "A_old", "leak_to_new"):
            entry[key] = _mean_sd([r["metrics"][key] for r in group])
        for key in ("A_old", "locality"):
            values = [(r["stage1"] or {}).get(key) for r in group]
            entry[f"stage1_{key}"] = _mean_sd(values) if all(v is not None for v in values) else None
        out.append(entry)
    return out


def _mean_sd(values: Sequence[float]) -> dict:
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "sd": sd, "values": list(values)}


def summary_table(summary: Sequence[dict]) -> str:
    if not summary:
        return ""
    head = ("run", "seeds", "A_M", "A_F\\S", "Ā", "gen.", "locality", "→new", "stage-1 A_old", "stage-1 loc.")
    cell = lambda v: "—" if v is None else f"{v['mean']:.1f} ± {v['sd']:.1f}"  # noqa: E731
    out = io.StringIO()
    out.write("\n**Across seeds (mean ± sd)**\n\n| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n")
    for e in summary:
        cells = (e["run"], ",".join(map(str, e["seeds"])), cell(e["A_M"]), cell(e["A_F_minus_S"]), cell(e["A_bar"]),
                 cell(e["generality"]), cell(e["locality"]), cell(e["leak_to_new"]), cell(e["stage1_A_old"]),
                 cell(e["stage1_locality"]))
        out.write("| " + " | ".join(cells) + " |\n")
    return out.getvalue()


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the report; returns what it writes to ``finetune_report.json``."""
    args = parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    seeds = _int_list(args.seeds, "--seeds")
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds {args.seeds!r}: give one or more distinct seeds")

    model = kedit.load_model(args.model)
    model_dir = toyworld.checkpoint_dir() if args.model == "toy" else args.model
    world = toyworld.load_world(model_dir)
    num_layers = model.adapter.num_layers
    if not 0 <= args.layer < num_layers:
        raise SystemExit(f"--layer {args.layer}: the model has layers 0..{num_layers - 1}")
    named = {"all": list(range(num_layers)), "none": []}
    sweep_layers = named[args.layers] if args.layers in named else _int_list(args.layers, "--layers")
    for layer in sweep_layers:
        if not 0 <= layer < num_layers:
            raise SystemExit(f"--layers: layer {layer} is out of range 0..{num_layers - 1}")
    deltas = [float(x) for x in args.deltas.split(",") if x.strip()]
    fl = None
    if not args.no_flearning:
        overrides = parse_assignments(get_editor("f-learning").HParams, args.fl_set)
        fl = {"hparams": kedit.resolve_hparams(get_editor("f-learning"), model, None, **overrides),
              "overrides": overrides, "forget_methods": [m for m in args.forget_methods.split(",") if m.strip()]}

    per_seed = 2 + (1 + len(fl["forget_methods"]) if fl else 0)  # ft, ft-mix (+ ft-l on repeats), F-Learning
    planned = ((0 if args.no_defaults else 2) + len(deltas) + per_seed
               + 2 * len([layer for layer in sweep_layers if layer != args.layer])
               + (len(seeds) - 1) * (per_seed + (1 if deltas else 0)))
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows: list[dict] = []
    fact_sets: dict[int, dict] = {}
    chosen_delta = None
    with tqdm(total=planned, desc="finetune report", unit="run") as bar:
        for index, seed in enumerate(seeds):
            facts = FactSets(world, num_modified=args.num_modified, mix_pool=args.mix_pool,
                             num_unmodified=args.num_unmodified, seed=seed)
            fact_sets[seed] = facts.describe()
            report = Report(model, facts, Meter(model, facts, args.score_tokens), seed=seed, primary=index == 0,
                            rows=rows, bar=bar, started=started)
            report.unedited()
            if index > 0:
                comparison_and_flearning(report, args, delta=chosen_delta, fl=fl)
                continue
            where = {"layers": [args.layer], "module": args.module, "lr": args.lr, "num_steps": args.steps}
            if not args.no_defaults:  # the plugin's defaults as published (layer 0, mlp_out, lr 5e-4, δ 5e-4)
                report.run("ft (plugin defaults)", "defaults", "ft", {})
                report.run("ft-l (plugin defaults)", "defaults", "ft-l", {})
            sweep = [report.run(f"ft-l δ={d:g}", "delta_sweep", "ft-l", dict(where, norm_constraint=d)) for d in deltas]
            chosen_delta = best_delta(sweep) if sweep else None
            headline = next((r for r in sweep if r["hparams"]["norm_constraint"] == chosen_delta), None)
            ft_row = report.run("ft", "methods", "ft", where)
            comparison_and_flearning(report, args, delta=chosen_delta, fl=fl, ft_row=ft_row, ftl_row=headline)
            for layer in sweep_layers:
                if layer == args.layer:
                    report.reuse(ft_row, f"ft L{layer}", "layer_sweep")
                    if headline is not None:
                        report.reuse(headline, f"ft-l L{layer}", "layer_sweep")
                    continue
                at = {"layers": [layer], "module": args.module, "lr": args.lr, "num_steps": args.steps}
                report.run(f"ft L{layer}", "layer_sweep", "ft", at)
                if chosen_delta is not None:
                    report.run(f"ft-l L{layer}", "layer_sweep", "ft-l", dict(at, norm_constraint=chosen_delta))

    total = time.perf_counter() - started
    summary = seed_summary(rows)
    meta = toyworld.checkpoint_metadata(model_dir)
    results = {
        "report": "fine-tuning family on the toy fact world (bench/report_finetune.py)",
        "command": " ".join(["python", "bench/report_finetune.py", *(argv if argv is not None else sys.argv[1:])]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seeds": {"seeds": seeds, "full_report_seed": seeds[0],
                  "per_seed": "toyworld.make_records(world, num_modified, seed=seed); fact split and templates from "
                              "random.Random(f'kedit-report-finetune-{seed}'); EditContext(seed=seed) (FT-Mix's "
                              "sampler, F-Learning's LoRA init: forget seed, learn seed + 1)"},
        "delta_choice": {"rule": "best Ā of the δ sweep at the comparison layer, primary seed (ties: smaller δ)",
                         "delta": chosen_delta, "layer": args.layer},
        "flearning_hparams": fl["hparams"].to_dict() if fl else None,
        "facts": fact_sets,
        "model": {"name": args.model, "num_layers": num_layers,
                  "parameters": sum(p.numel() for p in model.model.parameters()),
                  "hidden_size": meta.get("train", {}).get("hidden_size"), "world_sha256": world.sha256,
                  "fingerprint": model.fingerprint()},
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
                        "machine": platform.machine(), "cpu_count": os.cpu_count(), "load_average_start": load_start,
                        "load_average_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "total_seconds": total,
        "summary_over_seeds": summary,
        "runs": rows,
    }
    write_json_atomic(out / "finetune_report.json", results)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in csv_row(row).items()})
    write_text_atomic(out / "finetune_report.csv", buf.getvalue())
    facts0 = fact_sets[seeds[0]]
    title = (f"kedit fine-tuning family on the toy world: {facts0['modified']} modified facts, "
             f"{facts0['unmodified_evaluated']} unmodified evaluated, {num_layers}-layer model, seeds {args.seeds}")
    tables = markdown_tables(rows) + summary_table(summary)
    footer = (f"\nTables above the last: seed {seeds[0]}. FT-L headline δ = {chosen_delta} (best Ā of the sweep at "
              f"layer {args.layer}). {total:.0f} s in all on {args.threads} threads (load average "
              f"{load_start if load_start is None else round(load_start, 2)} at start).\n")
    write_text_atomic(out / "finetune_report.md", f"# {title}\n{tables}{footer}")
    plots = plot_all(rows, summary, out, title)
    print(f"\n# {title}\n{tables}{footer}")
    print("wrote " + ", ".join(str(p) for p in [out / "finetune_report.json", out / "finetune_report.csv",
                                               out / "finetune_report.md", *plots]))
    return results


if __name__ == "__main__":
    main()
