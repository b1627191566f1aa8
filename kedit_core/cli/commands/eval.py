"""``kedit eval``: CounterFact / zsRE metrics before and after an edit, with JSON, CSV and PNG reports."""
from __future__ import annotations

import sys
from pathlib import Path

NAME = "eval"
HELP = "evaluate a model on CounterFact or zsRE before and after an edit (or a sweep of edit counts)"
DESCRIPTION = """Evaluate the unedited model on the first N records of a CounterFact or zsRE file; then edit
with --method (any installed editor, computing the edit of those records' requests) or apply a saved
--deltas file, evaluate again, and revert. --sizes 10,100,1000 repeats the edit at several batch sizes
from the same base weights and plots the metrics against the number of edits.

Writes to --out: metrics.json (settings, seed, resolved hyper-parameters, per-record and aggregate
metrics before and after), metrics.csv (aggregates), records.csv (per record), generations.json
(CounterFact texts behind GE/RS), hparams.json, metrics.png (before/after bars) and, for sweeps,
scaling.png. Finished phases are kept under OUT/partial/ and reused when the same command runs again.

CounterFact: ES, PS, NS (and margins EM/PM/NM) from the mean per-token NLL of " " + target after each
prompt; Score = harmonic mean of ES, PS, NS; argmax accuracies; GE (n-gram entropy of seeded top-k
samples) unless --no-generation; RS (TF-IDF cosine) when --reference-texts is given.
zsRE: teacher-forced token-level top-1 accuracy for efficacy, paraphrase and specificity."""


def _int_list(text: str) -> list[int]:
    import argparse

    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 10,100,1000; got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers; got {text!r}")
    return values


def add_arguments(parser) -> None:
    from ...stats import add_stats_arguments

    parser.add_argument("--model", required=True, help="hub name, save_pretrained directory, or kedit alias")
    parser.add_argument("--data", required=True, type=Path, help="CounterFact or zsRE (MEND eval) JSON/JSONL file")
    parser.add_argument("--format", default="auto", choices=("counterfact", "zsre", "auto"),
                        help="record format (default: decided by the first record)")
    parser.add_argument("--n", type=int, help="evaluate the first N records (default: all; with --sizes, the "
                                              "largest size)")
    edit = parser.add_mutually_exclusive_group()
    edit.add_argument("--method", help="editor to run on the records' requests (see `kedit plugins`)")
    edit.add_argument("--deltas", type=Path, help="apply this saved delta file instead of computing an edit")
    parser.add_argument("--hparams", help="hyper-parameter JSON file for --method (default: the editor's "
                                          "defaults for this model)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one hyper-parameter of --method (JSON value), e.g. --set layers=[3,4]")
    parser.add_argument("--seed", type=int, default=0, help="seed for the editor and for generation (default 0)")
    parser.add_argument("--sizes", type=_int_list, help="edit counts to sweep, e.g. 10,100,1000 (needs --method)")
    parser.add_argument("--out", type=Path, help="output directory (default: kedit-eval/<data>-<method>)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (default)")
    parser.add_argument("--batch-tokens", type=int,
                        help="padded tokens per scoring batch (default: 512 on CPU, 8192 on CUDA)")
    gen = parser.add_argument_group("generation metrics (CounterFact GE and RS)")
    gen.add_argument("--no-generation", action="store_true", help="skip GE/RS (no text is sampled)")
    gen.add_argument("--gen-length", type=int, default=100,
                     help="tokens per generated text, prompt included (reference: 100)")
    gen.add_argument("--gen-top-k", type=int, default=5, help="top-k sampling (reference: 5)")
    gen.add_argument("--gen-batch", type=int, default=64, help="prompts generated together")
    gen.add_argument("--reference-texts", type=Path,
                     help="texts about each new object, for RS: the reference's attribute_snippets.json layout "
                          "or {relation_id: {target_id: [texts]}}")
    gen.add_argument("--tfidf-corpus", type=Path,
                     help="corpus to fit TF-IDF on (text file: a document per line; or JSON/JSONL); default: "
                          "the reference texts themselves")
    parser.add_argument("--force", action="store_true",
                        help="apply deltas made for another model fingerprint or other requests")
    parser.add_argument("--fresh", action="store_true", help="recompute everything, ignoring OUT/partial/")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_stats_arguments(parser)


def run(args) -> int:
    from ...errors import KeditError
    from ...evaluation import (EditPlan, EvalSettings, GenerationSettings, ReferenceTexts, TfidfModel, format_summary,
                               load_cases, run_evaluation, write_report)
    from ...evaluation.datasets import file_sha256
    from ...evaluation.text_metrics import read_documents
    from ...models import load_model
    from ...stats import source_from_args

    def say(message: str) -> None:
        print(f"kedit eval: {message}", file=sys.stderr, flush=True)

    if args.sizes and not args.method:
        raise KeditError("--sizes sweeps an editor over edit counts: give --method too")
    if (args.hparams or args.set) and not args.method:
        raise KeditError("--hparams and --set apply to --method")
    if args.n is not None and args.n < 1:
        raise KeditError(f"--n {args.n}: expected at least 1")
    if args.batch_tokens is not None and args.batch_tokens < 1:
        raise KeditError(f"--batch-tokens {args.batch_tokens}: expected a positive number of tokens")
    try:
        gen_settings = GenerationSettings(max_length=args.gen_length, top_k=args.gen_top_k, seed=args.seed,
                                          max_batch=args.gen_batch)
    except ValueError as exc:
        raise KeditError(f"generation options: {exc}") from None

    limit = args.n if args.n is not None else (max(args.sizes) if args.sizes else None)
    fmt, cases = load_cases(args.data, args.format, limit=limit)
    if args.sizes and max(args.sizes) > len(cases):
        raise KeditError(f"--sizes asks for {max(args.sizes)} edits but only {len(cases)} records were read from "
                         f"{args.data}")

    references = tfidf = None
    if args.reference_texts is not None:
        if fmt != "counterfact":
            raise KeditError("--reference-texts is for CounterFact's RS metric")
        references = ReferenceTexts.load(args.reference_texts)
        docs = read_documents(args.tfidf_corpus) if args.tfidf_corpus is not None else references.all_texts()
        if not docs:
            raise KeditError(f"{args.reference_texts} holds no texts to fit TF-IDF on; pass --tfidf-corpus")
        tfidf = TfidfModel.fit(docs)
    elif args.tfidf_corpus is not None:
        say("--tfidf-corpus without --reference-texts: RS needs reference texts, so it is not computed")

    overrides = {}
    if args.set:
        from ...editors import get_editor
        from ...hparams import parse_assignments

        overrides = parse_assignments(get_editor(args.method).HParams, args.set)
    plan = None
    if args.method or args.deltas:
        plan = EditPlan(method=args.method, hparams=args.hparams, overrides=overrides, deltas=args.deltas,
                        seed=args.seed,
                        stats=source_from_args(args) if args.method else None,
                        check_fingerprint=not args.force,
                        describe_stats={"cov": list(getattr(args, "cov", None) or [])})
    tag = args.method or ("deltas" if args.deltas else "unedited")
    out = args.out or Path("kedit-eval") / f"{args.data.stem}-{tag}"

    say(f"loading {args.model}")
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    settings = EvalSettings(max_tokens=args.batch_tokens, generation=(fmt == "counterfact" and not args.no_generation),
                            generation_settings=gen_settings, progress=not args.no_progress)
    metadata = {"data": {"path": str(args.data), "sha256": file_sha256(args.data), "format": fmt,
                         "num_records_read": len(cases)},
                "seed": args.seed,
                "command": "kedit " + " ".join(sys.argv[1:]) if sys.argv and "kedit" in Path(sys.argv[0]).name else None,
                "rs": None if references is None else {"reference_texts": str(args.reference_texts),
                                                       "tfidf_corpus": str(args.tfidf_corpus or args.reference_texts),
                                                       "tfidf_documents": tfidf.num_documents}}
    result = run_evaluation(model, cases, fmt, plan=plan, sizes=args.sizes, settings=settings, references=references,
                            tfidf=tfidf, out_dir=out, resume=not args.fresh, log=say, metadata=metadata)
    paths = write_report(result, out)
    print(format_summary(result))
    for kind, path in paths.items():
        print(f"{kind:>12}: {path}")
    return 0
