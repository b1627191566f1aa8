"""``kedit toyworld``: the toy fact world's model, records and corpus."""
from __future__ import annotations

import json
import shlex
import sys

NAME = "toyworld"
HELP = "the toy fact world: train its model, write edit records and a statistics corpus, show info"
DESCRIPTION = """The toy fact world is a seeded world of invented people with CounterFact-style facts
(birthplace, citizenship, native language, occupation, team, instrument), a word-level tokenizer and a
small causal LM trained here to know every fact. `--model toy` everywhere loads the committed model.

  kedit toyworld info [--recall]                 world size, checkpoint settings, measured recall (JSON)
  kedit toyworld train --out DIR                 train a model from scratch (~5 min on 2 CPU cores)
  kedit toyworld records --out edits.json -n 200 CounterFact-schema records for `kedit_core.load_requests`
  kedit toyworld corpus --out corpus.txt         generic text for covariance statistics (C0)

records and corpus use the world of the model given by --model (default: toy, the committed one)."""


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="toyworld_command", metavar="<action>")

    info = sub.add_parser("info", help="world size, checkpoint settings and recall (JSON)")
    info.add_argument("--model", default="toy", help="a toy checkpoint directory, or 'toy' (default)")
    info.add_argument("--recall", action="store_true", help="measure recall per relation and template now")

    train = sub.add_parser("train", help="train the toy model from scratch and save it")
    train.add_argument("--out", required=True, help="output directory (a save_pretrained directory; replaced "
                       "atomically). The committed model: kedit_core/toyworld/checkpoint")
    train.add_argument("--family", choices=["gpt2", "llama"], help="architecture (default gpt2)")
    train.add_argument("--steps", type=int, help="optimisation steps")
    train.add_argument("--seed", type=int, help="training seed (initialisation and data order)")
    train.add_argument("--world-seed", type=int, help="world generator seed")
    train.add_argument("--subjects", type=int, help="number of subjects in the world")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="any other training setting (see TrainConfig), e.g. --set lr=0.002; repeatable")
    train.add_argument("--eval-every", type=int, help="measure recall every N steps and log it")
    train.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    train.add_argument("--device", default="cpu", help="where to train (cpu, cuda, cuda:1; default cpu, whose "
                                                        "run the committed checkpoint is)")
    train.add_argument("--min-recall", type=float, default=0.98,
                       help="exit with status 1 if recall under any template is below this (default 0.98)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")

    records = sub.add_parser("records", help="write CounterFact-schema edit/evaluation records (JSON)")
    records.add_argument("--out", required=True, help="output JSON file")
    records.add_argument("-n", "--num", type=int, help="number of records (default: one per subject; the first "
                         "len(subjects) records have distinct subjects)")
    records.add_argument("--seed", type=int, default=0, help="seed for which facts, templates and new targets")
    records.add_argument("--model", default="toy", help="the checkpoint whose world to use (default: toy)")

    corpus = sub.add_parser("corpus", help="write the generic text corpus for covariance statistics")
    corpus.add_argument("--out", required=True, help="output file: .txt (one document per line, blank line "
                        "between documents) or .jsonl ({\"text\": ...} per line)")
    corpus.add_argument("--seed", type=int, default=0)
    corpus.add_argument("--model", default="toy", help="the checkpoint whose world to use (default: toy)")


def _model_dir(name: str) -> str:
    from ...models import MODEL_ALIASES
    from ... import toyworld  # noqa: F401  (registers the alias)

    return MODEL_ALIASES[name]() if name in MODEL_ALIASES else name


def _train(args) -> int:
    import torch

    from ... import toyworld as tw

    if args.threads:
        torch.set_num_threads(args.threads)
    from ...hparams import parse_assignments

    overrides = parse_assignments(tw.TrainConfig, args.set)
    for key, value in (("family", args.family), ("steps", args.steps), ("seed", args.seed),
                       ("eval_every", args.eval_every)):
        if value is not None:
            overrides[key] = value
    world_overrides = {k: v for k, v in (("seed", args.world_seed), ("num_subjects", args.subjects)) if v is not None}
    if args.subjects is not None:
        world_overrides["num_surnames"] = max(args.subjects, tw.WorldConfig().num_surnames)
    cfg = tw.TrainConfig.from_dict({**tw.TrainConfig().to_dict(), **overrides}, source="--set/options")
    world = tw.build_world(tw.WorldConfig().replace(**world_overrides))
    summary = world.summary()
    print(f"world: {summary['subjects']} subjects, {summary['facts']} facts, {summary['templates']} templates, "
          f"{summary['vocabulary_words']} words", file=sys.stderr)
    result = tw.train_model(world, cfg, progress=not args.quiet, log=lambda m: print(m, file=sys.stderr),
                            device=args.device)
    command = "kedit toyworld " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else None
    out = tw.save_checkpoint(result, args.out, command=command)
    rid, template, worst = result.recall.worst
    print(json.dumps({"out": str(out), "recall": result.recall.overall, "worst_template": [rid, template, worst],
                      **result.info}, indent=2))
    if worst < args.min_recall:
        print(f"kedit: recall under {template!r} ({rid}) is {worst:.4f} < {args.min_recall}", file=sys.stderr)
        return 1
    return 0


def run(args) -> int:
    from ... import toyworld as tw

    action = getattr(args, "toyworld_command", None)
    if action is None:
        print(DESCRIPTION)
        return 0
    if action == "train":
        return _train(args)
    model_dir = _model_dir(args.model)
    world = tw.load_world(model_dir)
    if action == "info":
        meta = tw.checkpoint_metadata(model_dir)
        report = {"model": model_dir, "world": world.summary(), "train": meta.get("train"),
                  "recorded_recall": {k: meta["recall"][k] for k in ("overall", "worst_template")},
                  "info": meta.get("info"), "command": meta.get("command")}
        if args.recall:
            from ...models import load_model

            report["recall"] = tw.fact_recall(load_model(model_dir, device="cpu"), world).to_dict()
        print(json.dumps(report, indent=2))
    elif action == "records":
        records = tw.make_records(world, args.num, seed=args.seed)
        tw.write_records(records, args.out)
        print(f"wrote {len(records)} records to {args.out}", file=sys.stderr)
    elif action == "corpus":
        docs = tw.statistics_corpus(world, seed=args.seed)
        tw.write_corpus(docs, args.out)
        words = sum(len(d.split()) for d in docs)
        print(f"wrote {len(docs)} documents (~{words} words) to {args.out}", file=sys.stderr)
    return 0
