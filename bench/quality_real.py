"""Editing quality on real models: an editor with its shipped per-model defaults (no overrides) on
CounterFact at 100 and 500 edits and zsRE at 1,000 edits, against the goals of the real-models issue.

    python bench/quality_real.py --models smollm2-135m,gemma3-270m --out bench/results/quality

For each model: ``kedit_core.evaluation.run_evaluation`` (the evaluator ``kedit eval`` uses) on the first
500 CounterFact records of ``../shared/data/counterfact_dev.json`` (edits of the first 100 and of all 500,
each from the same base weights) and the first 1,000 zsRE records of ``zsre_dev.json``; C0 from 100k
WikiText tokens (kedit's statistics cache). Each run's full report (``metrics.json``, ``records.csv``,
``metrics.png``, ...) goes to ``OUT/<model>/<dataset>/``; finished phases are kept there, so a run cut
short resumes. The summary (``OUT/quality.json``, ``quality.md``, ``quality.png``) holds every headline
metric before and after, the goals and whether each is met, the resolved hyper-parameters, seeds, seconds
and the machine's load. Models already in the summary and not named by ``--models`` are kept (same method
only), each with the command that produced it, so one model can be run (or re-run) at a time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

GOALS = {  # (dataset, edits) -> checks on (pre, post)
    ("counterfact", 500): [("ES", ">=", 98.0), ("PS", ">=", 90.0), ("NS", "drop<=", 3.0)],
    ("zsre", 1000): [("efficacy", ">=", 95.0), ("specificity", "drop<=", 2.0)],
}
HEADLINE = {"counterfact": ("ES", "PS", "NS", "Score"), "zsre": ("efficacy", "paraphrase", "specificity")}


def check(goal, pre: dict, post: dict) -> dict:
    key, kind, bar = goal
    if kind == ">=":
        value, met = post[key], post[key] is not None and post[key] >= bar
        text = f"{key} {value:.1f} >= {bar:g}"
    else:
        value = None if post[key] is None or pre[key] is None else pre[key] - post[key]
        met = value is not None and value <= bar
        text = f"{key} drop {value:.1f} <= {bar:g} (unedited {pre[key]:.1f})"
    return {"goal": text, "met": bool(met)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--method", default="memit")
    parser.add_argument("--counterfact", default=str(DATA / "counterfact_dev.json"))
    parser.add_argument("--zsre", default=str(DATA / "zsre_dev.json"))
    parser.add_argument("--cf-sizes", default="100,500")
    parser.add_argument("--zsre-sizes", default="1000")
    parser.add_argument("--corpus", default=str(DATA / "wikitext-2-raw" / "wiki.test.raw"))
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a shipped default (the summary records it; the goals are for none)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quality")
    args = parser.parse_args(argv)

    import torch

    import kedit_core as kedit
    from kedit_core.editors import get_editor
    from kedit_core.evaluation import EditPlan, EvalSettings, load_cases, run_evaluation, write_report
    from kedit_core.hparams import parse_assignments
    from kedit_core.stats import CachedCovariance

    overrides = parse_assignments(get_editor(args.method).HParams, args.set)
    command = "python bench/quality_real.py " + " ".join(argv if argv is not None else sys.argv[1:])
    summary = {"command": command, "method": args.method, "seed": args.seed, "overrides": overrides,
               "c0": {"corpus": args.corpus, "tokens": args.tokens},
               "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(),
                           "cpu_count": os.cpu_count()}, "models": {}}
    names = [m for m in args.models.split(",") if m]

    def save(final: bool = False) -> None:
        save_summary(summary, names, args.out, final=final)
    plan_runs = [("counterfact", args.counterfact, [int(x) for x in args.cf_sizes.split(",") if x]),
                 ("zsre", args.zsre, [int(x) for x in args.zsre_sizes.split(",") if x])]
    for name in names:
        model = kedit.load_model(name, device="cpu")
        stats = CachedCovariance(args.corpus, None, tokens=args.tokens, progress=True)
        entry = {"fingerprint": model.fingerprint(), "source": model.source, "command": command,
                 "machine": summary["machine"], "overrides": overrides, "runs": []}
        before = previous_entry(args.out, args.method, name, entry["fingerprint"])
        summary["models"][name] = entry
        for dataset, path, sizes in plan_runs:
            if not sizes:
                continue
            fmt, cases = load_cases(path, limit=max(sizes))
            out = args.out / name / dataset
            load = os.getloadavg()
            start = time.perf_counter()
            result = run_evaluation(model, cases, fmt, plan=EditPlan(method=args.method, overrides=overrides,
                                                                     seed=args.seed, stats=stats,
                                                                     describe_stats=summary["c0"]),
                                    sizes=sizes, settings=EvalSettings(generation=False), out_dir=out,
                                    log=lambda m: print(f"[{name} {dataset}] {m}", file=sys.stderr))
            result["command"] = command
            write_report(result, out)
            entry["hparams"] = result["edit"]["hparams"]
            for run in result["runs"]:
                pre = {k: run["aggregate"]["pre"].get(k) for k in HEADLINE[fmt]}
                post = {k: run["aggregate"]["post"].get(k) for k in HEADLINE[fmt]}
                steps = (run.get("editor_info") or {}).get("value_steps") or []
                row = {"dataset": fmt, "edits": run["num_edits"], "pre": pre, "post": post,
                       "timings": run["timings"], "value_steps_mean": sum(steps) / len(steps) if steps else None,
                       "load_average_at_start": load,
                       "goals": [check(g, pre, post) for g in GOALS.get((fmt, run["num_edits"]), [])],
                       "machine": summary["machine"]}
                row = keep_provenance(row, before)
                entry["runs"].append(row)
                print(f"{name} {fmt} {run['num_edits']:>5}: " + "  ".join(
                    f"{k} {pre[k]:.1f}->{post[k]:.1f}" for k in HEADLINE[fmt]) + "  " +
                    "  ".join(("met: " if g["met"] else "MISSED: ") + g["goal"] for g in row["goals"]),
                    file=sys.stderr)
            seconds = time.perf_counter() - start
            rows = [r for r in entry["runs"] if r["dataset"] == fmt]
            if rows and all(r.get("reloaded") for r in rows) and dataset in before.get("seconds", {}):
                seconds = before["seconds"][dataset]  # nothing measured now: the time it took when it was
            entry.setdefault("seconds", {})[dataset] = seconds
            save()
        del model
    save(final=True)
    print(table(summary))
    return 0


def previous_entry(out: Path, method: str, name: str, fingerprint: str) -> dict:
    """The model's entry in ``out/quality.json`` from an earlier run of the same method and weights ({} if none)."""
    path = out / "quality.json"
    if not path.exists():
        return {}
    previous = json.loads(path.read_text(encoding="utf-8"))
    entry = previous.get("models", {}).get(name, {}) if previous.get("method") == method else {}
    if entry.get("fingerprint") != fingerprint:
        return {}
    return {**entry, "machine": entry.get("machine") or previous.get("machine")}


def keep_provenance(row: dict, before: dict) -> dict:
    """A row the evaluation reloaded from its finished phases (same timings as the earlier run's row) keeps
    the load and machine it was measured under, and says it was reloaded; a row measured now is as it is."""
    for old in before.get("runs", []):
        if (old["dataset"], old["edits"]) == (row["dataset"], row["edits"]) and old.get("timings") == row["timings"]:
            return {**row, "load_average_at_start": old.get("load_average_at_start"),
                    "machine": old.get("machine", before.get("machine")), "reloaded": True}
    return row


def save_summary(summary: dict, names: list, out: Path, *, final: bool) -> None:
    """Write ``out/quality.json`` with the models this run measured plus every other model already there
    (same method). Models often run as parallel processes (one ``--models`` each), so the file is read again
    under a lock at every write: reading it once at the start lost the rows another process wrote since."""
    import fcntl

    from kedit_core.atomic import write_bytes_atomic, write_json_atomic, write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".quality.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = out / "quality.json"
        order = []
        if path.exists():
            previous = json.loads(path.read_text(encoding="utf-8"))
            if previous.get("method") == summary["method"]:
                order = list(previous.get("models", {}))
                for name, entry in previous.get("models", {}).items():
                    if name not in names:
                        entry.setdefault("command", previous.get("command"))
                        entry.setdefault("machine", previous.get("machine"))
                        summary["models"][name] = entry
        # the table keeps its rows where they were; a model new to it goes last
        order += [n for n in summary["models"] if n not in order]
        summary["models"] = {n: summary["models"][n] for n in order if n in summary["models"]}
        write_json_atomic(path, summary)
        if final:
            write_text_atomic(out / "quality.md", table(summary))
            write_bytes_atomic(out / "quality.png", plot(summary))


def table(summary: dict) -> str:
    commands = "; ".join(f"{name}: `{entry.get('command', summary['command'])}`"
                         for name, entry in summary["models"].items())
    lines = [f"{summary['method']} with the shipped defaults; {commands}", "",
             "| model | data | edits | ES | PS | NS | Score | efficacy | paraphrase | specificity | goals |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, entry in summary["models"].items():
        for r in entry["runs"]:
            cells = []
            for key in ("ES", "PS", "NS", "Score", "efficacy", "paraphrase", "specificity"):
                if key in r["post"]:
                    cells.append(f"{r['pre'][key]:.1f} → **{r['post'][key]:.1f}**")
                else:
                    cells.append("")
            goals = "; ".join(("✓ " if g["met"] else "✗ ") + g["goal"] for g in r["goals"]) or "—"
            lines.append(f"| {name} | {r['dataset']} | {r['edits']} | " + " | ".join(cells) + f" | {goals} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    runs = [(name, r) for name, entry in summary["models"].items() for r in entry["runs"]]
    fig, axes = plt.subplots(1, max(1, len(runs)), figsize=(3.3 * max(1, len(runs)), 3.6), squeeze=False)
    for ax, (name, r) in zip(axes[0], runs):
        keys = list(r["post"])
        x = range(len(keys))
        ax.bar([i - 0.2 for i in x], [r["pre"][k] or 0 for k in keys], 0.4, color="#9aa5b1", label="unedited")
        ax.bar([i + 0.2 for i in x], [r["post"][k] or 0 for k in keys], 0.4, color="#2f6fdb", label="edited")
        ax.set_xticks(list(x), [k[:5] for k in keys], fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_title(f"{name}\n{r['dataset']}, {r['edits']} edits", fontsize=9)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


if __name__ == "__main__":
    sys.exit(main())
