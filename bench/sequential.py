"""Sequential (lifelong) editing benchmark: T batches of B edits applied one after another, the AlphaEdit
paper's setting, with curves of who survives the stream.

For every editor a :class:`kedit_core.session.EditSession` (on disk under ``--work``) takes the stream one
batch at a time; after each batch ``k`` the model is measured with kedit's evaluation module:

* ES / PS / NS (CounterFact) or efficacy / paraphrase / specificity (zsRE) over *all* edits so far, and
  split into the edits still standing and those overwritten by a later edit of the same subject (zsRE dev
  edits one subject several times, to different answers: an overwritten edit is not a forgotten one);
* the same metrics over ``--unedited`` records that are never edited (the records after the stream):
  their facts should stay as the unedited model has them;
* ‖W_k‖ / ‖W_0‖ of every edited matrix (the session's norm statistics);
* perplexity of held-out WikiText (documents the statistics never saw).

Everything resumes: the sessions skip the batches they hold, and each finished measurement is kept in
``<out>/partial/``. Writes ``<out>/sequential.json`` (settings, command, seeds, load averages, per-batch
numbers), ``sequential.csv`` and ``sequential.png`` (metric vs number of edits, one line per editor,
dashed: the unedited model).

    python bench/sequential.py --model smollm2-135m --data ../shared/data/counterfact_dev.json \\
        --batches 5 --batch-size 100 --editors bench/sequential_editors.json --select memit,alphaedit \\
        --corpus ../shared/data/wikitext-2-raw/wiki.test.raw --stats-docs 2000 --out bench/results/sequential/x
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from kedit_core import load_model  # noqa: E402
from kedit_core.atomic import write_bytes_atomic, write_json_atomic  # noqa: E402
from kedit_core.errors import KeditError  # noqa: E402
from kedit_core.evaluation import (EvalSettings, aggregate, documents_covering, evaluate_cases, load_cases,  # noqa: E402
                                   perplexity)
from kedit_core.requests import superseded_by_later  # noqa: E402
from kedit_core.session import EditSession  # noqa: E402
from kedit_core.stats import CachedCovariance, open_corpus  # noqa: E402

PANELS = {"counterfact": [("edited", "ES"), ("edited", "PS"), ("edited", "NS"), ("unedited", "ES")],
          "zsre": [("edited", "efficacy"), ("edited", "paraphrase"), ("edited", "specificity"),
                   ("unedited", "efficacy")]}
COLORS = {"memit": "#d62728", "emmet": "#ff7f0e", "alphaedit": "#1f77b4", "alphaedit+nc": "#17becf",
          "rome": "#9467bd", "ft-l": "#8c564b"}


def editor_colors(methods: dict[str, str]) -> dict[str, str]:
    """One distinct colour per editor line: its label's, else its method's, else the next unused one (two
    variants of one method, such as ``memit`` and ``memit-v15``, must not share a colour)."""
    spare = [*COLORS.values(), "#2ca02c", "#e377c2", "#7f7f7f", "#bcbd22"]
    chosen: dict[str, str] = {}
    for editor, method in methods.items():
        for color in (COLORS.get(editor), COLORS.get(method), *spare):
            if color is not None and color not in chosen.values():
                chosen[editor] = color
                break
        else:
            chosen[editor] = spare[len(chosen) % len(spare)]
    return chosen


def digest(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_partial(path: Path, key: str):
    if path.exists():
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("key") == key:
            return data["result"]
    return None


def record_metrics(records: list[dict]) -> list[dict]:
    """Each record's metrics (rounded: they are percentages), kept so any subset can be aggregated later."""
    return [{k: (None if v is None else round(v, 4)) for k, v in r["metrics"].items()} for r in records]


def measure(model, stream, unedited, fmt, held_out, args) -> dict:
    settings = EvalSettings(generation=False, progress=not args.no_progress)
    start = time.perf_counter()
    edited_records = evaluate_cases(model, stream, fmt, settings) if stream else []
    unedited_records = evaluate_cases(model, unedited, fmt, settings) if unedited else []
    ppl = perplexity(model.model, model.tokenizer, held_out, window=args.ppl_window, max_tokens=args.ppl_tokens,
                     progress=not args.no_progress)
    return {"edited": aggregate(edited_records, fmt) if edited_records else None,
            "unedited": aggregate(unedited_records, fmt) if unedited_records else None,
            "edited_metrics": record_metrics(edited_records),
            "perplexity": ppl, "eval_seconds": time.perf_counter() - start,
            "loadavg": list(os.getloadavg())}


def split_by_standing(metrics: list[dict] | None, stream, fmt: str) -> dict:
    """Aggregates over the edits of ``stream`` (the first k batches) that still stand and over those a later
    edit of the same subject within ``stream`` overwrote; None where the per-record metrics were not kept
    (measurements from before they were) or a group is empty."""
    later = superseded_by_later([c.request for c in stream])
    out = {"superseded": sum(j is not None for j in later), "edited_standing": None, "edited_superseded": None}
    if metrics is None or len(metrics) != len(stream):
        return out
    for name, keep in (("edited_standing", lambda j: j is None), ("edited_superseded", lambda j: j is not None)):
        chosen = [{"metrics": m} for m, j in zip(metrics, later) if keep(j)]
        out[name] = strip(aggregate(chosen, fmt)) if chosen else None
    return out


def strip(agg: dict | None) -> dict | None:
    return None if agg is None else {k: v for k, v in agg.items() if not k.endswith(("_std", "_n"))}


def run_editor(spec: dict, model, cases_stream, unedited, fmt, held_out, stats, args, base_fingerprint, say) -> list:
    label, method = spec["label"], spec["method"]
    directory = args.work / label
    if (directory / "session.json").exists():
        session = EditSession.open(directory, model)
        say(f"{label}: session holds {len(session.batches)} batch(es)")
    else:
        session = EditSession.create(directory, model, seed=args.seed, model_source=args.model)
    batch_size = args.batch_size
    rows = []
    try:
        for k in range(1, args.batches + 1):
            chunk = [c.request for c in cases_stream[(k - 1) * batch_size: k * batch_size]]
            if k > len(session.batches):
                say(f"{label}: batch {k}/{args.batches} ({len(chunk)} edits, {method})")
                record = session.add(chunk, method, spec.get("hparams"), stats=stats,
                                     progress=not args.no_progress, **spec.get("overrides", {}))
                say(f"{label}: batch {k} computed in {record['seconds']:.1f} s")
            record = session.batches[k - 1]
            key = digest({"record": record["files"], "k": k, "eval": args.eval_key})
            path = args.out / "partial" / label / f"batch{k:03d}.json"
            result = load_partial(path, key)
            if result is None:
                with session.viewing(k):
                    result = measure(model, cases_stream[: k * batch_size], unedited, fmt, held_out, args)
                write_json_atomic(path, {"key": key, "result": result}, indent=1)
            ratios = [s["norm_ratio"] for s in record["norms"].values()]
            rows.append({"editor": label, "method": method, "batch": k, "edits": k * batch_size,
                         "edit_seconds": record["seconds"], "hparams": record["hparams"],
                         "norms": record["norms"], "norm_ratio_max": max(ratios), "norm_ratio_mean":
                         sum(ratios) / len(ratios), **{f: result[f] for f in ("eval_seconds", "loadavg")},
                         "edited": strip(result["edited"]), "unedited": strip(result["unedited"]),
                         **split_by_standing(result.get("edited_metrics"), cases_stream[: k * batch_size], fmt),
                         "perplexity": result["perplexity"]["perplexity"]})
            say(f"{label}: after {k * batch_size} edits: " + summary_line(rows[-1], fmt))
    finally:
        session.restore_base()
    if model.fingerprint() != base_fingerprint:
        raise KeditError(f"{label}: the model did not return to its base weights")
    return rows


def summary_line(row: dict, fmt: str) -> str:
    metrics = [m for _, m in PANELS[fmt][:3]]
    edited = row["edited"] or {}
    standing = ""
    if row.get("superseded") and row.get("edited_standing"):
        standing = (f" (standing {row['edited_standing'][metrics[0]]:.1f}, {row['superseded']} overwritten "
                    f"{row['edited_superseded'][metrics[0]]:.1f})")
    parts = [f"{m} {edited.get(m, float('nan')):.1f}" for m in metrics]
    parts[0] += standing
    return (", ".join(parts)
            + f"; unedited {PANELS[fmt][3][1]} {(row['unedited'] or {}).get(PANELS[fmt][3][1], float('nan')):.1f}"
            + f"; ppl {row['perplexity']:.2f}; ‖W‖/‖W0‖ max {row.get('norm_ratio_max', 1.0):.3f}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fmt = result["format"]
    base = result["base"]
    panels = [(f"{'unedited records' if scope == 'unedited' else 'edited records'}: {metric}", scope, metric)
              for scope, metric in PANELS[fmt]]
    panels += [("held-out WikiText perplexity", None, "perplexity"), ("‖W_k‖ / ‖W_0‖ (max over edited matrices)",
                                                                          None, "norm_ratio_max")]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    by_editor: dict[str, list] = {}
    for row in result["rows"]:
        by_editor.setdefault(row["editor"], []).append(row)
    colors = editor_colors({editor: rows[0]["method"] for editor, rows in by_editor.items()})
    for ax, (title, scope, metric) in zip(axes.flat, panels):
        for editor, rows in by_editor.items():
            xs = [0] + [r["edits"] for r in rows]
            if scope is not None:
                # before any edit: the unedited model on the records of the first batch
                first = (base[scope] or {}).get(metric) if scope == "unedited" else base["edited_by_batch"][1].get(metric)
                ys = [first] + [(r[scope] or {}).get(metric) for r in rows]
            elif metric == "perplexity":
                ys = [base["perplexity"]] + [r["perplexity"] for r in rows]
            else:
                ys = [1.0] + [r["norm_ratio_max"] for r in rows]
            line, = ax.plot(xs, ys, marker="o", ms=3, label=editor, color=colors[editor])
            if scope == "edited" and any(r.get("superseded") and r.get("edited_standing") for r in rows):
                standing = [(r.get("edited_standing") or {}).get(metric, float("nan")) for r in rows]
                ax.plot(xs[1:], standing, ls=":", marker=".", color=line.get_color(),
                        label=f"{editor}: edits not overwritten later")
        if scope == "edited":  # the unedited model on the same records (the first k batches)
            xs = [r["edits"] for r in next(iter(by_editor.values()))]
            ax.plot(xs, [b.get(metric) for b in base["edited_by_batch"][1:len(xs) + 1]], ls="--", color="grey",
                    label="unedited model")
        elif scope == "unedited":
            ax.axhline((base["unedited"] or {}).get(metric, 0), ls="--", color="grey", label="unedited model")
        elif metric == "perplexity":
            ax.axhline(base["perplexity"], ls="--", color="grey", label="unedited model")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("number of edits")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"Sequential editing: {result['model']['source']} on {result['data']['name']}, "
                 f"{result['settings']['batches']} batches of {result['settings']['batch_size']}", fontsize=11)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())


def write_csv(result: dict, path: Path) -> None:
    fmt = result["format"]
    metrics = [m for _, m in PANELS[fmt][:3]]
    header = ["editor", "method", "batch", "edits"] + metrics + [f"unedited_{m}" for m in metrics] + [
        "overwritten"] + [f"standing_{m}" for m in metrics] + [f"overwritten_{m}" for m in metrics] + [
        "perplexity", "norm_ratio_max", "norm_ratio_mean", "edit_seconds", "eval_seconds", "load1"]
    lines = [",".join(header)]
    base_rows = [{"editor": "unedited", "method": "", "batch": k, "edits": k * result["settings"]["batch_size"],
                  "edited": b, "unedited": result["base"]["unedited"], "perplexity": result["base"]["perplexity"],
                  "norm_ratio_max": 1.0, "norm_ratio_mean": 1.0, "edit_seconds": 0, "eval_seconds": 0,
                  "loadavg": [None], **result["base"]["standing_by_batch"][k]}
                 for k, b in enumerate(result["base"]["edited_by_batch"]) if k]
    for row in base_rows + result["rows"]:
        values = [row["editor"], row["method"], row["batch"], row["edits"]]
        values += [(row["edited"] or {}).get(m) for m in metrics] + [(row["unedited"] or {}).get(m) for m in metrics]
        values += [row.get("superseded")] + [(row.get("edited_standing") or {}).get(m) for m in metrics] + [
            (row.get("edited_superseded") or {}).get(m) for m in metrics]
        values += [row["perplexity"], row["norm_ratio_max"], row["norm_ratio_mean"], row["edit_seconds"],
                   row["eval_seconds"], row["loadavg"][0]]
        lines.append(",".join("" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v)) for v in values))
    write_bytes_atomic(path, ("\n".join(lines) + "\n").encode())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--format", default="auto", choices=["auto", "counterfact", "zsre"])
    parser.add_argument("--batches", type=int, required=True, help="T: number of batches")
    parser.add_argument("--batch-size", type=int, required=True, help="B: edits per batch")
    parser.add_argument("--unedited", type=int, default=100, help="records after the stream measured as never-edited")
    parser.add_argument("--editors", type=Path, required=True,
                        help="JSON list of {label, method, overrides{}} (bench/sequential_editors.json)")
    parser.add_argument("--select", help="comma-separated labels of --editors to run (default: all)")
    parser.add_argument("--corpus", type=Path, required=True, help="text for C0 and the held-out perplexity")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--stats-docs", type=int,
                        help="C0 from the first N documents of --corpus; the held-out text follows them")
    budget.add_argument("--stats-tokens", type=int,
                        help="C0 from N tokens of the documents after the held-out text (needs --held-out-from)")
    parser.add_argument("--held-out-from", type=int,
                        help="first held-out document (default: --stats-docs, i.e. right after C0's documents)")
    parser.add_argument("--stats-dir", help="statistics cache (default: kedit's)")
    parser.add_argument("--ppl-tokens", type=int, default=16384, help="held-out tokens scored")
    parser.add_argument("--ppl-window", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, help="session directories (default: <out>/sessions)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work = args.work or args.out / "sessions"
    say = lambda message: print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)  # noqa: E731

    specs = json.loads(args.editors.read_text(encoding="utf-8"))
    if args.select:
        wanted = args.select.split(",")
        unknown = sorted(set(wanted) - {s["label"] for s in specs})
        if unknown:
            raise KeditError(f"--select: no editor(s) {unknown} in {args.editors}")
        specs = [s for s in specs if s["label"] in wanted]
    total = args.batches * args.batch_size
    fmt, cases = load_cases(args.data, args.format, limit=total + args.unedited)
    if len(cases) < total:
        raise KeditError(f"{args.data} has {len(cases)} records; the stream needs {total}")
    stream, unedited = cases[:total], cases[total:]
    documents = list(open_corpus(str(args.corpus)).documents())
    if args.held_out_from is None:
        if args.stats_docs is None:
            raise KeditError("--stats-tokens needs --held-out-from (the first document of the held-out text)")
        args.held_out_from = args.stats_docs
    if args.stats_docs is not None and args.held_out_from < args.stats_docs:
        raise KeditError(f"--held-out-from {args.held_out_from} overlaps C0's first {args.stats_docs} documents")
    held_out = documents[args.held_out_from:]
    if not held_out:
        raise KeditError(f"--held-out-from {args.held_out_from} leaves no held-out documents of {args.corpus}")
    # The measurements kept under <out>/partial/ belong to one stream (its records and its never-edited
    # ones): a run with another stream shape on the same --out would mix them.
    shape = {"data": str(args.data), "batches": args.batches, "batch_size": args.batch_size,
             "unedited": args.unedited}
    shape_path = args.out / "partial" / "stream.json"
    if shape_path.exists():
        kept = json.loads(shape_path.read_text(encoding="utf-8"))
        if kept != shape:
            changed = ", ".join(f"{k} {kept.get(k)} -> {v}" for k, v in shape.items() if kept.get(k) != v)
            raise KeditError(f"{args.out} holds measurements of another stream ({changed}); use another --out")
    torch.manual_seed(args.seed)
    model = load_model(args.model, device="cpu")
    base_fingerprint = model.fingerprint()
    if args.stats_docs is not None:
        stats_settings = {"corpus": str(args.corpus), "docs": args.stats_docs}
        stats = CachedCovariance(str(args.corpus), args.stats_dir, docs=args.stats_docs, progress=not args.no_progress)
    else:  # C0 from the documents after the held-out text, so perplexity is scored on text C0 never saw
        first = args.held_out_from + documents_covering(model.tokenizer, held_out, args.ppl_tokens)
        if first >= len(documents):
            raise KeditError(f"no documents of {args.corpus} are left for C0 after the held-out text")
        stats_settings = {"corpus": str(args.corpus), "tokens": args.stats_tokens, "documents_from": first}
        stats = CachedCovariance(documents[first:], args.stats_dir, tokens=args.stats_tokens,
                                 progress=not args.no_progress)
    args.eval_key = {"ppl": [args.ppl_tokens, args.ppl_window, args.held_out_from], "unedited": args.unedited,
                     "data": str(args.data), "model": base_fingerprint}

    if not shape_path.exists():
        write_json_atomic(shape_path, shape, indent=1)
    base_key = digest({"eval": args.eval_key, "total": total, "fmt": fmt})
    base_path = args.out / "partial" / "base.json"
    base = load_partial(base_path, base_key)
    if base is None or "stream_metrics" not in base:  # (older files lack the per-record metrics)
        say(f"measuring the unedited model on {total} + {len(unedited)} records")
        settings = EvalSettings(generation=False, progress=not args.no_progress)
        records = evaluate_cases(model, stream, fmt, settings)
        by_batch = [None] + [strip(aggregate(records[: k * args.batch_size], fmt)) for k in range(1, args.batches + 1)]
        other = measure(model, [], unedited, fmt, held_out, args)
        base = {"edited_by_batch": by_batch, "stream_metrics": record_metrics(records),
                "unedited": strip(other["unedited"]),
                "perplexity": other["perplexity"]["perplexity"], "perplexity_detail": other["perplexity"],
                "loadavg": other["loadavg"]}
        write_json_atomic(base_path, {"key": base_key, "result": base}, indent=1)

    base["standing_by_batch"] = [None] + [
        split_by_standing(base["stream_metrics"][: k * args.batch_size], stream[: k * args.batch_size], fmt)
        for k in range(1, args.batches + 1)]
    rows = []
    for spec in specs:
        rows += run_editor(spec, model, stream, unedited, fmt, held_out, stats, args, base_fingerprint, say)
    result = {"kedit_bench": "sequential", "command": "python " + " ".join([sys.argv[0]] + sys.argv[1:]),
              "format": fmt, "model": {"source": args.model, "fingerprint": base_fingerprint},
              "data": {"path": str(args.data), "name": args.data.name, "stream": total, "unedited": len(unedited)},
              "settings": {"batches": args.batches, "batch_size": args.batch_size, "seed": args.seed,
                           "stats": stats_settings,
                           "held_out": {"documents_from": args.held_out_from, "tokens": args.ppl_tokens,
                                        "window": args.ppl_window},
                           "torch_threads": torch.get_num_threads(), "editors": specs},
              "base": {k: v for k, v in base.items() if k != "stream_metrics"}, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    # Editors of one stream often run as parallel processes (--select): the read-merge-write is serialised.
    with open(args.out / "partial" / ".merge.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        existing = args.out / "sequential.json"
        if existing.exists() and args.select:  # merge with editors measured by earlier runs of the same stream
            old = json.loads(existing.read_text(encoding="utf-8"))
            same_stream = (old.get("model", {}).get("fingerprint") == base_fingerprint
                           and old.get("settings", {}).get("batches") == args.batches)
            if same_stream:
                kept = [r for r in old["rows"] if r["editor"] not in {s["label"] for s in specs}]
                result["rows"] = kept + rows
                known = {s["label"] for s in specs}
                result["settings"]["editors"] = [s for s in old["settings"]["editors"]
                                                 if s["label"] not in known] + specs
                result["commands"] = old.get("commands", [old.get("command")]) + [result["command"]]
        write_json_atomic(existing, result, indent=1)
        write_csv(result, args.out / "sequential.csv")
        plot(result, args.out / "sequential.png")
    say(f"wrote {existing}, sequential.csv, sequential.png")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeditError as exc:
        print(f"sequential: error: {exc}", file=sys.stderr)
        sys.exit(2)
