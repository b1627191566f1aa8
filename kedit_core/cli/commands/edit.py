"""``kedit edit``: compute an edit (MEMIT, ROME, r-ROME, EMMET or any installed editor), summarise what it
changed, and save the deltas and/or the edited model."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

NAME = "edit"
HELP = "edit facts in a model (memit, rome, r-rome, emmet, ...) and save the deltas or the edited model"
DESCRIPTION = """Compute an edit for the requests in FILE and report what changed: the edited layers, the
norm of each weight update and the time per phase. Computing never changes the model; --save-deltas
writes the update (a kedit delta file: safetensors with the editor, resolved hyper-parameters, request
hash, base-model fingerprint, seed and context templates), --save-model a normal transformers
checkpoint with the edit applied. The resolved hyper-parameters are also written next to each output.

Hyper-parameters: the published defaults for the model when kedit ships them (GPT-2 XL, GPT-J,
GPT-NeoX-20B, Llama-3-8B), else inferred; --hparams takes a JSON file (the reference repositories'
files are accepted as they are; their module names are checked against the model); --layers and
--set KEY=VALUE override single values; --mode reference runs the published loops exactly.

Covariance statistics (C0) for MEMIT/EMMET/ROME come from --cov LAYER=PATH (one safetensors file with
the normalised moment 'mom2' per edited layer) or the other statistics options below.

Examples:
  kedit edit --model gpt2-xl --method memit --requests edits.json --cov 13=c13.safetensors ... \\
      --save-deltas edit.safetensors
  kedit edit --model ./toy --method rome --requests one.json --layers 2 --set mom2_adjustment=false \\
      --save-model ./toy-edited"""


def add_arguments(parser) -> None:
    from ...stats import add_stats_arguments

    parser.add_argument("--model", required=True, metavar="NAME_OR_DIR", help="hub name or save_pretrained directory")
    parser.add_argument("--method", required=True, metavar="EDITOR",
                        help="editor name: memit, rome, r-rome, emmet, or one a plugin registers (`kedit plugins`)")
    parser.add_argument("--requests", required=True, metavar="FILE",
                        help="requests: CounterFact, zsRE (MEND) or plain JSON/JSONL records")
    parser.add_argument("--format", default="auto", choices=["auto", "counterfact", "zsre", "plain"],
                        help="request file format (default: detected)")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="use only the first N requests")
    parser.add_argument("--hparams", metavar="FILE", help="hyper-parameters JSON (a published file works as is)")
    parser.add_argument("--layers", metavar="LIST", help="edited layers, e.g. 3,4,5 or 3-8 (overrides the hparams)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one hyper-parameter (VALUE is JSON, e.g. --set v_lr=0.1 --set r_rome=true); "
                             "repeatable")
    parser.add_argument("--mode", choices=["fast", "reference"], help="fast (default) or the published loops")
    add_stats_arguments(parser)
    parser.add_argument("--context-templates", metavar="FILE",
                        help='JSON list of template groups, e.g. [["{}"], ["The sky. {}", "Because of this. {}"]]; '
                             "default: sampled from the model with --seed")
    parser.add_argument("--seed", type=int, default=0, help="seed for every random choice (default 0)")
    parser.add_argument("--work-dir", metavar="DIR",
                        help="keep each finished batch of value optimisation here, so an interrupted run of the "
                             "same edit resumes (MEMIT/EMMET fast mode)")
    parser.add_argument("--max-memory", metavar="SIZE",
                        help="memory the batched value optimisation may use, e.g. 8GB or 512MiB (default: 80%% of "
                             "what the device has free); a request that cannot fit alone is an error")
    parser.add_argument("--save-deltas", metavar="OUT.safetensors", help="write the deltas here")
    parser.add_argument("--save-model", metavar="DIR", help="write the edited model (transformers checkpoint) here")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="model dtype: auto, float32, bfloat16, float16")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def parse_layers(text: str | None) -> list[int] | None:
    """``"3,4,5"`` or ``"3-8"`` (or a mix) -> sorted unique layer indices."""
    from ...errors import KeditError

    if text is None:
        return None
    layers: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                layers.extend(range(lo, hi + 1))
            elif part:
                layers.append(int(part))
        except ValueError:
            raise KeditError(f"--layers {text!r}: expected comma-separated layer numbers or ranges, e.g. 3,4,5 or 3-8") \
                from None
    if not layers:
        raise KeditError(f"--layers {text!r}: no layers given")
    return sorted(set(layers))


def hparam_overrides(editor_cls, args) -> dict:
    """The hyper-parameter overrides of ``--set``, ``--layers`` and ``--mode`` for ``editor_cls``."""
    from ...hparams import parse_assignments

    overrides = parse_assignments(editor_cls.HParams, args.set)
    layers = parse_layers(args.layers)
    if layers is not None:
        overrides["layers"] = layers
    if args.mode is not None:
        overrides["mode"] = args.mode
    return overrides


def summarize(result, model, requests, seconds_total: float) -> dict:
    deltas = result.deltas
    return {
        "editor": deltas.editor,
        "requests": len(requests),
        "layers": deltas.extra.get("layers"),
        "mode": deltas.extra.get("mode"),
        "delta_norms": deltas.norms(),
        "seconds": {k: round(v, 3) for k, v in result.timings.items()},
        "seconds_wall": round(seconds_total, 3),
        "seed": deltas.extra.get("seed"),
        "context_templates": deltas.extra.get("context_templates"),
        "warnings": result.info.get("warnings", []),
        "value_batches": result.info.get("value_batches"),
    }


def print_summary(summary: dict, out=None) -> None:
    out = out if out is not None else sys.stdout
    print(f"edited with {summary['editor']} ({summary['mode'] or 'default'} mode): {summary['requests']} request(s)",
          file=out)
    if summary["layers"] is not None:
        print(f"layers: {', '.join(str(x) for x in summary['layers'])}", file=out)
    print("weight updates (Frobenius norm):", file=out)
    for name, norm in summary["delta_norms"].items():
        print(f"  {name:<50s} {norm:12.6g}", file=out)
    print("time per phase (s):", file=out)
    for phase, seconds in summary["seconds"].items():
        print(f"  {phase:<20s} {seconds:10.3f}", file=out)
    for warning in summary["warnings"]:
        print(f"warning: {warning}", file=out)


def write_sidecar(path: Path, payload: dict) -> Path:
    from ...atomic import write_json_atomic

    return write_json_atomic(path, payload, sort_keys=True)


def run(args) -> int:
    """Under ``torchrun`` every process computes the edit, each optimising a share of the requests' values
    (MEMIT/EMMET fast mode); rank 0 prints and writes the outputs."""
    from ...stats.collect import init_distributed

    distributed = init_distributed(args.device)
    try:
        return _run(args, distributed)
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(args, distributed: bool) -> int:
    import torch

    from ... import compute_edit, load_model, load_requests
    from ...editing import load_context_templates, parse_memory
    from ...editors import EditContext, get_editor
    from ...stats import source_from_args
    from ...stats.collect import distributed_device, distributed_info

    requests = load_requests(args.requests, args.format, limit=args.limit)
    editor_cls = get_editor(args.method)  # fail on a misspelled editor before loading the model
    overrides = hparam_overrides(editor_cls, args)
    templates = load_context_templates(args.context_templates) if args.context_templates else None
    max_memory = parse_memory(args.max_memory) if args.max_memory else None
    stats = source_from_args(args)
    torch.manual_seed(args.seed)
    rank, _ = distributed_info()
    device = distributed_device(args.device) if distributed else args.device
    model = load_model(args.model, dtype=args.dtype, device=device)

    def log(message: str) -> None:
        print(f"kedit: {message}", file=sys.stderr)

    context = EditContext(seed=args.seed, progress=not args.no_progress and rank == 0, stats=stats,
                          context_templates=templates, log=log if rank == 0 else None, work_dir=args.work_dir,
                          max_memory=max_memory)
    start = time.perf_counter()
    result = compute_edit(model, requests, editor_cls, args.hparams, context=context, **overrides)
    if rank != 0:   # every rank holds the same deltas; one writes them
        return 0
    summary = summarize(result, model, requests, time.perf_counter() - start)
    settings = {"editor": result.deltas.editor, "hparams": result.deltas.hparams, "seed": args.seed,
                "model": str(args.model), "requests": str(args.requests), "num_requests": len(requests),
                "requests_sha256": result.deltas.requests_sha256, "base_fingerprint": result.deltas.base_fingerprint,
                "context_templates": result.deltas.extra.get("context_templates")}
    if args.save_deltas:
        path = result.deltas.save(args.save_deltas)
        write_sidecar(path.with_name(path.name + ".hparams.json"), settings)
        summary["saved_deltas"] = str(path)
    if args.save_model:
        out = Path(args.save_model)
        with result.deltas.apply(model.model):
            model.model.save_pretrained(out)
        model.tokenizer.save_pretrained(out)
        write_sidecar(out / "kedit_edit.json", settings)
        summary["saved_model"] = str(out)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print_summary(summary)
        for key in ("saved_deltas", "saved_model"):
            if key in summary:
                print(f"{key.replace('_', ' ')}: {summary[key]}")
    return 0
