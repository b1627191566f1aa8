"""Causal-tracing charts: one fact's three heatmaps (ROME's Fig. 1) and the average indirect effect per
layer over many facts (ROME's Fig. 2), as PNG bytes."""
from __future__ import annotations

import io

import numpy as np

__all__ = ["plot_fact", "plot_average_effects"]

# ROME's colour maps: hidden states purple, MLP green, attention red.
KIND_STYLE = {"hidden": ("Purples", "#6a3d9a", "hidden state"), "mlp": ("Greens", "#238b45", "MLP"),
              "attn": ("Reds", "#cb181d", "attention")}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _token_labels(record: dict) -> list[str]:
    first, end = record["subject_range"]
    labels = []
    for i, token in enumerate(record["tokens"]):
        label = repr(token)[1:-1] if token.strip() else repr(token)
        labels.append(label + "*" if first <= i < end else label)
    return labels


def plot_fact(record: dict, *, window: int, model_name: str = "model") -> bytes:
    """The hidden-state, MLP and attention heatmaps of one traced fact: p(answer) with each (token,
    layer) restored, from the corrupted probability (white) up; subject tokens are starred."""
    plt = _pyplot()
    kinds = [k for k in ("hidden", "mlp", "attn") if k in record["scores"]]
    labels = _token_labels(record)
    num_tokens = len(labels)
    num_layers = len(record["scores"][kinds[0]][0])
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.6 * len(kinds), 0.9 + 0.24 * num_tokens), squeeze=False)
    vmax = max(record["p_clean"], max(max(max(row) for row in record["scores"][k]) for k in kinds))
    for ax, kind in zip(axes[0], kinds):
        cmap, _, name = KIND_STYLE[kind]
        image = ax.pcolor(np.asarray(record["scores"][kind]), cmap=cmap, vmin=record["p_corrupted"], vmax=vmax)
        ax.invert_yaxis()
        ax.set_yticks([0.5 + i for i in range(num_tokens)])
        ax.set_yticklabels(labels if ax is axes[0][0] else [], fontsize=8)
        step = 5 if num_layers > 12 else 1
        ax.set_xticks([0.5 + i for i in range(0, num_layers, step)])
        ax.set_xticklabels([str(i) for i in range(0, num_layers, step)], fontsize=8)
        if kind == "hidden":
            ax.set_title("restoring the hidden state", fontsize=9)
            ax.set_xlabel(f"single restored layer in {model_name}", fontsize=8)
        else:
            ax.set_title(f"restoring {name} outputs", fontsize=9)
            ax.set_xlabel(f"centre of {window} restored {name} layers", fontsize=8)
        bar = fig.colorbar(image, ax=ax)
        bar.ax.tick_params(labelsize=7)
        bar.ax.set_title(f"p({record['answer'].strip()})", fontsize=7)
    fig.suptitle(f"{record['prompt']!r} -> {record['answer'].strip()!r}: p clean {record['p_clean']:.3f}, "
                 f"corrupted {record['p_corrupted']:.3f}", fontsize=9, y=1.0 + 0.35 / (0.9 + 0.24 * num_tokens))
    return _png(fig)


def plot_average_effects(summary: dict) -> bytes:
    """Average indirect effect per layer at the subject's last token and at the prompt's last token, one
    line per kind, the suggested layers shaded."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    effects = summary["average_indirect_effect"]
    titles = {"subject_last": "at the subject's last token", "last": "at the prompt's last token"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
    suggestion = summary.get("suggestion")
    window = summary["settings"]["window"]
    for ax, where in zip(axes, ("subject_last", "last")):
        for kind, curve in effects[where].items():
            _, color, name = KIND_STYLE[kind]
            label = name if kind == "hidden" else f"{name} ({window}-layer window)"
            ax.plot(range(len(curve)), curve, marker="o", markersize=3, color=color, label=label)
        if suggestion and where == "subject_last":
            layers = suggestion["layers"]
            ax.axvspan(layers[0] - 0.5, layers[-1] + 0.5, color="#238b45", alpha=0.12,
                       label=f"suggested layers {layers[0]}-{layers[-1]}")
        ax.axhline(0, color="#999999", linewidth=0.6)
        ax.set_title(f"average indirect effect {titles[where]}", fontsize=9)
        ax.set_xlabel("layer (centre of the window for MLP / attention)", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
    axes[0].set_ylabel("AIE on p(answer)", fontsize=8)
    source = str((summary.get("model") or {}).get("source", "model"))
    model = source.rstrip("/").rsplit("/", 1)[-1] or source
    counts = summary["counts"]
    fig.suptitle(f"causal tracing of {model}: {counts['traced']} facts, {summary['settings']['samples']} noise "
                 f"samples, noise std {summary['settings']['noise_scale']:.3g}", fontsize=9, y=1.02)
    return _png(fig)
