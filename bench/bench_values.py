"""Value optimisation on a real model (SmolLM2-135M, MEMIT layers 5-9, λ 15000, 20 value steps, CPU):

``--early-stop``: most-probable early stopping (ENCORE: a request stops once its new target is the argmax
at every target position of every rewriting prompt) against the published loop's stopping rule, in kedit's
fast mode on the first ``--requests`` CounterFact and zsRE records: value steps per request, seconds per
phase, and the edit's quality measured by kedit's evaluator on the same records (CounterFact ES/PS/NS,
zsRE efficacy/paraphrase/specificity).

``--batch-sweep``: the same CounterFact requests' value optimisation with batches capped at several token
counts (``ValueSettings.batch_tokens``) and with all requests in one batch: seconds per step and the
process's peak resident memory, each setting in its own process; ``--sweep-steps`` value steps are enough
(each step costs the same). This is what ``CPU_BATCH_TOKENS`` in ``kedit_core/editing/values.py`` is set
from.

Reuses ``bench_vs_easyedit.py``'s prepared inputs (model, context templates, C0 corpus and kedit's C0
cache) in ``--work-dir``, preparing them first if needed; each run is kept there, so an interrupted
benchmark resumes. Hold the CPU lock::

    flock /work/cpu.lock .venv/bin/python bench/bench_values.py --early-stop --batch-sweep --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_vs_easyedit as vs  # noqa: E402

ZSRE = Path("/work/shared/data/zsre_dev.json")
ZSRE_FALLBACK = vs.REPO / "tests" / "fixtures" / "data" / "zsre_dev.json"
QUALITY = {"counterfact": ("ES", "PS", "NS"), "zsre": ("efficacy", "paraphrase", "specificity")}


def data_file(dataset: str, inputs: dict) -> Path:
    if dataset == "counterfact":
        return Path(inputs["requests_file"])
    return ZSRE if ZSRE.exists() else ZSRE_FALLBACK


def run_early_stop(args, work: Path, dataset: str, early_stop: bool) -> dict:
    import torch

    from kedit_core import EditContext, compute_edit
    from kedit_core.evaluation import EvalSettings, aggregate, evaluate_cases, load_cases

    inputs = vs.read_json(work / "inputs.json")
    loaded = vs.kedit_model(inputs)
    fmt, cases = load_cases(data_file(dataset, inputs), limit=args.requests)
    context = EditContext(seed=0, stats=vs.kedit_covariance(inputs, work), context_templates=inputs["context_templates"],
                          progress=True)
    hparams = vs.kedit_hparams(inputs, {"mode": "fast", "early_stop_most_probable": early_stop})
    start, cpu = time.perf_counter(), time.process_time()
    result = compute_edit(loaded, [c.request for c in cases], "memit", context=context, **hparams)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    settings = EvalSettings(generation=False, progress=True)
    with result.deltas.apply(loaded.model):
        post = aggregate(evaluate_cases(loaded, cases, fmt, settings), fmt)
    pre = aggregate(evaluate_cases(loaded, cases, fmt, settings), fmt)
    steps = result.info["value_steps"]
    return {"dataset": dataset, "format": fmt, "records": len(cases), "early_stop_most_probable": early_stop,
            "seconds_end_to_end": seconds, "cpu_seconds_end_to_end": cpu, "phases": dict(result.timings), "value_steps_mean": sum(steps) / len(steps),
            "value_steps": steps, "value_batches": result.info.get("value_batches"),
            "quality": {m: post.get(m) for m in QUALITY[dataset]}, "quality_unedited": {m: pre.get(m)
                                                                                         for m in QUALITY[dataset]},
            "aggregate": post, "threads": torch.get_num_threads()}


def run_sweep(args, work: Path, cap: int | None) -> dict:
    """One batch setting's value optimisation (``cap``: tokens per batch; None: all requests at once)."""
    import torch

    from kedit_core.editing import Injection, ValueSettings, flatten_templates, optimise_values_batched, value_rows
    from kedit_core.requests import EditRequest

    inputs = vs.read_json(work / "inputs.json")
    loaded = vs.kedit_model(inputs)
    hp = inputs["hparams"]
    requests = [EditRequest(**r) for r in inputs["requests"]][: args.requests]
    rows, lengths = value_rows(loaded.tokenizer, requests, flatten_templates(inputs["context_templates"]),
                               fact_token="subject_last", rule="offsets")
    z_layer = hp["layers"][-1]
    injection = Injection(layer=z_layer, site="block", nll_layer=hp["v_loss_layer"])
    settings = ValueSettings(num_steps=args.sweep_steps, lr=hp["v_lr"], weight_decay=hp["v_weight_decay"],
                             clamp_norm_factor=hp["clamp_norm_factor"], kl_factor=hp["kl_factor"],
                             batch_requests=len(requests) if cap is None else None, batch_tokens=cap,
                             memory_bytes=10**12)   # the cap alone decides
    rss_model = vs.PeakMemory.rss()
    with vs.PeakMemory() as peak:
        start, cpu = time.perf_counter(), time.process_time()
        result = optimise_values_batched(loaded, rows, lengths, settings, injection, progress=True)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    steps = sum(result.steps)
    return {"batch_tokens": cap, "requests": len(requests), "tokens": sum(len(i) for i in rows.ids),
            "value_steps": args.sweep_steps, "adam_steps_total": steps, "seconds": seconds,
            "seconds_per_request_step": seconds / max(steps, 1), "cpu_seconds": cpu,
            "cpu_seconds_per_request_step": cpu / max(steps, 1), "batches": result.batches, "plan": result.plan,
            "rss_after_model_load_gib": vs.gib(rss_model), "peak_rss_gib": vs.gib(peak.peak),
            "peak_over_model_gib": vs.gib(peak.peak - rss_model), "threads": torch.get_num_threads()}


def counterfact_from_vs_easyedit(work: Path) -> list[dict]:
    """The CounterFact runs with and without early stopping that bench_vs_easyedit.py made (its kedit-fast
    and kedit-fast-early-stop stages, scored by its evaluate stage), in this benchmark's format."""
    runs = []
    evaluate = work / "stage-evaluate.json"
    if not evaluate.exists():
        return runs
    metrics = vs.read_json(evaluate)["result"]["metrics"]
    for stage, on in (("kedit-fast", False), ("kedit-fast-early-stop", True)):
        path = work / f"stage-{stage}.json"
        if not path.exists() or stage not in metrics:
            continue
        r = vs.read_json(path)["result"]
        runs.append({"dataset": "counterfact", "early_stop_most_probable": on, "source": f"bench_vs_easyedit {stage}",
                     "seconds_end_to_end": r["seconds_end_to_end"], "phases": r["timings_raw"],
                     "value_steps_mean": r["value_steps_mean"], "value_steps": r["value_steps"],
                     "quality": {m: metrics[stage][m] for m in QUALITY["counterfact"]},
                     "quality_unedited": {m: metrics["unedited"][m] for m in QUALITY["counterfact"]}})
    return runs


def in_subprocess(args, work: Path, name: str, extra: list[str]) -> dict:
    path = work / f"values-bench-{name}.json"
    if path.exists() and not args.redo:
        print(f"[{name}] done before: {path}")
        return vs.read_json(path)
    print(f"[{name}] running", flush=True)
    load = os.getloadavg()
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--run", name, "--work-dir", str(work),
                    "--requests", str(args.requests), "--threads", str(args.threads), "--sweep-steps",
                    str(args.sweep_steps), *extra], check=True, cwd=str(vs.REPO))
    result = vs.read_json(work / f"values-bench-{name}.result.json")
    result["loadavg_start"], result["loadavg_end"] = load, os.getloadavg()
    result["kedit_commit"] = vs.git_commit(vs.REPO)
    vs.write_json(path, result)
    return result


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (["early_stop"] if doc.get("early_stop") else []) + (["batch_sweep"] if doc.get("batch_sweep") else [])
    fig, axes = plt.subplots(1, len(panels) * 2, figsize=(5 * len(panels) * 2, 3.8), squeeze=False)
    axes = list(axes[0])
    if "early_stop" in panels:
        ax_q, ax_t = axes.pop(0), axes.pop(0)
        labels, off, on = [], [], []
        for dataset, metrics in QUALITY.items():
            runs = {r["early_stop_most_probable"]: r for r in doc["early_stop"] if r["dataset"] == dataset}
            if len(runs) < 2:
                continue
            for m in metrics:
                labels.append(f"{dataset[:2]} {m[:4]}")
                off.append(runs[False]["quality"][m])
                on.append(runs[True]["quality"][m])
        xs = range(len(labels))
        ax_q.bar([x - 0.2 for x in xs], off, 0.4, label="published stop", color="#999999")
        ax_q.bar([x + 0.2 for x in xs], on, 0.4, label="most-probable stop", color="#1f77b4")
        ax_q.set_xticks(list(xs), labels, fontsize=7)
        ax_q.set_title("quality (x100)")
        ax_q.legend(fontsize=7)
        names, secs, colours = [], [], []
        for r in doc["early_stop"]:
            names.append(f"{r['dataset'][:2]} {'on' if r['early_stop_most_probable'] else 'off'}\n"
                         f"{r['value_steps_mean']:.1f} steps")
            secs.append(r["phases"]["values"])
            colours.append("#1f77b4" if r["early_stop_most_probable"] else "#999999")
        ax_t.bar(names, secs, color=colours)
        ax_t.set_title("values phase, seconds")
        ax_t.tick_params(axis="x", labelsize=7)
    if "batch_sweep" in panels:
        ax_s, ax_m = axes.pop(0), axes.pop(0)
        runs = doc["batch_sweep"]
        names = [("all" if r["batch_tokens"] is None else str(r["batch_tokens"])) for r in runs]
        ax_s.bar(names, [r["seconds_per_request_step"] * 1000 for r in runs], color="#1f77b4")
        ax_s.set_title("ms per request-step vs tokens per batch")
        ax_m.bar(names, [r["peak_rss_gib"] for r in runs], color="#ff7f0e")
        ax_m.set_title("peak RSS (GiB)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--early-stop", action="store_true", help="early stopping on/off, CounterFact and zsRE")
    parser.add_argument("--batch-sweep", action="store_true", help="seconds and memory per value batch size")
    parser.add_argument("--datasets", default="counterfact,zsre", help="--early-stop: counterfact and/or zsre")
    parser.add_argument("--caps", default="all,4096,2048,1024", help="--batch-sweep: tokens per batch")
    parser.add_argument("--sweep-steps", type=int, default=5, help="--batch-sweep: value steps per run (default 5)")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", default=str(vs.REPO / "out" / "vs_easyedit"))
    parser.add_argument("--out", default=str(HERE / "results" / "values"))
    parser.add_argument("--redo", action="store_true", help="recompute runs done before")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    parser.add_argument("--on", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cap", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    if args.run:
        vs.set_threads(args.threads)
        if args.run.startswith("early-stop"):
            result = run_early_stop(args, work, args.dataset, bool(args.on))
        else:
            result = run_sweep(args, work, None if args.cap == "all" else int(args.cap))
        vs.write_json(work / f"values-bench-{args.run}.result.json", result)
        return 0
    if not (work / "inputs.json").exists():
        vs.main(["--stages", "prepare,kedit-c0", "--work-dir", str(work), "--threads", str(args.threads)])
    elif not (work / "stage-kedit-c0.json").exists():
        vs.main(["--stages", "kedit-c0", "--work-dir", str(work), "--threads", str(args.threads)])
    doc = {"command": " ".join([sys.executable, *sys.argv]),
           "machine": {"python": platform.python_version(), "threads": args.threads, "cpu_count": os.cpu_count()},
           "inputs": {k: v for k, v in vs.read_json(work / "inputs.json").items() if k in ("model", "hparams",
                                                                                          "context_templates")}}
    lines = []
    if args.early_stop:
        doc["early_stop"] = []
        for dataset in args.datasets.split(","):
            for on in (False, True):
                name = f"early-stop-{dataset}-{'on' if on else 'off'}"
                doc["early_stop"].append(in_subprocess(args, work, name, ["--dataset", dataset, "--on", str(int(on))]))
        lines.append(f"{'run':<24s}{'steps/request':>14s}{'values s':>10s}{'keys s':>9s}{'total s':>9s}  quality")
        for r in doc["early_stop"]:
            q = "  ".join(f"{m} {v:.1f}" for m, v in r["quality"].items())
            lines.append(f"{r['dataset'] + (' on' if r['early_stop_most_probable'] else ' off'):<24s}"
                         f"{r['value_steps_mean']:>14.2f}{r['phases']['values']:>10.1f}{r['phases']['keys']:>9.1f}"
                         f"{r['seconds_end_to_end']:>9.1f}  {q}")
    if args.batch_sweep:
        doc["batch_sweep"] = [in_subprocess(args, work, f"sweep-{cap}", ["--cap", cap]) for cap in args.caps.split(",")]
        lines.append(f"{'tokens per batch':<18s}{'batches':>9s}{'s':>8s}{'ms/request-step':>17s}"
                     f"{'CPU ms/request-step':>21s}{'peak RSS GiB':>14s}")
        for r in doc["batch_sweep"]:
            lines.append(f"{'all' if r['batch_tokens'] is None else r['batch_tokens']:<18}{len(r['batches']):>9d}"
                         f"{r['seconds']:>8.1f}{r['seconds_per_request_step'] * 1000:>17.1f}"
                         f"{r.get('cpu_seconds_per_request_step', float('nan')) * 1000:>21.1f}{r['peak_rss_gib']:>14.2f}")
    if args.early_stop and "counterfact" not in args.datasets.split(","):
        cf = counterfact_from_vs_easyedit(work)
        if cf:
            doc["early_stop"] = cf + doc["early_stop"]
            for r in cf:
                q = "  ".join(f"{m} {v:.1f}" for m, v in r["quality"].items())
                lines.append(f"{'counterfact' + (' on' if r['early_stop_most_probable'] else ' off'):<24s}"
                             f"{r['value_steps_mean']:>14.2f}{r['phases']['values']:>10.1f}{r['phases']['keys']:>9.1f}"
                             f"{r['seconds_end_to_end']:>9.1f}  {q}  (bench_vs_easyedit's kedit-fast stages)")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "values.json").exists():   # runs of the other part, kept
        doc = {**{k: v for k, v in vs.read_json(out / "values.json").items() if k in ("early_stop", "batch_sweep")},
               **doc}
        text = ((out / "values.txt").read_text(encoding="utf-8") if not (args.early_stop and args.batch_sweep) else "") \
            + text
    vs.write_json(out / "values.json", doc)
    (out / "values.txt").write_text(text + "\n", encoding="utf-8")
    plot(doc, out / "values.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
