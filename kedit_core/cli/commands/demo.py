"""``kedit demo``: edit the toy model's facts end to end and show what changed."""
from __future__ import annotations

import sys
import time
from pathlib import Path

NAME = "demo"
HELP = "edit 200 facts of kedit's own toy model with MEMIT and print ES/PS/NS and recall, before and after"
DESCRIPTION = """Runs on any machine with nothing else installed: loads kedit's committed toy model (a small
GPT-2 that knows every fact of the toy world; see `kedit toyworld info`), computes its covariance
statistics from the world's generic corpus (cached for the next run), rewrites N facts with MEMIT
(or --method), and prints efficacy (ES), paraphrase (PS) and neighbourhood (NS) success and the
model's recall of the facts it did not edit, before and after, with the time of each phase. Writes
demo.json (results, resolved hyper-parameters, seeds) and demo.png into the output folder."""


def add_arguments(parser) -> None:
    parser.add_argument("-n", "--num-edits", type=int, default=200, help="facts to rewrite (default 200)")
    parser.add_argument("--method", default="memit", help="editor to run (default memit; any installed editor)")
    parser.add_argument("--model", default="toy", help="a toy-world checkpoint (default: toy, the committed one)")
    parser.add_argument("--out", type=Path, default=Path("kedit-demo"), help="output folder (default ./kedit-demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the editor (context templates)")
    parser.add_argument("--record-seed", type=int, default=0, help="seed for which facts are rewritten and to what")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one hyper-parameter of --method (JSON value)")
    parser.add_argument("--stats-dir", help="statistics cache (default $KEDIT_STATS_DIR or ~/.cache/kedit/stats)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    import torch

    from ... import toyworld
    from ...atomic import write_bytes_atomic, write_json_atomic
    from ...editors import get_editor, resolve_hparams
    from ...errors import KeditError
    from ...hparams import parse_assignments
    from ...models import load_model
    from ...toyworld.editing import edit_and_measure, toy_statistics

    if args.num_edits < 1:
        raise KeditError(f"--num-edits {args.num_edits}: expected at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
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

