"""Writing evaluation results people read: ``metrics.json`` (everything: settings, seed, resolved
hyper-parameters, per-record and aggregate metrics before and after), ``metrics.csv`` (one row per edit
count and phase), ``records.csv`` (one row per record, edit count and phase), ``generations.json`` (the
sampled texts behind GE/RS), ``hparams.json``, and PNG charts: ``metrics.png`` (before/after bars) and,
for a sweep over edit counts, ``scaling.png`` (metrics against the number of edits, as in Figure 5 of
the MEMIT paper). Files are written atomically."""
from __future__ import annotations

import copy
import csv
import io
import json
from pathlib import Path

from ..atomic import write_bytes_atomic
from .harness import headline_metrics, metric_names

__all__ = ["write_report", "plot_before_after", "plot_scaling", "format_summary"]

PRE_COLOR, POST_COLOR = "#9e9e9e", "#1f77b4"


def _atomic_write(path: Path, data: bytes) -> None:
    write_bytes_atomic(path, data)


def _json_bytes(data) -> bytes:
    return (json.dumps(data, indent=1, ensure_ascii=False, default=str) + "\n").encode("utf-8")


def _split_texts(result: dict) -> tuple[dict, list]:
    """The result without generated texts, and the texts as their own list."""
    result = copy.deepcopy(result)
    texts = []
    for run in result.get("runs", []):
        for row in run.get("records", []):
            for phase in ("pre", "post"):
                record = row.get(phase)
                if record and "texts" in record:
                    texts.append({"num_edits": run["num_edits"], "case_id": row["case_id"], "phase": phase,
                                  "texts": record.pop("texts")})
    return result, texts


def _csv_bytes(header: list[str], rows: list[list]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in row])
    return buf.getvalue().encode("utf-8")


def write_report(result: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write every output file for a :func:`~kedit_core.evaluation.run_evaluation` result; returns the
    paths by kind."""
    out = Path(out_dir)
    fmt = result["format"]
    names = list(metric_names(fmt))
    paths: dict[str, Path] = {}
    stripped, texts = _split_texts(result)
    paths["json"] = out / "metrics.json"
    _atomic_write(paths["json"], _json_bytes(stripped))
    if texts:
        paths["generations"] = out / "generations.json"
        _atomic_write(paths["generations"], _json_bytes(texts))
    if result.get("edit", {}).get("hparams"):
        paths["hparams"] = out / "hparams.json"
        _atomic_write(paths["hparams"], _json_bytes({"editor": result["edit"].get("editor"),
                                                     "hparams": result["edit"]["hparams"]}))

    agg_names = names + (["Score"] if fmt == "counterfact" else [])
    agg_rows, rec_rows = [], []
    for run in result["runs"]:
        for phase, agg in run["aggregate"].items():
            agg_rows.append([run["num_edits"], phase, agg.get("num_records")] + [agg.get(k) for k in agg_names]
                            + [agg.get(f"{k}_std") for k in names])
        for row in run["records"]:
            for phase in ("pre", "post"):
                if phase in row:
                    metrics = row[phase]["metrics"]
                    rec_rows.append([run["num_edits"], row["case_id"], phase] + [metrics.get(k) for k in names])
    paths["csv"] = out / "metrics.csv"
    _atomic_write(paths["csv"], _csv_bytes(["num_edits", "phase", "num_records"] + agg_names
                                           + [f"{k}_std" for k in names], agg_rows))
    paths["records_csv"] = out / "records.csv"
    _atomic_write(paths["records_csv"], _csv_bytes(["num_edits", "case_id", "phase"] + names, rec_rows))

    paths["png"] = out / "metrics.png"
    _atomic_write(paths["png"], plot_before_after(result))
    if len(result["runs"]) > 1:
        paths["scaling_png"] = out / "scaling.png"
        _atomic_write(paths["scaling_png"], plot_scaling(result))
    return paths


# --------------------------------------------------------------------------------------------------
# charts

def _figure_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _title(result: dict, run: dict) -> str:
    edit = result.get("edit", {})
    model = Path(str(result["model"].get("source", "model"))).name or result["model"].get("source")
    if edit.get("mode") in (None, "none"):
        return f"{result['format']}: unedited {model} ({run['aggregate']['pre'].get('num_records')} records)"
    return f"{result['format']}: {edit.get('editor')} on {model}, {run['num_edits']} edits"


def _value_label(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.2g}" if v != 0 and abs(v) < 0.95 else f"{v:.1f}"


def _bars(ax, labels: list[str], run: dict, title: str, ylabel: str, *, percent: bool = False) -> None:
    import numpy as np

    phases = [("pre", "unedited", PRE_COLOR), ("post", "edited", POST_COLOR)]
    phases = [p for p in phases if p[0] in run["aggregate"]]
    width = 0.8 / len(phases)
    x = np.arange(len(labels))
    for k, (phase, name, color) in enumerate(phases):
        agg = run["aggregate"][phase]
        values = [agg.get(label) for label in labels]
        heights = [0.0 if v is None else v for v in values]
        bars = ax.bar(x + (k - (len(phases) - 1) / 2) * width, heights, width, label=name, color=color)
        for bar, v in zip(bars, values):
            ax.annotate(_value_label(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom" if bar.get_height() >= 0 else "top", fontsize=8,
                        xytext=(0, 2 if bar.get_height() >= 0 else -2), textcoords="offset points")
    ax.set_xticks(x, [label.replace("_acc", "") for label in labels])
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.axhline(0, color="black", linewidth=0.6)
    if percent:
        ax.set_ylim(0, 112)
    else:
        ax.margins(y=0.15)
    ax.grid(axis="y", alpha=0.3)


def plot_before_after(result: dict, run: dict | None = None) -> bytes:
    """Grouped bars of the aggregate metrics before and after the edit (the largest edit count of a
    sweep unless ``run`` is given); returns PNG bytes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    run = run or result["runs"][-1]
    fmt = result["format"]
    pre = run["aggregate"]["pre"]
    if fmt == "counterfact":
        panels = [(["ES", "PS", "NS", "Score"], "Success rates (Score = harmonic mean)", "% of prompts", True),
                  (["rewrite_acc", "paraphrase_acc", "neighborhood_acc"], "Argmax accuracy (whole target)",
                   "% of prompts", True),
                  (["EM", "PM", "NM"], "Probability margins", "Δ probability × 100", False)]
        if pre.get("GE") is not None:
            panels.append((["GE"], "Fluency: n-gram entropy", "bits × 100", False))
        if pre.get("RS") is not None:
            panels.append((["RS"], "Consistency: TF-IDF similarity", "cosine × 100", True))
    else:
        panels = [(list(metric_names(fmt)), "Token-level top-1 accuracy", "% of answer tokens", True)]
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(max(4.6 * cols, 6.5), 3.8 * rows + 0.6), squeeze=False)
    for ax, (labels, title, ylabel, percent) in zip(axes.flat, panels):
        _bars(ax, labels, run, title, ylabel, percent=percent)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.suptitle(_title(result, run), fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=9, frameon=False)
    return _figure_bytes(fig)


def plot_scaling(result: dict) -> bytes:
    """Metrics against the number of edits (log scale), edited (solid) and unedited on the same records
    (dashed), one panel per metric, as in the MEMIT paper's Figure 5; returns PNG bytes."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fmt = result["format"]
    runs = [r for r in result["runs"] if "post" in r["aggregate"]]
    metrics = list(headline_metrics(fmt))
    for extra in ("GE", "RS"):
        if fmt == "counterfact" and any(r["aggregate"]["post"].get(extra) is not None for r in runs):
            metrics.append(extra)
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.4 * rows + 0.5), squeeze=False)
    xs = [r["num_edits"] for r in runs]
    editor = result.get("edit", {}).get("editor", "edited")
    for ax, metric in zip(axes.flat, metrics):
        post = [r["aggregate"]["post"].get(metric) for r in runs]
        pre = [r["aggregate"]["pre"].get(metric) for r in runs]
        ax.plot(xs, pre, linestyle="--", marker="o", color=PRE_COLOR, label="unedited")
        ax.plot(xs, post, linestyle="-", marker="o", color=POST_COLOR, label=editor)
        ax.set_xscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.set_xlabel("number of edits")
        ax.set_title(metric, fontsize=10)
        if metric != "GE":  # percentages: a fixed 0-100 axis, so panels compare at a glance
            ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    model = Path(str(result["model"].get("source", "model"))).name
    fig.suptitle(f"{fmt}: {editor} on {model}, metrics against the number of edits", fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.legend(handles, names, loc="lower center", ncol=len(names), fontsize=9, frameon=False)
    return _figure_bytes(fig)


def format_summary(result: dict) -> str:
    """A plain-text table of the aggregate metrics (what ``kedit eval`` prints)."""
    fmt = result["format"]
    names = list(headline_metrics(fmt))
    if fmt == "counterfact":
        names += ["EM", "PM", "NM", "GE", "RS"]
    lines = []
    header = f"{'edits':>7} {'phase':>5} " + " ".join(f"{n:>7}" for n in names)
    lines.append(header)
    for run in result["runs"]:
        for phase, agg in run["aggregate"].items():
            values = " ".join(f"{'-' if agg.get(n) is None else format(agg[n], '.1f'):>7}" for n in names)
            lines.append(f"{run['num_edits']:>7} {phase:>5} {values}")
    return "\n".join(lines)
