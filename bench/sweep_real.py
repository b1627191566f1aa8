"""Hyper-parameter sweep of one editor on a real model: the evidence behind the per-model defaults that
ship in ``plugins/<editor>/hparams`` (their ``index.json`` entries name the command and results file).

Every grid point edits the first ``--n`` records of a CounterFact or zsRE file from the same base weights,
through ``kedit_core.evaluation.run_evaluation`` (the evaluator ``kedit eval`` uses), and records the
headline metrics, the edit's phase timings and the resolved hyper-parameters. C0 comes from
``--corpus`` (``--tokens`` tokens) through kedit's statistics cache, computed once for all points. The
unedited model is evaluated once. Finished points are kept (``OUT/points/<slug>/``) and skipped when
the same command runs again, so a sweep cut short resumes.

    python bench/sweep_real.py --model smollm2-135m --method memit --n 100 \\
        --grid '{"layers": [[3,4,5,6,7], [5,6,7,8,9]], "mom2_update_weight": [2000, 15000]}' \\
        --set v_num_grad_steps=25 --out bench/results/hparams/smollm2-135m/memit

``--values-dir DIR`` keeps the MEMIT family's value batches in one store shared by all points, so a grid over
how the values are carried into the weights (λ, the solver) optimises each value once (a grid that changes
the values, such as the layers or the value steps, computes each point's own beside them).

Writes ``OUT/sweep.json`` (every point: settings, metrics before/after, seconds), ``OUT/sweep.csv`` and
``OUT/sweep.png`` (Score per point; zsRE: efficacy/paraphrase/specificity).
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
HEADLINE = {"counterfact": ("ES", "PS", "NS", "Score"), "zsre": ("efficacy", "paraphrase", "specificity")}


def grid_points(grid: dict) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def slug(point: dict) -> str:
    text = json.dumps(point, sort_keys=True)
    short = "_".join(f"{k}={v}" for k, v in sorted(point.items())).replace(" ", "")
    short = "".join(c if c.isalnum() or c in "=_.,-" else "" for c in short)[:80]
    return f"{short}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--method", required=True)
    parser.add_argument("--data", default=str(DATA / "counterfact_dev.json"))
    parser.add_argument("--n", type=int, default=50, help="records edited per point")
    parser.add_argument("--grid", required=True, help="JSON object: hyper-parameter -> list of values")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="fixed override for every point (JSON value)")
    parser.add_argument("--corpus", default=str(DATA / "wikitext-2-raw" / "wiki.test.raw"))
    parser.add_argument("--tokens", type=int, default=100_000, help="C0 tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--values-dir", type=Path, default=None,
                        help="keep value batches here and share them between points (MEMIT family): a grid over "
                             "how values are carried into the weights (λ) optimises each value once; kept afterwards")
    args = parser.parse_args(argv)

    import torch

    import kedit_core as kedit
    from kedit_core.editors import get_editor
    from kedit_core.evaluation import EditPlan, EvalSettings, run_evaluation
    from kedit_core.evaluation.datasets import load_cases
    from kedit_core.hparams import parse_assignments
    from kedit_core.stats import CachedCovariance

    if args.threads:
        torch.set_num_threads(args.threads)
    editor_cls = get_editor(args.method)
    fixed = parse_assignments(editor_cls.HParams, args.set)
    grid = json.loads(args.grid)
    points = grid_points(grid)
    model = kedit.load_model(args.model, device="cpu")
    fmt, cases = load_cases(args.data, limit=args.n)
    stats = None
    if getattr(editor_cls, "uses_covariance", False):
        stats = CachedCovariance(args.corpus, None, tokens=args.tokens, progress=True)
    settings = EvalSettings(generation=False, progress=True)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python bench/sweep_real.py " + " ".join(a if " " not in a and "{" not in a else f"'{a}'"
                                                       for a in (argv if argv is not None else sys.argv[1:]))
    rows, first_partial = [], None
    for i, point in enumerate(points):
        out = args.out / "points" / slug(point)
        if first_partial is not None and not (out / "partial" / "pre.json").exists():
            (out / "partial").mkdir(parents=True, exist_ok=True)   # the unedited model's scores: the same for all
            shutil.copy(first_partial, out / "partial" / "pre.json")
        print(f"[{i + 1}/{len(points)}] {point}", file=sys.stderr)
        overrides = {**fixed, **point}
        start = time.perf_counter()
        load = os.getloadavg()
        result = run_evaluation(model, cases, fmt, plan=EditPlan(method=args.method, overrides=overrides, seed=args.seed,
                                                                 stats=stats, describe_stats={"corpus": args.corpus,
                                                                                              "tokens": args.tokens},
                                                                 values_dir=args.values_dir),
                                sizes=[len(cases)], settings=settings, out_dir=out, log=lambda m: print(m, file=sys.stderr))
        first_partial = first_partial or out / "partial" / "pre.json"
        run = result["runs"][0]
        row = {"point": point, "overrides": overrides, "hparams": result["edit"]["hparams"],
               "pre": {k: run["aggregate"]["pre"].get(k) for k in HEADLINE[fmt]},
               "post": {k: run["aggregate"]["post"].get(k) for k in HEADLINE[fmt]},
               "timings": run["timings"], "wall_seconds": time.perf_counter() - start, "load_average_at_start": load}
        info = run.get("editor_info") or {}
        steps = info.get("value_steps")
        if steps:
            row["value_steps_mean"] = sum(steps) / len(steps)
        if info.get("values_resumed"):
            row["values_resumed"] = info["values_resumed"]
        rows.append(row)
        print("   " + "  ".join(f"{k} {row['pre'][k]:.1f}->{row['post'][k]:.1f}" for k in HEADLINE[fmt]
                                if row['post'][k] is not None), file=sys.stderr)
    report = {"command": command, "model": {"name": args.model, "fingerprint": model.fingerprint(), **model.info},
              "method": args.method, "data": args.data, "format": fmt, "n": len(cases), "seed": args.seed,
              "grid": grid, "fixed": fixed, "c0": {"corpus": args.corpus, "tokens": args.tokens},
              "values_dir": None if args.values_dir is None else str(args.values_dir),
              "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                          "cpu_count": os.cpu_count()}, "points": rows}
    from kedit_core.atomic import write_bytes_atomic, write_json_atomic

    write_json_atomic(args.out / "sweep.json", report)
    keys = HEADLINE[fmt]
    lines = ["point," + ",".join(f"pre_{k},post_{k}" for k in keys) + ",edit_seconds"]
    for r in rows:
        lines.append(json.dumps(r["point"], sort_keys=True).replace(",", ";") + "," + ",".join(
            f"{r['pre'][k]},{r['post'][k]}" for k in keys) + f",{r['timings'].get('edit', 0):.1f}")
    write_bytes_atomic(args.out / "sweep.csv", ("\n".join(lines) + "\n").encode())
    write_bytes_atomic(args.out / "sweep.png", plot(report))
    print(f"wrote {args.out / 'sweep.json'}, sweep.csv, sweep.png", file=sys.stderr)
    return 0


def plot(report: dict) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    keys = HEADLINE[report["format"]]
    rows = report["points"]
    labels = ["\n".join(f"{k}={v}" for k, v in r["point"].items()) for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows) + 2), 4.2))
    width = 0.8 / len(keys)
    for j, key in enumerate(keys):
        ax.bar([i + (j - (len(keys) - 1) / 2) * width for i in range(len(rows))],
               [r["post"][key] or 0 for r in rows], width, label=f"{key} after")
        pre = rows[0]["pre"][key] if rows else None
        if pre is not None:
            ax.axhline(pre, color=f"C{j}", ls="--", lw=0.8)
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_ylim(0, 105)
    ax.set_ylabel("% (dashed: unedited)")
    ax.legend(fontsize=7, ncol=len(keys), loc="lower right")
    ax.set_title(f"{report['method']} on {report['model']['name']}: {report['n']} {report['format']} edits per point",
                 fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


if __name__ == "__main__":
    sys.exit(main())
