"""Sweep: which toy-model shape and which MEMIT/ROME settings meet the toy world's editing bars?

Trains a toy model per shape (``kedit_core.toyworld.train_model``, the same code as ``kedit toyworld
train``), computes C0 from the world's statistics corpus, then edits with MEMIT (N requests, several layer
sets and λ) and ROME (sequential requests, several layers) through the same harness the behavioural tests
use, and records ES / PS / NS and the recall of untouched facts for every combination. Each finished
measurement is appended to ``<out>/toy_sweep.json`` at once (a long sweep keeps what it measured), with
the shapes, seeds and settings; a PNG summarises ES against recall drop.

    python bench/toy_sweep.py --device cuda --out /tmp/sweep
    python bench/toy_sweep.py --model toy --rome '[[1]]'          # no training: the committed toy model
    python bench/toy_sweep.py --world '{"relations_per_subject": 1}' --shapes '[{"num_layers": 6, "steps": 500}]'
    python bench/toy_sweep.py --shapes '[{"mlp_ratio": 8}]' --memit '[[[0,1,2], 300]]' --rome '[]'
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_SHAPES = [{}, {"mlp_ratio": 8}, {"mlp_ratio": 8, "steps": 1000}, {"num_layers": 4, "mlp_ratio": 12}]
DEFAULT_MEMIT = [[[0, 1, 2], 300], [[0, 1, 2], 3000], [[1, 2, 3], 1000], [[0, 1, 2, 3], 1000], [[0, 1, 2, 3], 10000]]
DEFAULT_ROME = [[1], [2]]


def plot(results: dict, path: Path) -> None:
    """ES against the recall of untouched facts lost to the edit, one point per run, bars as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, method, es_bar in ((axes[0], "memit", 95), (axes[1], "rome", 90)):
        runs = [r for r in results["runs"] if r["method"] == method]
        for r in runs:
            met = not r["misses"]
            ax.scatter(r["recall"]["before"] - r["recall"]["after"], r["post"]["ES"], c="#2ca02c" if met else "#d62728",
                       s=18 + (r["post"]["NS"] - 50), alpha=0.7)
        if method == "memit":
            ax.axvline(5, color="grey", ls="--", lw=1, label="recall bar (<= 5 points lost)")
        ax.axhline(es_bar, color="grey", ls=":", lw=1, label=f"ES bar ({es_bar})")
        n = runs[0]["edits"] if runs else 0
        ax.set_title(f"{method.upper()}, {n} edits: {sum(not r['misses'] for r in runs)} of {len(runs)} runs meet "
                     "every bar")
        ax.set_xlabel("recall of untouched facts lost by the edit (points)")
        ax.set_ylabel("ES")
        ax.set_xlim(0, 101)
        ax.set_ylim(0, 101)
        ax.legend(loc="lower left", fontsize=8)
    fig.suptitle("toy-world sweep (point size: NS; green: meets all bars)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    import kedit_core as kedit
    from kedit_core.toyworld import TrainConfig, build_world, save_checkpoint, train_model
    from kedit_core.toyworld.editing import EditBars, edit_and_measure, toy_statistics

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--world", default="{}", help="JSON WorldConfig overrides for the trained models' world")
    parser.add_argument("--model", metavar="DIR_OR_toy",
                        help="sweep the editors on this trained toy checkpoint (its own world) instead of training")
    parser.add_argument("--shapes", default=json.dumps(DEFAULT_SHAPES), help="JSON list of TrainConfig overrides")
    parser.add_argument("--memit", default=json.dumps(DEFAULT_MEMIT), help="JSON list of [layers, lambda]")
    parser.add_argument("--rome", default=json.dumps(DEFAULT_ROME), help="JSON list of [layer]")
    parser.add_argument("--corpora", default="[{}]",
                        help="JSON list of statistics-corpus options (toyworld.corpus.statistics_corpus), one C0 each")
    parser.add_argument("--memit-edits", type=int, default=200)
    parser.add_argument("--rome-edits", type=int, default=10)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--plot-only", type=Path, nargs="+", metavar="JSON",
                        help="only draw the PNG from earlier sweep files (merged) into --out")
    parser.add_argument("--out", type=Path, default=Path("bench/results/toy_sweep"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        merged = {"runs": [r for f in args.plot_only for r in json.loads(f.read_text())["runs"]]}
        plot(merged, args.out / "toy_sweep.png")
        return 0
    from kedit_core.toyworld import checkpoint_dir, checkpoint_metadata, load_world

    model_dir = None if args.model is None else (checkpoint_dir() if args.model == "toy" else args.model)
    world = load_world(model_dir) if model_dir else build_world(**json.loads(args.world))
    memit_bars, rome_bars = EditBars(es=95, ps=80, ns=80, max_recall_drop=5), EditBars(es=90, ns=80)
    results = {"device": args.device, "torch": torch.__version__, "world": world.summary(),
               "memit_edits": args.memit_edits, "rome_edits": args.rome_edits, "runs": []}

    def save():
        (args.out / "toy_sweep.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
        plot(results, args.out / "toy_sweep.png")

    for shape in json.loads(args.shapes) if model_dir is None else [None]:
        if model_dir is None:
            cfg = TrainConfig().replace(**shape)
            trained = train_model(world, cfg, progress=False, device=args.device)
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(trained, Path(tmp) / "model")
                model = kedit.load_model(Path(tmp) / "model", device=args.device, dtype=torch.float32)
            model_info = {"shape": shape, "world": world.config.to_dict(), "train": trained.info,
                          "recall": trained.recall.overall, "worst_template": trained.recall.worst[2]}
        else:
            meta = checkpoint_metadata(model_dir)
            cfg = TrainConfig.from_dict(meta["train"])
            model = kedit.load_model(model_dir, device=args.device, dtype=torch.float32)
            model_info = {"checkpoint": str(args.model), "world": meta["world"], "train": meta["info"],
                          "recall": meta["recall"]["overall"],
                          "worst_template": meta["recall"]["worst_template"]["recall"]}
        print(f"model {model_info.get('shape', model_info.get('checkpoint'))}: recall {model_info['recall']:.4f} "
              f"(worst {model_info['worst_template']:.4f}), {model_info['train']['parameters']} parameters",
              flush=True)
        last = cfg.num_layers - 1
        for corpus in json.loads(args.corpora):
            stats = toy_statistics(world, False, **corpus)
            trials = [("memit", args.memit_edits, {"layers": layers, "mom2_update_weight": float(lam),
                                                    "v_loss_layer": last}, memit_bars)
                      for layers, lam in json.loads(args.memit) if max(layers) < last]
            trials += [("rome", args.rome_edits, {"layers": layers, "v_loss_layer": last}, rome_bars)
                       for layers in json.loads(args.rome) if max(layers) < last]
            for method, n, overrides, bars in trials:
                start = time.perf_counter()
                outcome = edit_and_measure(model, world, method, n, stats=stats, overrides=overrides)
                run = {"model": model_info, "corpus": corpus, "method": method, "edits": n, "overrides": overrides,
                       "post": outcome["post"], "recall": outcome["recall"],
                       "seconds": time.perf_counter() - start, "misses": bars.failures(outcome)}
                results["runs"].append(run)
                save()
                post, recall = outcome["post"], outcome["recall"]
                print(f"  {corpus} {method} {n} {overrides['layers']} "
                      f"lambda={overrides.get('mom2_update_weight', '-')}: ES {post['ES']:.1f} PS {post['PS']:.1f} "
                      f"NS {post['NS']:.1f} recall {recall['before']:.1f} -> {recall['after']:.1f}  "
                      f"{'MEETS the bars' if not run['misses'] else 'misses ' + ', '.join(run['misses'])}",
                      flush=True)
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
