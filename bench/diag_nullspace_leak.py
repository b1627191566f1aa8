"""How much of held-out text does AlphaEdit's null-space projector leave unprotected?

AlphaEdit keeps an update inside the directions where C0 (the preserved keys' second moment) has an
eigenvalue below ``nullspace_threshold``. Text whose keys have energy in those directions is changed by the
edit. For each edited layer and each C0 this prints

* ``kept``: the dimension r of the kept (editable) subspace;
* ``leak``: tr(P C_h) / tr(C_h), the share of the held-out keys' energy inside that subspace, where C_h is
  the second moment of the keys of held-out text (the text the sequential benchmark's perplexity scores)
  and P the projector onto the kept subspace: the part of generic text an edit is free to change;
* ``in-sample``: the same share for the C0's own keys (at most threshold · r / tr(C0)).

A C0 from a few thousand tokens keeps many directions that held-out text still uses; a C0 from more text
(not overlapping the held-out text) shrinks the leak. Writes JSON and prints a table.

    python bench/diag_nullspace_leak.py --model smollm2-135m --corpus ../shared/data/wikitext-2-raw/wiki.test.raw \\
        --held-out-from 25 --held-out-tokens 8192 --c0 docs:25 --c0 tail:100000 --layers 3,4,5,6,7 \\
        --out bench/results/sequential/nullspace_leak.json
"""
from __future__ import annotations

import argparse
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
from kedit_core.atomic import write_json_atomic  # noqa: E402
from kedit_core.errors import KeditError  # noqa: E402
from kedit_core.evaluation import documents_covering  # noqa: E402
from kedit_core.stats import CachedCovariance, open_corpus  # noqa: E402


def c0_source(spec: str, corpus_path: str, documents: list[str], held_out_end: int, stats_dir):
    """``docs:N``: the first N documents (as the sequential benchmark's --stats-docs N);
    ``tail:T``: T tokens from the documents after the held-out text (never overlapping it)."""
    kind, _, amount = spec.partition(":")
    if kind == "docs":
        return CachedCovariance(corpus_path, stats_dir, docs=int(amount), progress=False)
    if kind == "tail":
        return CachedCovariance(documents[held_out_end:], stats_dir, tokens=int(amount), progress=False)
    raise KeditError(f"--c0 {spec!r}: expected docs:N or tail:TOKENS")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--held-out-from", type=int, required=True, help="first held-out document")
    parser.add_argument("--held-out-tokens", type=int, default=8192)
    parser.add_argument("--c0", action="append", required=True, help="docs:N or tail:TOKENS (repeatable)")
    parser.add_argument("--layers", required=True, help="comma-separated layer indices")
    parser.add_argument("--thresholds", default="2e-2", help="comma-separated nullspace_threshold values")
    parser.add_argument("--stats-dir")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = load_model(args.model)
    layers = [int(x) for x in args.layers.split(",")]
    thresholds = [float(x) for x in args.thresholds.split(",")]
    documents = list(open_corpus(args.corpus).documents())
    # the same split as bench/sequential.py --stats-tokens: C0 from the documents after the scored text
    held_out_end = args.held_out_from + documents_covering(model.tokenizer, documents[args.held_out_from:],
                                                           args.held_out_tokens)
    held = CachedCovariance(documents[args.held_out_from:held_out_end], False, tokens=args.held_out_tokens,
                            progress=False)
    held.prepare(model, layers)
    rows = []
    for spec in args.c0:
        source = c0_source(spec, args.corpus, documents, held_out_end, args.stats_dir)
        source.prepare(model, layers)
        for layer in layers:
            c0 = source.moment(model, layer)
            c_h = held.moment(model, layer).mom2.double()
            values, vectors = torch.linalg.eigh(c0.mom2.double())
            for threshold in thresholds:
                kept = vectors[:, values < threshold]
                leak = float(torch.trace(kept.T @ c_h @ kept) / torch.trace(c_h))
                in_sample = float(values[values < threshold].sum() / values.sum())
                rows.append({"c0": spec, "c0_tokens": c0.count, "layer": layer, "threshold": threshold,
                             "kept": int(kept.shape[1]), "leak": leak, "in_sample": in_sample,
                             "c0_trace": float(values.sum())})
                print(f"{spec:>14} ({c0.count:>7} tokens)  layer {layer:>2}  threshold {threshold:<7g} "
                      f"kept {kept.shape[1]:>4}  leak {100 * leak:6.2f} %  in-sample {100 * in_sample:6.3f} %", flush=True)
    if args.out:
        write_json_atomic(args.out, {
            "kedit_bench": "nullspace_leak", "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
            "model": {"source": args.model, "fingerprint": model.fingerprint()},
            "thresholds": thresholds,
            "held_out": {"documents": [args.held_out_from, held_out_end], "tokens": args.held_out_tokens},
            "rows": rows, "seconds": round(time.perf_counter() - start, 1), "loadavg": list(os.getloadavg())})
    return 0


if __name__ == "__main__":
    sys.exit(main())
