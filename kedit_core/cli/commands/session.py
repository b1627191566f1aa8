"""``kedit session``: sequential editing sessions on disk (create, add, status, apply, rollback)."""
from __future__ import annotations

import json
import sys

NAME = "session"
HELP = "sequential editing on disk: create a session on a model, add batches with any editor, roll back"
DESCRIPTION = """An editing session is a directory that holds a stream of edit batches made one after another on
the same model: the base model's fingerprint, every batch's requests, deltas and keys, the running key
statistics AlphaEdit needs (Σ K_p K_pᵀ per layer) and the edited matrices' norms, all written atomically
after each batch.

  kedit session create RUN --model smollm2-135m
  kedit session add RUN --method alphaedit --requests counterfact.json --limit 500 --batch-size 100 \\
      --corpus wiki.test.raw --docs 2000
  kedit session status RUN
  kedit session rollback RUN 3                # back to the model after batch 3, bit-identical
  kedit session apply RUN --save-model OUT    # an edited transformers checkpoint (--upto K: after batch K)

`add --batch-size B` splits the requests into batches of B; run the same command again after a kill and it
skips the batches the session holds and resumes the one in progress from its finished value chunks.
Covariance statistics (C0) are always those of the base model."""


def add_arguments(parser) -> None:
    from ...stats import add_stats_arguments

    sub = parser.add_subparsers(dest="action", metavar="<action>", required=True)

    def model_options(p, required=False):
        p.add_argument("--model", required=required, metavar="NAME_OR_DIR",
                       help="the base model" + ("" if required else " (default: the one the session was created on)"))
        p.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda if available)")
        p.add_argument("--dtype", default="auto", help="model dtype: auto, float32, bfloat16, float16")

    create = sub.add_parser("create", help="start a session on a model")
    create.add_argument("directory")
    model_options(create, required=True)
    create.add_argument("--seed", type=int, default=0, help="seed for every batch (default 0)")
    create.add_argument("--context-templates", metavar="FILE",
                        help="JSON list of template groups used by every batch (default: each editor draws its own)")

    add = sub.add_parser("add", help="compute batches with an editor and add them to the session")
    add.add_argument("directory")
    add.add_argument("--method", required=True, metavar="EDITOR", help="any installed editor (`kedit plugins`)")
    add.add_argument("--requests", required=True, metavar="FILE", help="CounterFact, zsRE or plain JSON/JSONL")
    add.add_argument("--format", default="auto", choices=["auto", "counterfact", "zsre", "plain"])
    add.add_argument("--limit", type=int, metavar="N", help="use only the first N requests")
    add.add_argument("--batch-size", type=int, metavar="B",
                     help="split into batches of B (the whole file is the stream: batches the session holds are "
                          "skipped, so a killed run resumes); default: one batch of all requests")
    add.add_argument("--hparams", metavar="FILE", help="hyper-parameters JSON")
    add.add_argument("--layers", metavar="LIST", help="edited layers, e.g. 5-9")
    add.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one hyper-parameter")
    add.add_argument("--mode", choices=["fast", "reference"])
    add.add_argument("--no-progress", action="store_true")
    model_options(add)
    add_stats_arguments(add)

    status = sub.add_parser("status", help="what the session holds")
    status.add_argument("directory")
    status.add_argument("--json", action="store_true")

    apply = sub.add_parser("apply", help="write the edited model (all batches, or the first K)")
    apply.add_argument("directory")
    apply.add_argument("--save-model", required=True, metavar="DIR")
    apply.add_argument("--upto", type=int, metavar="K", help="only the first K batches")
    model_options(apply)

    rollback = sub.add_parser("rollback", help="drop every batch after batch K (0: back to the base model)")
    rollback.add_argument("directory")
    rollback.add_argument("k", type=int)
    model_options(rollback)


def _open(args):
    from ...models import load_model
    from ...session import EditSession, read_manifest

    manifest = read_manifest(args.directory)
    model = load_model(args.model or manifest["model"], dtype=args.dtype, device=args.device)
    return EditSession.open(args.directory, model)


def _say(message: str) -> None:
    print(f"kedit session: {message}", file=sys.stderr, flush=True)


def run(args) -> int:
    from ...errors import KeditError
    from ...session import EditSession, read_manifest, status_of

    if args.action == "create":
        from ...editing import load_context_templates
        from ...models import load_model

        templates = load_context_templates(args.context_templates) if args.context_templates else None
        model = load_model(args.model, dtype=args.dtype, device=args.device)
        session = EditSession.create(args.directory, model, seed=args.seed, context_templates=templates,
                                     model_source=args.model)
        print(f"created session {session.directory} on {args.model} ({session.base_fingerprint})")
        return 0
    if args.action == "status":
        status = status_of(read_manifest(args.directory), args.directory)
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            print(f"{status['directory']}: {status['batches']} batch(es), {status['edits']} edit(s) on {status['model']}")
            print(f"editors: {', '.join(status['editors']) or '-'}; {status['seconds']:.1f} s of editing")
            for name, ratio in status["norm_ratios"].items():
                print(f"  ‖W_k‖/‖W_0‖ {name:<45s} {ratio:.4f}")
            if status["in_progress"]:
                print(f"in progress: batch {', '.join(status['in_progress'])} (run the same `add` again to resume)")
        return 0
    if args.action == "add":
        from ... import load_requests
        from ...editors import get_editor
        from ...stats import source_from_args
        from .edit import hparam_overrides

        requests = load_requests(args.requests, args.format, limit=args.limit)
        if not requests:
            raise KeditError(f"{args.requests}: no requests (an empty batch cannot be added)")
        editor_cls = get_editor(args.method)
        overrides = hparam_overrides(editor_cls, args)
        stats = source_from_args(args)
        session = _open(args)

        def done(record):
            _say(f"batch {record['index']} ({record['num_requests']} requests, {record['editor']}) in "
                 f"{record['seconds']:.1f} s")

        kwargs = dict(stats=stats, progress=not args.no_progress, log=_say)
        if args.batch_size:
            session.add_stream(requests, editor_cls.name, args.batch_size, args.hparams, on_batch=done, **kwargs,
                               **overrides)
        else:
            done(session.add(requests, editor_cls.name, args.hparams, **kwargs, **overrides))
        status = session.status()
        print(f"{status['directory']}: {status['batches']} batch(es), {status['edits']} edit(s)")
        return 0
    if args.action == "apply":
        session = _open(args)
        out = session.save_model(args.save_model, upto=args.upto)
        print(f"saved the model after {args.upto if args.upto is not None else len(session.batches)} batch(es): {out}")
        return 0
    if args.action == "rollback":
        session = _open(args)
        session.rollback(args.k)
        print(f"{session.directory}: rolled back to batch {args.k}")
        return 0
    raise KeditError(f"unknown session action {args.action!r}")
