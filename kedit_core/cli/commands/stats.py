"""``kedit stats``: compute and cache covariance statistics (C0) for several layers in one pass."""
from __future__ import annotations

import json
import sys

from ...errors import KeditError

NAME = "stats"
HELP = "compute C0 (the keys' second moment) for several layers in one pass and cache it"
DESCRIPTION = """Collect the uncentred second moment of the keys (the input of each layer's MLP output
projection), E[k kᵀ] = Σ kkᵀ / count over every non-padding token of a corpus, for all the given layers
in ONE forward pass that stops after the deepest of them, and cache one safetensors file per layer.
Editors (`kedit edit ... --corpus/--stats-dir`) reuse the cache when model, tokenizer, corpus and budget
match; a corrupt file is recomputed.

A run saves partial sums every --checkpoint-every seconds; run the same command again after an
interruption (even kill -9) and it resumes. Under
`torchrun --nproc-per-node N -m kedit_core.cli.main stats ...` each
process forwards its share of the corpus (gloo on CPU, NCCL on GPU), the sums are all-reduced and rank
0 writes the cache.

Example:
  kedit stats --model gpt2-xl --layers 13,14,15,16,17 --corpus wiki.txt --tokens 10_000_000 --stats-dir stats/"""


def add_arguments(parser) -> None:
    from ...stats.cli_args import add_corpus_arguments

    parser.add_argument("--model", required=True, metavar="NAME_OR_DIR", help="hub name or save_pretrained directory")
    parser.add_argument("--layers", required=True, metavar="L[,L...]", help="layers, e.g. 3,4,5 or 3-7")
    parser.add_argument("--dtype", default="auto", help="forward dtype: auto, float32, bfloat16, float16")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 (under torchrun: the local GPU)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_corpus_arguments(parser.add_argument_group("corpus, budget and cache"))


def run(args) -> int:
    from ...models import load_model
    from .edit import parse_layers
    from ...stats.cli_args import cached_source_from_args
    from ...stats.collect import distributed_device, distributed_info, init_distributed

    if not args.corpus:
        raise KeditError("kedit stats needs --corpus (a text or JSONL file, or hf:NAME)")
    layers = parse_layers(args.layers)
    distributed = init_distributed(args.device)
    try:
        device = distributed_device(args.device) if distributed else args.device
        model = load_model(args.model, dtype=args.dtype, device=device)
        source = cached_source_from_args(args, progress=not args.no_progress)
        source.prepare(model, layers)
        rank, world = distributed_info()
        if rank == 0:
            report = {"model": str(args.model), "fingerprint": model.fingerprint(), "world_size": world,
                      "corpus": source.corpus.origin, "tokens_budget": args.tokens, "docs_budget": args.docs,
                      "layers": [source.last_report[layer] for layer in layers]}
            json.dump(report, sys.stdout, indent=2)
            sys.stdout.write("\n")
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0
