"""``kedit trace``: causal tracing of known facts (ROME's Fig. 1 heatmaps and Fig. 2 curves) and the
layers it suggests editing."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

NAME = "trace"
HELP = "causal tracing: where a model keeps its facts (ROME's heatmaps), and which layers to edit"
DESCRIPTION = """Causal tracing (Meng et al. 2022, ROME §2) of the facts in --facts: known_1000.json
(ROME's schema), CounterFact (the true target) or plain request files (target_true, else target_new).
Facts whose first target token is not the model's top prediction are skipped and counted.

Per fact: the subject's token embeddings get Gaussian noise (--samples draws, standard deviation
3 x the std of the embeddings at the subjects' tokens over the whole file, or --noise), and the
probability of the answer is measured with clean states restored in the corrupted run: each
(token, layer) hidden state, and the MLP / attention outputs at each token over a window of --window
layers around each layer. Indirect effect = p(answer | corrupted, restored) - p(answer | corrupted).
Many restorations run in one batched forward pass (--per-cell runs ROME's one-forward-per-cell loop).

Writes to --out: facts/NNNNN.json (each fact, written as soon as it is done; a rerun skips finished
facts), heatmaps/NNNNN.png (the three heatmaps), trace.json (settings, counts, forward passes against
ROME's loop, average indirect effect per layer at the subject's last token and at the last token,
suggested layers) and average_effects.png. The suggestion is the --suggest-size consecutive layers with
the highest average MLP effect at the subject's last token, in the form editors' `layers` take.

Example:
  kedit trace --model smollm2-135m --facts known_1000.json --n 100 --out trace-smollm2"""


def add_arguments(parser) -> None:
    from ...causal_trace import FACT_FORMATS, KINDS

    parser.add_argument("--model", required=True, help="hub name, save_pretrained directory, or kedit alias")
    parser.add_argument("--facts", required=True, type=Path,
                        help="known_1000.json, a CounterFact file or plain requests (JSON list or JSONL)")
    parser.add_argument("--format", default="auto", choices=FACT_FORMATS,
                        help="record format (default: decided per record)")
    parser.add_argument("--n", type=int, help="stop after tracing N facts the model predicts (default: all)")
    parser.add_argument("--samples", type=int, default=10, help="noise samples per fact (default 10, as ROME)")
    parser.add_argument("--noise", type=float,
                        help="standard deviation of the noise (default: 3 x the measured subject-embedding std)")
    parser.add_argument("--window", type=int, default=10,
                        help="consecutive MLP / attention layers restored together (default 10, as ROME)")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"traces to run, comma-separated among {', '.join(KINDS)} (default: all)")
    parser.add_argument("--suggest-size", type=int, default=5,
                        help="how many consecutive layers to suggest for editing (default 5, MEMIT's usual count)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    parser.add_argument("--out", type=Path, help="output directory (default: kedit-trace/<facts file name>)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (default)")
    parser.add_argument("--batch-tokens", type=int,
                        help="computed tokens per batched forward (default: 512 on CPU, 8192 on CUDA)")
    parser.add_argument("--per-cell", action="store_true",
                        help="ROME's reference loop: one forward pass per heatmap cell (slow)")
    parser.add_argument("--no-heatmaps", action="store_true", help="do not draw a PNG per fact")
    parser.add_argument("--fresh", action="store_true", help="discard finished facts in --out and start again")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def _kinds(text: str) -> tuple[str, ...]:
    from ...causal_trace import KINDS
    from ...errors import KeditError

    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise KeditError(f"--kinds {text!r}: expected comma-separated values among {', '.join(KINDS)}")
    return kinds


def format_summary(summary: dict, paths: dict) -> str:
    counts, passes = summary["counts"], summary["forward_passes"]
    lines = [f"traced {counts['traced']} fact(s); skipped {counts['not_predicted']} the model does not predict "
             f"(of {counts['facts_examined']} examined, {counts['facts_in_file']} in the file)"]
    if counts["traced"]:
        lines.append(f"p(answer): clean {summary['mean_p_clean']:.3f}, corrupted {summary['mean_p_corrupted']:.3f} "
                     f"(mean); noise std {summary['settings']['noise_scale']:.4g}")
        ratio = passes["rome_over_ours"]
        lines.append(f"forward passes on traced facts: {passes['traced_facts']} (ROME's per-cell loop: "
                     f"{passes['rome_loop_traced_facts']}, {ratio:.1f}x more); {summary['seconds']['total']:.1f} s")
    suggestion = summary.get("suggestion")
    if suggestion:
        layers = suggestion["layers"]
        lines.append(f"suggested layers to edit: {layers} (mean MLP indirect effect at the subject's last token "
                     f"{suggestion['mean_effect']:.4f}; peak at layer {suggestion['peak_layer']}, "
                     f"{suggestion['peak_effect']:.4f}); e.g. --set layers={layers}")
    for kind, path in paths.items():
        lines.append(f"{kind:>12}: {path}")
    return "\n".join(lines)


def run(args) -> int:
    import json

    from ...causal_trace import TraceSettings, load_facts, run_trace
    from ...causal_trace.run import CURVES_PNG, FACT_DIR, HEATMAP_DIR, SUMMARY_FILE
    from ...errors import KeditError
    from ...evaluation.datasets import file_sha256
    from ...models import load_model

    def say(message: str) -> None:
        print(f"kedit trace: {message}", file=sys.stderr, flush=True)

    if args.n is not None and args.n < 1:
        raise KeditError(f"--n {args.n}: expected at least 1")
    settings = TraceSettings(samples=args.samples, noise=args.noise, window=args.window, kinds=_kinds(args.kinds),
                             seed=args.seed, suggest_size=args.suggest_size,
                             mode="per_cell" if args.per_cell else "batched",
                             max_tokens=args.batch_tokens).validate()
    facts = load_facts(args.facts, args.format)
    if not facts:
        raise KeditError(f"{args.facts} holds no facts")
    out = args.out or Path("kedit-trace") / args.facts.stem
    say(f"loading {args.model}")
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    identity = {
        "model": {"source": model.source, "fingerprint": model.fingerprint(), "adapter": model.adapter.name,
                  "num_layers": model.adapter.num_layers, "dtype": str(model.dtype).replace("torch.", "")},
        "data": {"path": str(args.facts), "sha256": file_sha256(args.facts), "format": args.format},
    }
    command = "kedit trace " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["trace"] else None
    summary = run_trace(model, facts, settings, out, limit=args.n, resume=not args.fresh,
                        heatmaps=not args.no_heatmaps, progress=not args.no_progress, identity=identity,
                        metadata={"command": command}, log=say)
    paths = {"summary": out / SUMMARY_FILE, "facts": out / FACT_DIR}
    if summary["counts"]["traced"]:
        paths["curves"] = out / CURVES_PNG
        if not args.no_heatmaps:
            paths["heatmaps"] = out / HEATMAP_DIR
    if args.json:
        print(json.dumps(summary, indent=1, default=str))
    else:
        print(format_summary(summary, paths))
    return 0
