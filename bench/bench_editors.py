"""Benchmark: kedit's fast editor paths against the published loops, ratios side by side.

CPU part (what ``python bench/bench_editors.py`` runs):

1. Value optimisation, the published one-request-at-a-time loop (``compute_z``) against kedit's
   batched optimisation, on a GPT-2-small-shaped random model (12 layers, d = 768, d_ff = 3072,
   vocabulary 50,257), 100 CounterFact requests, MEMIT layers 3-7 (δ at block 7's output), the
   published GPT-2 XL MEMIT settings (20 steps, lr 0.5, ...), MEMIT's 6 context templates. The
   one-at-a-time loop is timed on ``--reference-sample`` requests and scaled to all of them (its cost
   is linear in the number of requests: it runs them one by one); ``--full`` times all of them.
   The sample's results are also compared with the batched ones (relative difference per request).
2. The MEMIT solve for one batch of N = 100 keys: a fresh float64 solve of ``(λC0 + KKᵀ) X = K`` per
   batch (``torch.linalg.solve``, LU, as published; and a fresh Cholesky) against kedit's Woodbury solve
   from C0's cached factor, at d_k = 3072 (GPT-2 small) and 6400 (GPT-2 XL). The one-off factorisation is
   reported separately.

GPU part (``--gpu``; needs CUDA): a GPT-J-shaped random model (28 layers, d = 4096, d_ff = 16384) in
bfloat16, MEMIT layers 3-8 with 1,000 and 10,000 requests, seconds per phase, plus the one-at-a-time loop
on a sample for the ratio.

Arithmetic (``--flops``): how much of a speed-up is there to have at all? Counts the floating-point
operations both value paths execute (``torch.utils.flop_counter``, forward and backward, on
``--flops-requests`` requests of the CPU setup) and the solves' operation counts from their formulas,
so a measured ratio can be read against the ratio of work done (bench_editors_cpu_flops.json).

Results: JSON (and a PNG of the CPU timings) under ``bench/results/``. Wall-clock timings taken on a
machine shared with other jobs are noisy; the ratios are what to compare.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

from kedit_core import ops  # noqa: E402
from kedit_core.editing import (MEMIT_RECIPE, CovarianceFactors, FactorCache, Injection, ValueSettings,  # noqa: E402
                                flatten_templates, generate_context_templates, memit_solve,
                                optimise_values_batched, optimise_values_reference, value_rows)
from kedit_core.requests import load_requests  # noqa: E402

COUNTERFACT = REPO / "tests" / "fixtures" / "data" / "counterfact_dev.json"
# hparams/MEMIT/gpt2-xl.json (kmeng01/memit): the value-optimisation settings.
PUBLISHED = ValueSettings(num_steps=20, lr=0.5, weight_decay=0.5, clamp_norm_factor=0.75, kl_factor=0.0625)


def random_model(family: str, layers: int, hidden: int, vocab: int, dtype, device, *, heads: int | None = None,
                 rotary_dim: int | None = None):
    """A seeded random model built directly on ``device`` (a 6B-parameter model is not initialised on
    the CPU first). ``heads``/``rotary_dim`` give the real head layout (the test configs use 4 heads)."""
    from transformers import AutoModelForCausalLM

    from kedit_core.models import wrap_model
    from kedit_core.testing import test_tokenizer, tiny_config

    config = tiny_config(family, num_layers=layers, hidden_size=hidden, context_length=2048, vocab_size=vocab)
    if heads is not None:
        setattr(config, "n_head" if hasattr(config, "n_head") else "num_attention_heads", heads)
    if rotary_dim is not None:
        config.rotary_dim = rotary_dim
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config).to(dtype)
    return wrap_model(model, test_tokenizer(), source=f"random-{family}-{layers}x{hidden}")


def timed(fn, *args, **kwargs):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def bench_values(args) -> dict:
    model = random_model("gpt2", 12, 768, 50257, torch.float32, "cpu")
    requests = load_requests(COUNTERFACT, limit=args.requests)
    groups = generate_context_templates(model, MEMIT_RECIPE, seed=0)
    templates = flatten_templates(groups)
    rows, lengths = value_rows(model.tokenizer, requests, templates, fact_token="subject_last", rule="offsets")
    injection = Injection(layer=7, site="block", nll_layer=11)  # MEMIT layers 3-7: z at layer 7
    settings = ValueSettings(**{**PUBLISHED.__dict__, "batch_requests": args.requests})
    batched, t_batched = timed(optimise_values_batched, model, rows, lengths, settings, injection, progress=True)
    sample = args.requests if args.full else min(args.reference_sample, args.requests)
    sample_rows, sample_lengths = value_rows(model.tokenizer, requests[:sample], templates,
                                             fact_token="subject_last", rule="offsets")
    reference, t_sample = timed(optimise_values_reference, model, sample_rows, sample_lengths, PUBLISHED, injection,
                                progress=True)
    t_reference = t_sample * args.requests / sample
    diff = ((batched.target[:sample] - reference.target).norm(dim=1) / reference.target.norm(dim=1)).tolist()
    return {
        "model": "GPT-2-small-shaped random (12 x 768, d_ff 3072, vocab 50257), float32, CPU",
        "requests": args.requests, "templates": groups, "rows": len(rows), "settings": PUBLISHED.__dict__,
        "one_at_a_time_seconds": t_reference, "one_at_a_time_measured_requests": sample,
        "one_at_a_time_seconds_measured": t_sample, "batched_seconds": t_batched,
        "speedup": t_reference / t_batched,
        "batched_vs_one_at_a_time_relative_difference": {"max": max(diff), "median": statistics.median(diff)},
        "steps_taken": {"batched_mean": statistics.mean(batched.steps),
                        "one_at_a_time_mean": statistics.mean(reference.steps)},
    }


def count_flops(fn, *args, **kwargs) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def bench_flops(args) -> dict:
    """Operations executed by each value path (the same requests, so the same trajectories) and the
    solves' operation counts; the published/kedit ratios bound what any implementation of the same
    arithmetic can gain at equal efficiency."""
    model = random_model("gpt2", 12, 768, 50257, torch.float32, "cpu")
    groups = generate_context_templates(model, MEMIT_RECIPE, seed=0)
    injection = Injection(layer=7, site="block", nll_layer=11)

    def rows_for(count):
        return value_rows(model.tokenizer, load_requests(COUNTERFACT, limit=count), flatten_templates(groups),
                          fact_token="subject_last", rule="offsets")

    # The published loop's work is per request (it runs them one by one): counted on a sample. The batched
    # path's work per request depends on the batch (how rows share forwards): counted on all --requests.
    rows, lengths = rows_for(args.flops_requests)
    published = count_flops(optimise_values_reference, model, rows, lengths, PUBLISHED, injection)
    rows, lengths = rows_for(args.requests)
    settings = ValueSettings(**{**PUBLISHED.__dict__, "batch_requests": args.requests})
    batched = count_flops(optimise_values_batched, model, rows, lengths, settings, injection)
    per_published, per_batched = published / args.flops_requests, batched / args.requests
    solves = []
    for d_k in (int(x) for x in args.solve_sizes.split(",")):
        n = args.solve_n
        # torch.linalg.solve(λC0 + KKᵀ, K): KKᵀ, LU (2/3 d³), forward+back substitution with N right-hand sides.
        fresh_lu = 2 * d_k * d_k * n + 2 * d_k ** 3 / 3 + 2 * d_k * d_k * n
        # spd_woodbury_solve: two triangular solves (d² N each), ZᵀZ (2 d N²), the N x N Cholesky (N³/3)
        # and its solve applied to d right-hand sides (2 N² d).
        woodbury = 2 * d_k * d_k * n + 2 * d_k * n * n + n ** 3 / 3 + 2 * n * n * d_k
        solves.append({"d_k": d_k, "N": n, "fresh_lu_flops": fresh_lu, "woodbury_flops": woodbury,
                       "flop_ratio": fresh_lu / woodbury})
    return {"values": {"published_counted_requests": args.flops_requests, "batched_counted_requests": args.requests,
                       "flop_ratio": per_published / per_batched,
                       "published_gflops_per_request": per_published / 1e9,
                       "batched_gflops_per_request": per_batched / 1e9},
            "solves": solves}


def bench_solve(d_k: int, n: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(d_k)
    keys_for_c0 = torch.randn(2 * d_k, d_k, generator=g, dtype=torch.float64) * torch.linspace(0.05, 1.0, d_k,
                                                                                                dtype=torch.float64)
    c0 = keys_for_c0.T @ keys_for_c0 / keys_for_c0.shape[0]
    del keys_for_c0
    lam = 15000.0

    class Source:  # a CovarianceSource with one layer
        def prepare(self, model, layers):
            pass

        def moment(self, model, layer):
            from kedit_core.stats import Moment
            return Moment(c0, None, "random")

    class Model:  # what CovarianceFactors reads from a LoadedModel
        device = torch.device("cpu")
        adapter = type("A", (), {"key_size": d_k})()

    factors = CovarianceFactors(Model(), Source(), [0], scale=lam, cache=FactorCache())
    factors.prepare()
    _, t_factor = timed(factors.factor_all)
    fresh_lu, fresh_chol, woodbury, errors = [], [], [], []
    for r in range(repeats):
        k = torch.randn(d_k, n, generator=g, dtype=torch.float64)
        x_lu, t = timed(memit_solve, factors, 0, k, "reference")
        fresh_lu.append(t)
        x_chol, t = timed(memit_solve, factors, 0, k, "direct")
        fresh_chol.append(t)
        x_w, t = timed(memit_solve, factors, 0, k, "woodbury")
        woodbury.append(t)
        errors.append(float((x_w - x_lu).norm() / x_lu.norm()))
    t_lu, t_chol, t_w = statistics.median(fresh_lu), statistics.median(fresh_chol), statistics.median(woodbury)
    return {"d_k": d_k, "N": n, "repeats": repeats, "factor_once_seconds": t_factor,
            "fresh_lu_seconds": t_lu, "fresh_cholesky_seconds": t_chol, "woodbury_seconds": t_w,
            "speedup_vs_lu": t_lu / t_w, "speedup_vs_cholesky": t_chol / t_w,
            "woodbury_vs_lu_relative_error_max": max(errors)}


# GPT-J 6B's shape (28 layers, d = 4096, 16 heads of 256 with rotary_dim 64, d_ff = 16384), MEMIT's
# published GPT-J layers and settings (hparams/MEMIT/EleutherAI_gpt-j-6B.json).
GPTJ_SHAPE = dict(layers=28, hidden=4096, vocab=50400, heads=16, rotary_dim=64)
SMOKE_SHAPE = dict(layers=28, hidden=64, vocab=50400, heads=4, rotary_dim=8)  # same code path, CPU-sized


def bench_gpu(args) -> dict:
    """GPT-J-shaped bf16 MEMIT: seconds per phase for each of ``--gpu-requests``, written after each run."""
    import kedit_core as kedit
    from kedit_core.stats import InMemoryCovariance

    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device (or --device cpu --smoke for a CPU-sized check)")
    shape = SMOKE_SHAPE if args.smoke else GPTJ_SHAPE
    dtype = torch.float32 if args.smoke else torch.bfloat16
    model, t_build = timed(random_model, "gptj", shape["layers"], shape["hidden"], shape["vocab"], dtype, device,
                           heads=shape["heads"], rotary_dim=shape["rotary_dim"])
    layers = [3, 4, 5, 6, 7, 8]
    d_k = model.adapter.key_size
    g = torch.Generator(device=device).manual_seed(0)
    moments = {}
    for layer in layers:  # a random positive-definite stand-in for C0 (statistics are benchmarked separately)
        k = torch.randn(2 * d_k, d_k, generator=g, device=device)
        moments[layer] = (k.T @ k / k.shape[0]).cpu()
        del k
    records = load_requests(COUNTERFACT)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
    out = {"model": f"GPT-J-shaped random ({shape['layers']} x {shape['hidden']}, {shape['heads']} heads, "
                    f"d_ff {4 * shape['hidden']}), {str(dtype).replace('torch.', '')}, {device}",
           "device": name, "model_build_seconds": t_build, "layers": layers,
           "settings": {"v_num_grad_steps": 25, "v_loss_layer": 27, "mom2_update_weight": 15000, "seed": 0},
           "runs": []}
    templates = flatten_templates(generate_context_templates(model, MEMIT_RECIPE, seed=0))
    sample = records[: args.reference_sample]
    rows, lengths = value_rows(model.tokenizer, sample, templates, fact_token="subject_last", rule="offsets")
    settings = ValueSettings(**{**PUBLISHED.__dict__, "num_steps": 25})
    _, t_sample = timed(optimise_values_reference, model, rows, lengths, settings,
                        Injection(layer=8, site="block", nll_layer=27))
    out["one_at_a_time_seconds_per_request"] = t_sample / len(sample)
    out["one_at_a_time_measured_requests"] = len(sample)
    for n, early_stop in [(n, e) for n in args.gpu_requests for e in args.early_stop]:
        # CounterFact requests, repeated with a numbered subject past the file's end (distinct subjects).
        requests = [records[i % len(records)] for i in range(n)]
        requests = [type(r)(r.prompt, f"{r.subject} {i // len(records)}" if i >= len(records) else r.subject,
                            r.target_new, r.target_true, case_id=i) for i, r in enumerate(requests)]
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        # With --work-dir a run too long for one sitting is finished by running the same command again: the
        # value batches computed before are loaded, and their recorded seconds are added to this run's.
        work_dir = None if args.work_dir is None else Path(args.work_dir) / f"requests-{n}"
        context = kedit.EditContext(stats=InMemoryCovariance(moments), progress=True, seed=0, work_dir=work_dir)
        result, seconds = timed(kedit.compute_edit, model, requests, "memit", layers=layers, v_num_grad_steps=25,
                                v_loss_layer=27, mom2_update_weight=15000, context=context,
                                early_stop_most_probable=early_stop)
        resumed = result.info.get("values_resumed") or {}
        earlier = resumed.get("loaded_batches_seconds_when_computed", 0.0)
        phases = dict(result.timings)
        if resumed.get("batches_loaded"):
            # the earlier batches were loaded (in moments); the seconds they took to compute are added
            phases["values"] = phases["values"] + earlier
            phases["total"] = phases.get("total", 0.0) + earlier
        steps = result.info["value_steps"]
        run = {"requests": n, "early_stop_most_probable": early_stop, "seconds_total": seconds + earlier,
               "seconds_per_phase": phases, "values_resumed": resumed or None,
               "value_steps_mean": sum(steps) / len(steps), "keys_passes": result.info.get("keys_passes"),
               "requests_per_second": {"values": n / phases["values"], "keys": n / phases["keys"]},
               "value_speedup_vs_one_at_a_time": out["one_at_a_time_seconds_per_request"] * n / phases["values"]}
        # Values and keys grow linearly in the requests (fixed-size value batches; keys in token-bounded
        # micro-batches); the solve's Woodbury update grows with N^2 d + N^3 but stays seconds at 10,000.
        per_request = (phases["values"] + phases["keys"]) / n
        run["extrapolated_10000_seconds_excluding_c0"] = {
            "values_and_keys": per_request * 10_000, "solve_scaled_quadratically": phases["solve"] * (10_000 / n) ** 2,
            "context_templates": phases["context templates"]}
        if device.startswith("cuda"):
            run["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["runs"].append(run)
        del result
        args.write(out)
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(result["solves"]), figsize=(4 * (1 + len(result["solves"])), 3.6))
    v = result["values"]
    axes[0].bar(["one at a time\n(published)", "batched\n(kedit)"], [v["one_at_a_time_seconds"], v["batched_seconds"]],
                color=["#999999", "#1f77b4"])
    axes[0].set_title(f"values, {v['requests']} requests: {v['speedup']:.1f}x")
    axes[0].set_ylabel("seconds")
    for ax, s in zip(axes[1:], result["solves"]):
        ax.bar(["fresh LU", "fresh Cholesky", "Woodbury"], [s["fresh_lu_seconds"], s["fresh_cholesky_seconds"],
                                                            s["woodbury_seconds"]], color=["#999999", "#bbbbbb", "#1f77b4"])
        ax.set_title(f"solve d_k={s['d_k']}, N={s['N']}: {s['speedup_vs_lu']:.1f}x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--reference-sample", type=int, default=10,
                        help="requests the one-at-a-time loop is timed on (scaled to --requests)")
    parser.add_argument("--full", action="store_true", help="time the one-at-a-time loop on every request")
    parser.add_argument("--solve-sizes", default="3072,6400")
    parser.add_argument("--solve-n", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--skip-values", action="store_true")
    parser.add_argument("--flops", action="store_true", help="count operations instead of timing (see docstring)")
    parser.add_argument("--flops-requests", type=int, default=4,
                        help="requests the published loop's operations are counted on (per request)")
    parser.add_argument("--gpu", action="store_true", help="the GPT-J-shaped bf16 CUDA benchmark instead")
    parser.add_argument("--gpu-requests", default="1000,10000")
    parser.add_argument("--device", default="cuda", help="device of the --gpu benchmark")
    parser.add_argument("--early-stop", default="off",
                        help="--gpu: 'off', 'on' or 'off,on': runs without/with most-probable early stopping")
    parser.add_argument("--work-dir", help="--gpu: keep finished value batches here; rerun to finish a long run")
    parser.add_argument("--smoke", action="store_true", help="--gpu at a CPU-sized width (checks the code path)")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "cpu_count": os.cpu_count(), "ops": {op: ops.implementation(op, args.device if args.gpu else "cpu").implementation
                                                    for op in ("spd_factor", "spd_woodbury_solve", "spd_solve")}}
    if args.gpu:
        args.gpu_requests = [int(x) for x in args.gpu_requests.split(",")]
        args.early_stop = [{"off": False, "on": True}[x.strip()] for x in args.early_stop.split(",")]
        target = out / ("bench_editors_gpu_smoke.json" if args.smoke else "bench_editors_gpu.json")
        args.write = lambda partial: target.write_text(json.dumps({"machine": machine, **partial}, indent=2,
                                                                   default=str) + "\n")
        result = bench_gpu(args)
        print(f"one at a time (published loop): {result['one_at_a_time_seconds_per_request']:.2f}s per request "
              f"({result['one_at_a_time_measured_requests']} timed)")
        for run in result["runs"]:
            print(f"GPU {run['requests']:>6} requests, early stop {'on ' if run['early_stop_most_probable'] else 'off'}"
                  f" ({run['value_steps_mean']:.1f} steps): total {run['seconds_total']:.1f}s  "
                  + "  ".join(f"{k} {v:.1f}s" for k, v in run["seconds_per_phase"].items())
                  + f"  values vs one-at-a-time {run['value_speedup_vs_one_at_a_time']:.1f}x"
                  + f"  -> 10,000 requests ~{sum(run['extrapolated_10000_seconds_excluding_c0'].values()) / 60:.1f} min")
        return 0
    if args.flops:
        result = bench_flops(args)
        (out / "bench_editors_cpu_flops.json").write_text(json.dumps({"machine": machine, **result}, indent=2) + "\n")
        timed_path = out / "bench_editors_cpu.json"
        timed = json.loads(timed_path.read_text()) if timed_path.exists() else {}
        v = result["values"]
        print(f"{'operations':<48s} {'published':>12s} {'kedit':>12s} {'ratio':>8s} {'timed ratio':>12s}")
        measured = timed.get("values", {}).get("speedup")
        print(f"{'values, GFLOP per request (%d / %d counted)' % (v['published_counted_requests'], v['batched_counted_requests']):<48s} "
              f"{v['published_gflops_per_request']:>12.0f} {v['batched_gflops_per_request']:>12.0f} "
              f"{v['flop_ratio']:>7.1f}x {'' if measured is None else '%11.1fx' % measured}")
        timed_solves = {t["d_k"]: t for t in timed.get("solves", [])}
        for sv in result["solves"]:
            t = timed_solves.get(sv["d_k"])
            print(f"{'solve d_k=%d N=%d, GFLOP (fresh LU vs Woodbury)' % (sv['d_k'], sv['N']):<48s} "
                  f"{sv['fresh_lu_flops'] / 1e9:>12.2f} {sv['woodbury_flops'] / 1e9:>12.2f} {sv['flop_ratio']:>7.1f}x "
                  f"{'' if t is None else '%11.1fx' % t['speedup_vs_lu']}")
        return 0
    result = {"machine": machine, "solves": []}
    if not args.skip_values:
        result["values"] = bench_values(args)
    for d_k in (int(x) for x in args.solve_sizes.split(",")):
        result["solves"].append(bench_solve(d_k, args.solve_n, args.repeats))
    (out / "bench_editors_cpu.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"{'comparison':<48s} {'published':>12s} {'kedit':>12s} {'ratio':>8s}")
    if "values" in result:
        v = result["values"]
        label = f"values, {v['requests']} requests" + ("" if v["one_at_a_time_measured_requests"] == v["requests"]
                                                       else f" ({v['one_at_a_time_measured_requests']} timed, scaled)")
        print(f"{label:<48s} {v['one_at_a_time_seconds']:>11.1f}s {v['batched_seconds']:>11.1f}s "
              f"{v['speedup']:>7.1f}x   (max rel. difference {v['batched_vs_one_at_a_time_relative_difference']['max']:.1e})")
    for s in result["solves"]:
        print(f"{'solve d_k=%d N=%d (fresh LU vs Woodbury)' % (s['d_k'], s['N']):<48s} {s['fresh_lu_seconds']:>11.3f}s "
              f"{s['woodbury_seconds']:>11.3f}s {s['speedup_vs_lu']:>7.1f}x   (rel. error {s['woodbury_vs_lu_relative_error_max']:.1e})")
        print(f"{'solve d_k=%d N=%d (fresh Cholesky vs Woodbury)' % (s['d_k'], s['N']):<48s} "
              f"{s['fresh_cholesky_seconds']:>11.3f}s {s['woodbury_seconds']:>11.3f}s {s['speedup_vs_cholesky']:>7.1f}x   "
              f"(factor once: {s['factor_once_seconds']:.2f}s)")
    if "values" in result:
        plot(result, out / "bench_editors_cpu.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
