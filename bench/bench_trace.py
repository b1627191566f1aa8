"""Causal tracing speed: the batched engine (``kedit trace``) against ROME's one-forward-per-cell loop.

1. Runs ``kedit trace`` on the first ``--n`` facts of ``--facts`` the model predicts (a subprocess, so
   the results directory is exactly what the command writes), and reads from its ``trace.json`` the
   forward passes it made and those ROME's loop makes on the same facts (counted, per fact and kind:
   T x L cells + a prediction + a corrupted baseline).
2. Runs ROME's loop (``--per-cell``, the reference engine) on the first ``--rome-facts`` of those facts,
   checks that it gives the same probabilities, and times it against the batched engine on the same facts.
   Timing ROME's loop on all facts would take hours on 2 cores, so its time for all of them is
   extrapolated from the measured seconds per (forward pass x token) — said so in the output.

Run under the CPU lock, e.g.::

    flock /work/cpu.lock .venv/bin/python bench/bench_trace.py --model smollm2-135m \\
        --facts /work/shared/data/known_1000.json --n 100 --out bench/results/trace/smollm2-135m
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--facts", required=True, type=Path)
    parser.add_argument("--n", type=int, default=100, help="facts the model predicts to trace (default 100)")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--rome-facts", type=int, default=3, help="facts to time ROME's per-cell loop on")
    parser.add_argument("--out", required=True, type=Path, help="kedit trace's output directory")
    parser.add_argument("--fresh", action="store_true", help="retrace every fact (else finished ones are reused, "
                                                              "and their recorded seconds reported)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more kedit trace options")
    args = parser.parse_args()

    import torch

    report: dict = {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    command = [sys.executable, "-m", "kedit_core.cli.main", "trace", "--model", args.model, "--facts",
               str(args.facts), "--n", str(args.n), "--samples", str(args.samples), "--window", str(args.window),
               "--out", str(args.out), "--no-progress", *(["--fresh"] if args.fresh else []), *args.extra]
    report["loadavg_before"] = os.getloadavg()
    started = time.perf_counter()
    subprocess.run(command, check=True)
    report["kedit_trace_wall_seconds"] = time.perf_counter() - started
    report["loadavg_after_batched"] = os.getloadavg()
    report["command"] = "kedit " + " ".join(command[3:])
    summary = json.loads((args.out / "trace.json").read_text(encoding="utf-8"))

    from kedit_core.causal_trace import TraceSettings, load_facts, trace_fact
    from kedit_core.causal_trace.run import FACT_DIR
    from kedit_core.models import load_model

    records = [json.loads(p.read_text(encoding="utf-8")) for p in sorted((args.out / FACT_DIR).glob("*.json"))]
    traced = [r for r in records if r["status"] == "traced"][:args.n]
    settings = TraceSettings(**{k: v for k, v in summary["settings"].items() if k in TraceSettings.__dataclass_fields__
                                and k != "kinds"}, kinds=tuple(summary["settings"]["kinds"]))
    noise_scale = summary["settings"]["noise_scale"]

    # ROME's loop on the first facts, against the batched engine on the same facts (same process)
    model = load_model(args.model, dtype=summary["model"]["dtype"], device="cpu")
    facts = {f.index: f for f in load_facts(args.facts)}
    rome_rows = []
    for record in traced[:args.rome_facts]:
        fact = facts[record["index"]]
        t0 = time.perf_counter()
        batched = trace_fact(model, fact, replace(settings, mode="batched"), noise_scale)
        t1 = time.perf_counter()
        rome = trace_fact(model, fact, replace(settings, mode="per_cell"), noise_scale)
        t2 = time.perf_counter()
        diff = max(float(np.abs(np.asarray(batched["scores"][k]) - np.asarray(rome["scores"][k])).max())
                   for k in settings.kinds)
        rome_rows.append({"index": fact.index, "tokens": len(rome["tokens"]), "batched_seconds": t1 - t0,
                          "batched_forwards": batched["forwards"], "rome_seconds": t2 - t1,
                          "rome_forwards": rome["forwards"], "max_abs_probability_difference": diff,
                          "loadavg": os.getloadavg()})
        print(f"fact {fact.index}: batched {t1 - t0:.1f} s / {batched['forwards']} forwards, ROME loop "
              f"{t2 - t1:.1f} s / {rome['forwards']} forwards, max |dp| {diff:.2e}", flush=True)

    passes = summary["forward_passes"]
    n_traced = summary["counts"]["traced"]
    batched_seconds = summary["seconds"]["traced_facts"]
    # ROME's seconds for every traced fact, from its measured seconds per forward-token on the subset
    per_forward_token = sum(r["rome_seconds"] for r in rome_rows) / sum(r["rome_forwards"] * r["tokens"]
                                                                         for r in rome_rows)
    rome_estimate = sum(r["rome_forwards"] * len(r["tokens"]) for r in traced) * per_forward_token
    report.update({
        "model": summary["model"], "facts": str(args.facts), "traced": n_traced,
        "not_predicted": summary["counts"]["not_predicted"], "facts_examined": summary["counts"]["facts_examined"],
        "layers": summary["num_layers"], "samples": settings.samples, "window": settings.window,
        "mean_prompt_tokens": float(np.mean([len(r["tokens"]) for r in traced])),
        "batched": {"forward_passes": passes["traced_facts"], "seconds": batched_seconds,
                    "seconds_per_fact": batched_seconds / n_traced},
        "rome_loop": {"forward_passes_counted": passes["rome_loop_traced_facts"],
                      "seconds_estimated": rome_estimate,
                      "estimate_rule": f"measured on {len(rome_rows)} facts: {per_forward_token:.3e} s per "
                                       "(forward pass x prompt token), times each traced fact's forwards x tokens"},
        "forward_ratio": passes["rome_loop_traced_facts"] / passes["traced_facts"],
        "seconds_ratio_estimated": rome_estimate / batched_seconds,
        "same_facts": {"facts": rome_rows,
                       "seconds_ratio": sum(r["rome_seconds"] for r in rome_rows)
                       / sum(r["batched_seconds"] for r in rome_rows),
                       "forward_ratio": sum(r["rome_forwards"] for r in rome_rows)
                       / sum(r["batched_forwards"] for r in rome_rows)},
        "loadavg_end": os.getloadavg(),
    })
    path = args.out / "bench.json"
    path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"\n{n_traced} facts traced ({report['not_predicted']} skipped: not predicted), {report['layers']} layers, "
          f"{settings.samples} noise samples, mean {report['mean_prompt_tokens']:.1f} tokens")
    print(f"batched : {passes['traced_facts']:>8} forward passes, {batched_seconds:8.1f} s "
          f"({batched_seconds / n_traced:.2f} s/fact)")
    print(f"ROME    : {passes['rome_loop_traced_facts']:>8} forward passes, {rome_estimate:8.1f} s (estimated)")
    print(f"ratio   : {report['forward_ratio']:.1f}x fewer forward passes; {report['seconds_ratio_estimated']:.1f}x "
          f"less time (estimated); measured on the same {len(rome_rows)} facts: "
          f"{report['same_facts']['seconds_ratio']:.1f}x less time, {report['same_facts']['forward_ratio']:.1f}x "
          "fewer passes")
    print(f"load average before/after: {report['loadavg_before']} / {report['loadavg_end']}; written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
