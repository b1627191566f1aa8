"""Why does a batch of zsRE edits miss the efficacy goal? Splits one ``kedit eval`` zsRE report's edited
records by what could stop an edit from taking:

1. **subjects edited more than once in the batch.** MEMIT writes every edit at its subject's last token, so
   records that share a subject share a key; when they ask for different answers (the same question with two
   targets, or two questions about one subject) one key must map to two values and the least-squares solve
   can satisfy at most a compromise. zsRE dev has many such records (``USS Leedstown`` is rewritten to four
   builders).
2. **values that never reached their target.** The value optimisation's last loss per request (per-token NLL
   of the target plus the KL and decay terms, from the report's ``editor_info``): a value whose loss stayed
   high asks the solve for a residual that does not produce the target even if written exactly.
3. what is left, unique subjects with converged values: the share the solve itself loses (spreading one
   residual over the layers against C0, crowding among the batch's keys).

Reads the report (``OUT/<model>/zsre/metrics.json`` of ``bench/quality_real.py`` or ``kedit eval --out``)
and the zsRE file it was run on; writes JSON and a PNG::

    python bench/diag_zsre_misses.py --report bench/results/quality/smollm2-135m/zsre/metrics.json \\
        --data ../shared/data/zsre_dev.json --out bench/results/quality/smollm2-135m/zsre/misses
"""
from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
# A value whose last loss (NLL per target token + KL + decay) is below this gives its target a geometric-mean
# token probability above exp(-0.5) ~ 0.6 even before the other terms: converged enough for top-1 answers.
CONVERGED_LOSS = 0.5


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.fmean(values) if values else None


def _group(records: list[dict]) -> dict:
    efficacy = [r["efficacy"] for r in records]
    return {"records": len(records), "efficacy": _mean(efficacy),
            "efficacy_full": _mean([100.0 * (e == 100.0) for e in efficacy]),
            "paraphrase": _mean(r["paraphrase"] for r in records)}


def split(report: dict, data: list[dict], num_edits: int | None = None, converged_loss: float = CONVERGED_LOSS) -> dict:
    runs = report["runs"]
    run = next((r for r in runs if num_edits in (None, r["num_edits"])), None)
    if run is None:
        raise SystemExit(f"diag_zsre_misses: error: the report has no run of {num_edits} edits "
                         f"(it has {[r['num_edits'] for r in runs]})")
    info = run.get("editor_info") or {}
    losses, steps = info.get("value_final_loss"), info.get("value_steps")
    n = run["num_edits"]
    if not losses or len(losses) != n:
        raise SystemExit("diag_zsre_misses: error: the report's editor_info has no value_final_loss per edit "
                         f"(expected {n}); it needs a MEMIT-family edit in its fast mode")
    max_steps = report["edit"]["hparams"].get("v_num_grad_steps")
    by_subject = defaultdict(list)
    for i in range(n):
        by_subject[data[i]["subject"]].append(i)
    rows = []
    for i, rec in enumerate(run["records"][:n]):
        if rec["case_id"] != i:
            raise SystemExit(f"diag_zsre_misses: error: record {i} of the report has case_id {rec['case_id']}; "
                             "the split expects the first records of the data file in order")
        group = by_subject[data[i]["subject"]]
        others = [data[j] for j in group if j != i]
        rows.append({
            "index": i, "subject": data[i]["subject"], "efficacy": rec["post"]["metrics"]["efficacy"],
            "paraphrase": rec["post"]["metrics"]["paraphrase"], "pre_efficacy": rec["pre"]["metrics"]["efficacy"],
            "value_loss": float(losses[i]), "value_steps": int(steps[i]) if steps else None,
            "shares_subject": bool(others),
            "conflicting_target": any(o["alt"] != data[i]["alt"] for o in others),
        })
    converged = [r["value_loss"] < converged_loss for r in rows]
    groups = {
        "all": rows,
        "shared subject": [r for r in rows if r["shares_subject"]],
        "unique subject": [r for r in rows if not r["shares_subject"]],
        "value converged": [r for r, c in zip(rows, converged) if c],
        "value not converged": [r for r, c in zip(rows, converged) if not c],
        "unique subject, value converged": [r for r, c in zip(rows, converged) if c and not r["shares_subject"]],
        "unique subject, value not converged": [r for r, c in zip(rows, converged)
                                                if not c and not r["shares_subject"]],
        "shared subject, value converged": [r for r, c in zip(rows, converged) if c and r["shares_subject"]],
    }
    # Points of overall efficacy lost (against 100) by each disjoint class, so the classes add up.
    lost = {}
    for name in ("shared subject", "unique subject, value not converged", "unique subject, value converged"):
        lost[name] = sum(100.0 - r["efficacy"] for r in groups[name]) / n
    loss_values = sorted(r["value_loss"] for r in rows)
    return {
        "num_edits": n, "converged_loss": converged_loss, "max_value_steps": max_steps,
        "subjects": len(by_subject), "subjects_edited_more_than_once": sum(len(g) > 1 for g in by_subject.values()),
        "records_with_a_conflicting_target": sum(r["conflicting_target"] for r in rows),
        "value_loss_quantiles": {q: loss_values[min(len(loss_values) - 1, int(q * (len(loss_values) - 1) + 0.5))]
                                 for q in (0.5, 0.9, 0.99)},
        "values_at_the_step_limit": (sum(r["value_steps"] is not None and max_steps is not None
                                         and r["value_steps"] >= max_steps - 1 for r in rows)),
        "groups": {name: _group(g) for name, g in groups.items()},
        "efficacy_points_lost": lost,
        "records": rows,
    }


def plot(result: dict, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, scatter) = plt.subplots(1, 2, figsize=(12, 4.6))
    names = ["all", "unique subject", "shared subject", "value converged", "value not converged",
             "unique subject, value converged"]
    values = [result["groups"][k]["efficacy"] or 0 for k in names]
    counts = [result["groups"][k]["records"] for k in names]
    ypos = range(len(names))
    bars.barh(ypos, values, color=["#555"] + ["#4c72b0"] * 2 + ["#55a868"] * 2 + ["#c44e52"])
    bars.set_yticks(list(ypos), [f"{k} ({c})" for k, c in zip(names, counts)])
    bars.invert_yaxis()
    bars.axvline(95, color="k", ls="--", lw=1)
    bars.text(95, len(names) - 0.4, " goal 95", va="bottom", fontsize=8)
    for y, v in zip(ypos, values):
        bars.text(v + 0.5, y, f"{v:.1f}", va="center", fontsize=8)
    bars.set_xlim(0, 110)
    bars.set_xlabel("efficacy after the edit (token top-1, %)")
    rows = result["records"]
    for shared, colour, label in ((False, "#4c72b0", "unique subject"), (True, "#dd8452", "shared subject")):
        pts = [r for r in rows if r["shares_subject"] == shared]
        scatter.scatter([max(r["value_loss"], 1e-3) for r in pts], [r["efficacy"] for r in pts], s=8, alpha=0.5,
                        color=colour, label=f"{label} ({len(pts)})")
    scatter.set_xscale("log")
    scatter.axvline(result["converged_loss"], color="k", ls="--", lw=1)
    scatter.set_xlabel("value optimisation's last loss (log)")
    scatter.set_ylabel("efficacy after the edit (%)")
    scatter.legend(fontsize=8, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", required=True, help="a zsRE metrics.json of kedit eval / quality_real.py")
    parser.add_argument("--data", default=str(DATA / "zsre_dev.json"))
    parser.add_argument("--num-edits", type=int, default=None, help="which run of the report (default: its first)")
    parser.add_argument("--converged-loss", type=float, default=CONVERGED_LOSS,
                        help="a value whose last loss is below this counts as converged")
    parser.add_argument("--out", required=True, help="directory for misses.json and misses.png")
    args = parser.parse_args(argv)
    report = json.loads(Path(args.report).read_text(encoding="utf-8"))
    if report.get("format") != "zsre":
        parser.error(f"{args.report} is a {report.get('format')!r} report, not zsRE")
    data = json.loads(Path(args.data).read_text(encoding="utf-8"))
    result = split(report, data, args.num_edits, args.converged_loss)
    from kedit_core.atomic import atomic_path, write_json_atomic

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python bench/diag_zsre_misses.py", *(argv if argv is not None else sys.argv[1:])])
    write_json_atomic(out / "misses.json", {"command": command, "report": args.report, "data": args.data,
                                            "model": report["model"].get("alias") or report["model"]["source"],
                                            **result})
    title = (f"{report['model'].get('alias') or 'model'}: {result['num_edits']} zsRE edits ({report['edit']['editor']}),"
             " efficacy by subject sharing and value convergence")
    with atomic_path(out / "misses.png") as tmp:
        Path(tmp).write_bytes(plot(result, title))
    print(f"{'group':38} {'records':>7} {'efficacy':>8} {'all tokens':>10} {'paraphrase':>10}")
    for name, g in result["groups"].items():
        fmt = lambda v: f"{v:.1f}" if v is not None else "-"  # noqa: E731
        print(f"{name:38} {g['records']:7d} {fmt(g['efficacy']):>8} {fmt(g['efficacy_full']):>10} "
              f"{fmt(g['paraphrase']):>10}")
    print("efficacy points lost against 100: " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                          result["efficacy_points_lost"].items()))
    print(f"subjects edited more than once: {result['subjects_edited_more_than_once']} of {result['subjects']}; "
          f"values at the step limit: {result['values_at_the_step_limit']}; "
          f"value loss median/p90/p99: {', '.join(f'{v:.3f}' for v in result['value_loss_quantiles'].values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
