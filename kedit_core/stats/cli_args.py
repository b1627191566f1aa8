"""The command-line options through which every command that needs C0 gets it (``kedit edit``,
``kedit eval --method``, ``kedit demo``, and ``kedit stats`` itself): one definition, so they all
accept the same flags."""
from __future__ import annotations

import argparse

from .source import CovarianceSource, FileCovariance, parse_cov_args


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_corpus_arguments(group, *, batch_prefix: str = "") -> None:
    """Where C0 is computed from and cached: ``--corpus``, budgets, ``--stats-dir`` and friends.

    ``batch_prefix`` renames the batch-size options (``--stats-batch-tokens``) in commands whose own
    ``--batch-tokens`` means something else (``kedit eval`` scores in batches too)."""
    group.add_argument("--corpus", metavar="FILE|hf:NAME[:CONFIG][:SPLIT]",
                       help="text to compute C0 from: a plain text file (documents separated by blank lines, or "
                            "one per line), a .jsonl file with a text field, or a Hugging Face dataset (needs the "
                            "optional 'datasets' package and the network)")
    group.add_argument("--tokens", type=_positive_int, metavar="N",
                       help="token budget: stop once N tokens count (default: the whole corpus)")
    group.add_argument("--docs", type=_positive_int, metavar="N", help="document budget: use the first N documents")
    group.add_argument("--stats-dir", metavar="DIR",
                       help="statistics cache (default $KEDIT_STATS_DIR or ~/.cache/kedit/stats); with no "
                            "--corpus, cached statistics for the model are looked up there")
    group.add_argument(f"--{batch_prefix}batch-tokens", dest="stats_batch_tokens", type=_positive_int, metavar="N",
                       help="padded tokens per statistics forward batch (default 2048 on CPU, 16384 on GPU)")
    group.add_argument(f"--{batch_prefix}chunk-tokens", dest="stats_chunk_tokens", type=_positive_int, metavar="N",
                       help="tokens per chunk, the unit of checkpoints and of work per torchrun process "
                            f"(default 32 x --{batch_prefix}batch-tokens)")
    group.add_argument("--text-field", default="text", metavar="NAME", help="text field of JSONL/dataset records")
    group.add_argument("--doc-separator", choices=("auto", "blank", "line"), default="auto",
                       help="how a plain text corpus is split into documents (auto: blank lines if it has any)")
    group.add_argument("--mom2-dtype", choices=("float32", "float64"), default="float32",
                       help="storage dtype of the cached moment (accumulation is always float64)")
    group.add_argument("--checkpoint-every", type=float, default=600.0, metavar="SECONDS",
                       help="save partial sums this often so a killed run resumes (default 600)")
    group.add_argument("--recompute", action="store_true", help="ignore (and overwrite) cached statistics")


def add_stats_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("covariance statistics (C0)")
    group.add_argument("--cov", action="append", metavar="LAYER=PATH",
                       help="a precomputed moment for one layer: safetensors with tensor 'mom2' (normalised "
                            "Σkkᵀ/count) and optional 'count'; repeat per layer")
    add_corpus_arguments(group, batch_prefix="stats-")


def cached_source_from_args(args: argparse.Namespace, *, progress: bool = True):
    """The :class:`~kedit_core.stats.cache.CachedCovariance` the corpus options describe, or None when
    neither ``--corpus`` nor ``--stats-dir`` was given."""
    corpus, stats_dir = getattr(args, "corpus", None), getattr(args, "stats_dir", None)
    if corpus is None and stats_dir is None:
        return None
    from .cache import CachedCovariance

    return CachedCovariance(
        corpus, stats_dir, tokens=getattr(args, "tokens", None), docs=getattr(args, "docs", None),
        batch_tokens=getattr(args, "stats_batch_tokens", None),
        chunk_tokens=getattr(args, "stats_chunk_tokens", None),
        mom2_dtype=getattr(args, "mom2_dtype", "float32"),
        text_field=getattr(args, "text_field", "text"), separator=getattr(args, "doc_separator", "auto"),
        checkpoint_every=getattr(args, "checkpoint_every", 600.0), progress=progress,
        recompute=getattr(args, "recompute", False))


def source_from_args(args: argparse.Namespace, *, fallback: CovarianceSource | None = None) -> CovarianceSource:
    """The C0 source the parsed options describe: the ``--cov`` files, then (for the other layers) the
    statistics cache computed from ``--corpus`` / read from ``--stats-dir`` when given, else ``fallback``."""
    cached = cached_source_from_args(args)
    return FileCovariance(parse_cov_args(getattr(args, "cov", None)), fallback=cached or fallback)
