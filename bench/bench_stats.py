"""Benchmark: covariance statistics (C0) the reference's way vs kedit's one pass, and the op alone.

On a GPT-2-small-shaped random model (12 layers, d=768, d_ff=3072; the test tokenizer) over the same
WikiText tokens, for layers 3-7:

  (a) the reference's way (kmeng01/rome ``layer_stats``): one pass over the text per layer, each
      pass re-tokenising, batching 100 documents at a time sorted by length into <= 3 x context
      tokens, stopping after that layer's projection, ``mom2 += x.T @ x`` in float32;
  (b) kedit's one pass (:func:`kedit_core.stats.collect_second_moments`): all five layers, stopped
      after the deepest, symmetric float64 accumulation.

The covariance update is timed in place (synchronised) in both, so the split between forward and
covariance is visible, as are the padded tokens each forwards; and the op alone (``kedit::cov_accumulate_``, upper triangle into float64) against ``torch.mm``'s full
``x.T @ x``. Prints tokens/s and ratios side by side and writes JSON (and a PNG) under bench/results/.

    python bench/bench_stats.py                  # ~100k tokens (several minutes on a CPU)
    python bench/bench_stats.py --tokens 20000   # quick check
    python bench/bench_stats.py --device cuda --dtype bfloat16   # GPU session
    python bench/bench_stats.py --op-only        # just the op against torch.mm
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT / "tests" / "fixtures" / "data" / "wikitext-2-raw" / "wiki.test.raw"
RESULTS = ROOT / "bench" / "results"


def build_model(device: str, dtype: torch.dtype, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    from kedit_core.models import wrap_model
    from kedit_core.testing import test_tokenizer

    tokenizer = test_tokenizer()
    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, n_inner=3072, n_positions=1024,
                        vocab_size=tokenizer.vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).to(device=device, dtype=dtype)
    return wrap_model(model, tokenizer, source="gpt2-small-shaped-random")


def select_documents(tokenizer, budget: int, context: int) -> list[str]:
    """The first WikiText documents (lines) holding at least ``budget`` tokens after truncation."""
    from kedit_core.stats import open_corpus

    docs, total = [], 0
    for text in open_corpus(WIKITEXT).documents():
        docs.append(text)
        total += min(len(tokenizer(text)["input_ids"]), context)
        if total >= budget:
            break
    return docs


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# -- (a) the reference's way ------------------------------------------------------------------------

def reference_batches(tokenizer, docs: list[str], context: int, batch_tokens: int, group: int = 100):
    """rome's TokenizedDataset + length_collation: tokenise (again), 100 documents at a time, sort by
    length, cut into padded batches of <= batch_tokens tokens (width of the longest x rows)."""
    for start in range(0, len(docs), group):
        items = [tokenizer.encode(text, truncation=True, max_length=context) for text in docs[start:start + group]]
        items = sorted((ids for ids in items if ids), key=len, reverse=True)
        batch, width = [], 0
        for ids in items:
            if batch and width * (len(batch) + 1) > batch_tokens:
                yield batch
                batch = []
            if not batch:
                width = len(ids)
            batch.append(ids)
        if batch:
            yield batch


def pad(batch: list[list[int]], device: str):
    width = max(len(ids) for ids in batch)
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    positions = torch.arange(width).expand(len(batch), width)
    return {"input_ids": input_ids.to(device), "position_ids": positions.to(device), "attention_mask": mask.to(device)}


@torch.no_grad()
def reference_way(model, docs, layers, clock: dict):
    from kedit_core.tracing import Trace

    context = model.adapter.context_length
    device = str(model.device)
    moments, tokens = {}, 0
    clock["covariance_seconds"] = 0.0
    for layer in layers:  # one pass over the corpus per layer
        name = model.adapter.mlp_out_name(layer)
        mom2, count = None, 0
        for batch in reference_batches(model.tokenizer, docs, context, batch_tokens=3 * context):
            inputs = pad(batch, device)
            with Trace(model.model, name, retain_input=True, retain_output=False, stop=True) as tr:
                model.model(**inputs)
            synchronize(device)
            start = time.perf_counter()
            flat = tr.input.reshape(-1, tr.input.shape[-1])
            feats = flat[inputs["attention_mask"].reshape(-1).nonzero()[:, 0]].to(torch.float32)
            mom2 = feats.new_zeros(feats.shape[1], feats.shape[1]) if mom2 is None else mom2
            mom2 += feats.t().mm(feats)
            count += feats.shape[0]
            synchronize(device)
            clock["covariance_seconds"] += time.perf_counter() - start
        moments[layer] = mom2 / count
        tokens = count
    synchronize(device)
    return moments, tokens


# -- (b) kedit ---------------------------------------------------------------------------------------

@contextlib.contextmanager
def timed_accumulation(clock: dict):
    """Time kedit's accumulation calls in place (synchronised), inside the same run."""
    from kedit_core.stats import collect as collect_module

    real = collect_module.ops
    clock["covariance_seconds"] = 0.0

    class TimedOps:
        @staticmethod
        def cov_accumulate_(acc, x, mask=None):
            synchronize(str(x.device))
            start = time.perf_counter()
            real.cov_accumulate_(acc, x, mask)
            synchronize(str(x.device))
            clock["covariance_seconds"] += time.perf_counter() - start

        symmetrize_upper_ = staticmethod(real.symmetrize_upper_)

    collect_module.ops = TimedOps
    try:
        yield
    finally:
        collect_module.ops = real


def kedit_way(model, docs, layers, batch_tokens=None):
    from kedit_core.stats import collect_second_moments

    result = collect_second_moments(model, layers, docs, docs=len(docs), batch_tokens=batch_tokens, progress=False)
    synchronize(str(model.device))
    return result


def padded_tokens(model, docs, way: str, batch_tokens=None) -> int:
    """Tokens one pass forwards, padding included."""
    from kedit_core.stats import open_corpus
    from kedit_core.stats.collect import _batches, _plan_chunks, _Position, default_batch_tokens

    context = model.adapter.context_length
    if way == "reference":
        return sum(len(b) * max(map(len, b)) for b in reference_batches(model.tokenizer, docs, context, 3 * context))
    batch_tokens = batch_tokens or default_batch_tokens(model.device)
    chunks = _plan_chunks(open_corpus(docs), model.tokenizer, max_length=context, tokens=None, docs=len(docs),
                          chunk_tokens=32 * batch_tokens, start=_Position())
    return sum(x.numel() for chunk in chunks for x, _, _ in _batches(chunk.documents, batch_tokens, 0))


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


# -- (c) what the accumulation costs inside the pass --------------------------------------------------

@contextlib.contextmanager
def accumulation_skipped():
    """kedit's pass with the covariance update replaced by nothing: the truncated forward alone, with the
    same tokenising, batching, hooks and early stop."""
    from kedit_core.stats import collect as collect_module

    real = collect_module.ops

    class NoOps:
        @staticmethod
        def cov_accumulate_(acc, x, mask=None):
            pass

        symmetrize_upper_ = staticmethod(real.symmetrize_upper_)

    collect_module.ops = NoOps
    try:
        yield
    finally:
        collect_module.ops = real


def overhead_benchmark(model, docs, layers, batch_tokens, implementations) -> dict:
    """Tokens/s of the truncated forward alone and of the full pass with each op implementation; the
    operations of both counted from the shapes (the accumulation's floor is its share of the work)."""
    from kedit_core import ops

    device = str(model.device)
    kedit_way(model, docs[:50], layers, batch_tokens)  # warm-up (kernels, allocator)
    with accumulation_skipped():
        result, t_forward = timed(kedit_way, model, docs, layers, batch_tokens)
    tokens = result.count
    out = {"tokens": tokens, "forward_alone": {"seconds": t_forward, "tokens_per_second": tokens / t_forward}}
    available = ops.describe((device.split(":")[0],))["cov_accumulate_"][device.split(":")[0]]["available"]
    for name in (i for i in implementations if i in available):
        ops.select("cov_accumulate_", name, device)
        kedit_way(model, docs[:50], layers, batch_tokens)
        _, seconds = timed(kedit_way, model, docs, layers, batch_tokens)
        out[name] = {"seconds": seconds, "tokens_per_second": tokens / seconds,
                     "overhead_vs_forward": seconds / t_forward - 1.0}
    ops.select("cov_accumulate_", None, device)
    cfg = model.model.config
    d, d_ff, deepest = cfg.hidden_size, model.adapter.key_size, max(layers) + 1
    # per token: each block's weights (attention 4 d², MLP 2 d d_ff) twice; the SYRK's upper triangle d_k².
    forward_flops = deepest * 2 * (4 * d * d + 2 * d * d_ff)
    syrk_flops = len(layers) * d_ff * (d_ff + 1)
    out["flops_per_token"] = {"truncated_forward_weights": forward_flops, "accumulation_upper_triangle": syrk_flops,
                              "accumulation_share_at_equal_rate": syrk_flops / forward_flops}
    return out


def print_overhead(o: dict) -> None:
    f = o["forward_alone"]
    print(f"\nC0 pass, {o['tokens']} tokens: truncated forward alone {f['tokens_per_second']:.0f} tok/s ({f['seconds']:.2f} s)")
    for name, r in o.items():
        if isinstance(r, dict) and "overhead_vs_forward" in r:
            print(f"  forward + accumulation ({name}): {r['tokens_per_second']:.0f} tok/s ({r['seconds']:.2f} s), "
                  f"overhead {100 * r['overhead_vs_forward']:.1f}%")
    fl = o["flops_per_token"]
    print(f"  work per token: forward {fl['truncated_forward_weights'] / 1e9:.2f} GFLOP, accumulation "
          f"{fl['accumulation_upper_triangle'] / 1e9:.2f} GFLOP = {100 * fl['accumulation_share_at_equal_rate']:.0f}% "
          f"of the forward's at equal rate")


# -- the op alone ------------------------------------------------------------------------------------

def time_op(fn, device: str, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after two warm-ups (CUDA events on a GPU: launches overlap
    as in real use; a host clock around a synchronised call on the CPU)."""
    fn()
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        else:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def op_variants(device: str, dtype: torch.dtype, d: int) -> dict:
    """name -> (acc dtype, masked, fn(acc, x, mask)): the op's implementations and plain-torch baselines."""
    from functools import partial

    from kedit_core import _ext, ops
    from kedit_core.ops.blocked import cov_accumulate_blocked_, default_levels

    half = dtype in (torch.bfloat16, torch.float16) and device.startswith("cuda")
    variants = {
        # cuBLAS's full product, 16-bit output (what the first GPU session compared against)
        "torch.mm": (torch.float32, False, lambda acc, x, m: torch.mm(x.T, x)),
        # the best plain-torch way at the op's accuracy: full product with float32 sums, added in
        "torch.mm+add (fp64 acc)": (torch.float64, False, (lambda acc, x, m: acc.add_(torch.mm(x.T, x, out_dtype=torch.float32)))
                                    if half else (lambda acc, x, m: acc.add_(torch.mm(x.T, x)))),
        "reference": (torch.float64, False, ops.reference.cov_accumulate_),
    }
    if _ext.loaded() and ops._compiled_has_kernel("cov_accumulate_", device):
        variants["compiled kernel"] = (torch.float64, False, torch.ops.kedit.cov_accumulate_)
        variants["compiled kernel, masked"] = (torch.float64, True, torch.ops.kedit.cov_accumulate_)
    best = default_levels(d)
    for levels in sorted({0, 1, best - 1, best, best + 1} - {-1}):
        if levels and (d % 2 ** levels or d // 2 ** levels < 128):
            continue
        tag = f"blocked L{levels}" + (" (default)" if levels == best else "")
        variants[tag] = (torch.float64, False, partial(cov_accumulate_blocked_, levels=levels))
    variants["blocked default, fp32 acc"] = (torch.float32, False, cov_accumulate_blocked_)
    variants["blocked default, masked"] = (torch.float64, True, cov_accumulate_blocked_)
    variants["blocked default, flush 4096"] = (torch.float64, False, partial(cov_accumulate_blocked_, flush_rows=4096))
    return variants


def op_benchmark(device: str, shapes, input_dtypes, repeats: int) -> list[dict]:
    """Every variant of :func:`op_variants` on each shape, with its error against a float64 product."""
    rows = []
    for n, d in shapes:
        for dtype in input_dtypes:
            torch.manual_seed(0)
            x = torch.randn(n, d, device=device).to(dtype)
            mask = torch.rand(n, device=device) > 0.1  # ~10% padding rows
            exact_upper = None
            if d <= 4096:  # the float64 oracle (on the device) for the accuracy column
                xd = x.double()
                exact_upper = torch.triu(xd.T @ xd)
                del xd
            row = {"n": n, "d": d, "input_dtype": str(dtype).replace("torch.", ""), "seconds": {}, "rel_error": {},
                   "useful_gflop": n * d * (d + 1) / 1e9}
            for name, (acc_dtype, masked, fn) in op_variants(device, dtype, d).items():
                if name == "reference" and d > 4096 and device.startswith("cuda"):
                    continue  # float32 upcast of 16k x 11k: seconds of nothing new
                acc = torch.zeros(d, d, device=device, dtype=acc_dtype)
                try:
                    row["seconds"][name] = time_op(lambda: fn(acc, x, mask if masked else None), device, repeats)
                except Exception as exc:  # one variant failing (an op missing in this torch) must not end the run
                    print(f"  {name}: FAILED {type(exc).__name__}: {exc}")
                    row.setdefault("failed", {})[name] = f"{type(exc).__name__}: {exc}"
                    continue
                if exact_upper is not None and not masked and not name.startswith("torch.mm"):
                    acc.zero_()
                    fn(acc, x, None)
                    row["rel_error"][name] = float((acc.double() - exact_upper).norm() / exact_upper.norm())
                del acc
            base = row["seconds"].get("torch.mm", float("nan"))
            row["speedup_vs_torch_mm"] = {k: base / v for k, v in row["seconds"].items()}
            same = row["seconds"].get("torch.mm+add (fp64 acc)", float("nan"))
            row["speedup_vs_same_accuracy_mm"] = {k: same / v for k, v in row["seconds"].items()}
            rows.append(row)
            print_op_row(row)
    return rows


def print_op_row(r) -> None:
    print(f"\n{r['n']} x {r['d']} {r['input_dtype']}: {'variant':<30} {'ms':>8} {'TFLOP/s*':>9} {'vs mm':>7} "
          f"{'vs mm+add':>9} {'rel.err':>8}")
    for name, t in r["seconds"].items():
        err = r["rel_error"].get(name)
        print(f"{'':>22}{name:<30} {t * 1e3:8.3f} {r['useful_gflop'] / t / 1e3:9.1f} "
              f"{r['speedup_vs_torch_mm'][name]:6.2f}x {r['speedup_vs_same_accuracy_mm'][name]:8.2f}x "
              f"{'' if err is None else f'{err:8.1e}'}")
    print(f"{'':>22}(* useful work: the upper triangle, n d (d + 1) flops)")


def machine_info(device: str) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "device": device}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        info["load_average_at_start"] = os.getloadavg()
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e2e = report["end_to_end"]
    labels = ["(a) reference\nper-layer passes", "(b) kedit\none pass"]
    values = [e2e["reference"]["tokens_per_second"], e2e["kedit"]["tokens_per_second"]]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(labels, values, color=["#999999", "#2b7bba"])
    ax.set_ylabel("corpus tokens / s (all 5 layers)")
    ax.set_title(f"C0 for layers {report['settings']['layers']}: {e2e['speedup']:.2f}x", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=100_000, help="corpus tokens (default 100000)")
    parser.add_argument("--layers", default="3,4,5,6,7")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch-tokens", type=int, default=None, help="kedit's batch size (default: kedit's)")
    parser.add_argument("--op-only", action="store_true", help="only the op against torch.mm")
    parser.add_argument("--overhead", action="store_true",
                        help="only the accumulation's cost inside the pass, on a GPT-J-shaped model (--shape)")
    parser.add_argument("--shape", default="gptj", choices=["gptj", "gptj-smoke"])
    parser.add_argument("--overhead-impls", default="blocked,compiled",
                        help="op implementations timed inside the pass (those available)")
    parser.add_argument("--op-repeats", type=int, default=9)
    parser.add_argument("--op-dtypes", default=None, help="input dtypes for the op, e.g. bfloat16,float32")
    parser.add_argument("--op-shapes", default=None, help="n x d list for the op, e.g. 16384x4096,8192x1536")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/stats-<device>-<time>.json)")
    args = parser.parse_args(argv)

    import kedit_core  # noqa: F401  (loads the compiled ops)
    from kedit_core import ops

    device = args.device
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    layers = [int(x) for x in args.layers.split(",")]
    report = {"benchmark": "stats", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_info(device),
              "settings": {"tokens": args.tokens, "layers": layers, "dtype": args.dtype, "model": "gpt2-small-shaped",
                           "corpus": "wikitext-2-raw wiki.test.raw (lines as documents)",
                           "op": ops.implementation("cov_accumulate_", device).implementation}}
    print(f"machine: {report['machine'].get('cpu', '')} {report['machine'].get('gpu', '')} | threads "
          f"{torch.get_num_threads()} | load {report['machine'].get('load_average_at_start')} | op "
          f"{report['settings']['op']}")

    if device.startswith("cuda"):
        shapes = [(16384, 3072), (16384, 4096), (16384, 11008), (16384, 16384)]
        input_dtypes = [torch.float32, torch.bfloat16, torch.float16]
    else:
        shapes = [(4096, 3072), (4096, 1024)]
        input_dtypes = [torch.float32]
    if args.op_dtypes:
        input_dtypes = [getattr(torch, name) for name in args.op_dtypes.split(",")]
    if args.op_shapes:
        shapes = [tuple(int(v) for v in item.split("x")) for item in args.op_shapes.split(",")]
    if not args.overhead:
        report["op"] = op_benchmark(device, shapes, input_dtypes, args.op_repeats)

    if args.overhead:
        sys.path.insert(0, str(ROOT / "bench"))
        from bench_editors import GPTJ_SHAPE, SMOKE_SHAPE, random_model

        shape = SMOKE_SHAPE if args.shape == "gptj-smoke" else GPTJ_SHAPE
        model = random_model("gptj", shape["layers"], shape["hidden"], shape["vocab"], dtype, device,
                             heads=shape["heads"], rotary_dim=shape["rotary_dim"])
        docs = select_documents(model.tokenizer, args.tokens, model.adapter.context_length)
        impls = [i for i in args.overhead_impls.split(",") if i]
        report["overhead"] = overhead_benchmark(model, docs, layers, args.batch_tokens, impls)
        report["overhead"]["model"] = f"GPT-J-shaped random {shape}, {args.dtype}"
        print_overhead(report["overhead"])
        del model
    if not args.op_only and not args.overhead:
        model = build_model(device, dtype)
        docs = select_documents(model.tokenizer, args.tokens, model.adapter.context_length)
        print(f"\ncorpus: {len(docs)} WikiText documents; layers {layers}; model {args.dtype} on {device}")
        kedit_way(model, docs[:20], layers, args.batch_tokens)  # warm-up
        ref_clock, kedit_clock = {}, {}
        (ref_moments, ref_tokens), t_ref = timed(reference_way, model, docs, layers, ref_clock)
        with timed_accumulation(kedit_clock):
            result, t_kedit = timed(kedit_way, model, docs, layers, args.batch_tokens)
        assert result.count == ref_tokens, (result.count, ref_tokens)
        worst = max(float((result.moment(l).cpu() - ref_moments[l].double().cpu()).norm() / result.moment(l).cpu().norm())
                    for l in layers)
        e2e = {"tokens": ref_tokens,
               "reference": {"seconds": t_ref, "tokens_per_second": ref_tokens / t_ref,
                             "covariance_seconds": ref_clock["covariance_seconds"],
                             "forward_and_rest_seconds": t_ref - ref_clock["covariance_seconds"]},
               "kedit": {"seconds": t_kedit, "tokens_per_second": ref_tokens / t_kedit,
                         "covariance_seconds": kedit_clock["covariance_seconds"],
                         "forward_and_rest_seconds": t_kedit - kedit_clock["covariance_seconds"],
                         "batch_tokens": result.info["batch_tokens"]},
               "speedup": t_ref / t_kedit, "goal_cpu": 3.5, "max_relative_difference_of_c0": worst,
               "padded_tokens": {"reference": padded_tokens(model, docs, "reference"),
                                 "kedit": padded_tokens(model, docs, "kedit", args.batch_tokens)}}
        e2e["forward_speedup"] = e2e["reference"]["forward_and_rest_seconds"] / e2e["kedit"]["forward_and_rest_seconds"]
        e2e["covariance_speedup"] = e2e["reference"]["covariance_seconds"] / max(e2e["kedit"]["covariance_seconds"], 1e-9)
        report["end_to_end"] = e2e

        print(f"\n{'':28}{'(a) reference':>16}{'(b) kedit':>14}{'ratio':>9}")
        print(f"{'tokens/s (all 5 layers)':28}{e2e['reference']['tokens_per_second']:16.0f}"
              f"{e2e['kedit']['tokens_per_second']:14.0f}{e2e['speedup']:8.2f}x")
        print(f"{'seconds':28}{t_ref:16.1f}{t_kedit:14.1f}")
        print(f"{'  forward + tokenising, etc.':28}{e2e['reference']['forward_and_rest_seconds']:16.1f}"
              f"{e2e['kedit']['forward_and_rest_seconds']:14.1f}{e2e['forward_speedup']:8.2f}x")
        print(f"{'  covariance update':28}{e2e['reference']['covariance_seconds']:16.1f}"
              f"{e2e['kedit']['covariance_seconds']:14.1f}{e2e['covariance_speedup']:8.2f}x")
        pads = e2e["padded_tokens"]
        print(f"{'padded tokens forwarded':28}{pads['reference']:16d}{pads['kedit']:14d}"
              f"{pads['reference'] / pads['kedit']:8.2f}x   (x 5 passes for (a))")
        print(f"C0 agreement (a) vs (b): max relative difference {worst:.1e} over {ref_tokens} tokens")
        print(f"goal on CPU: >= 3.5x for (b) over (a): {'met' if e2e['speedup'] >= 3.5 else 'NOT met'} "
              f"({e2e['speedup']:.2f}x; timings on a shared machine are noisy)")

    RESULTS.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS / f"stats-{device.replace(':', '')}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    if "end_to_end" in report:
        plot(report, out.with_suffix(".png"))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
