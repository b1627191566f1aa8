"""The statistics cache and :class:`CachedCovariance`, the C0 source that computes what the cache lacks.

One safetensors file per layer holds ``mom2`` (the normalised uncentred second moment ``Σ kkᵀ / count``,
float32 or float64) and ``count``, with kedit's metadata as one JSON string: the format, the model's
fingerprint, the tokenizer's fingerprint, layer, module, corpus identity, token and document budgets,
context length, dtypes, kedit version, and a sha256 of the ``mom2`` bytes. Files live at::

    <stats_dir>/<model>-<fingerprint[:12]>/<budget>-<settings hash>/<module>.safetensors

A file is reused only when every one of those fields matches the request; a truncated or corrupt file
(unreadable, wrong shape, non-finite, or bytes that do not match their recorded hash) is reported with
a warning and recomputed. Files and checkpoints are written atomically.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .._version import __version__
from ..errors import KeditError, TensorFileError
from ..tensorfile import atomic_save_safetensors, check_name, open_tensor_file, tensor_sha256
from .collect import (collect_second_moments, distributed_info, remove_checkpoint, tokenizer_fingerprint)
from .corpus import Corpus, open_corpus
from .source import Moment

__all__ = ["CachedCovariance", "STATS_FORMAT", "default_stats_dir", "read_cache_file", "CacheFileError"]

STATS_FORMAT = "kedit-stats/1"
MOM2_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Metadata recorded for people, not matched: a copy of the same corpus or model elsewhere reuses the cache.
_PROVENANCE = ("model", "corpus_origin")


class CacheFileError(TensorFileError):
    """A statistics file that cannot be trusted (truncated, corrupt, or not a kedit statistics file)."""


# Larger than any real model's key dimension (Llama-3-405B's d_ff is 53,248); a header claiming more is
# rejected before the matrix is allocated.
MAX_KEY_DIM = 1 << 17


def default_stats_dir() -> Path:
    """``$KEDIT_STATS_DIR``, else ``stats/`` in kedit's cache (``$KEDIT_CACHE``, ``~/.cache/kedit``)."""
    if os.environ.get("KEDIT_STATS_DIR"):
        return Path(os.environ["KEDIT_STATS_DIR"])
    from ..zoo import kedit_cache_dir

    return kedit_cache_dir() / "stats"


def _slug(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "x"
    return slug[-limit:]


@dataclass(frozen=True)
class _RunKey:
    """Everything except the layer that decides a cache file's content."""

    model_fingerprint: str
    model_name: str
    tokenizer_fingerprint: str
    corpus: dict
    corpus_origin: str
    tokens: int | None
    docs: int | None
    context_length: int
    forward_dtype: str
    mom2_dtype: str

    def settings(self) -> dict:
        return {"model_fingerprint": self.model_fingerprint, "tokenizer_fingerprint": self.tokenizer_fingerprint,
                "corpus": self.corpus, "tokens": self.tokens, "docs": self.docs,
                "context_length": self.context_length, "forward_dtype": self.forward_dtype,
                "mom2_dtype": self.mom2_dtype, "kedit_version": __version__}

    def run_dir(self, stats_dir: Path) -> Path:
        digest = hashlib.sha256(json.dumps(self.settings(), sort_keys=True).encode()).hexdigest()[:12]
        budget = "-".join(p for p in (f"t{self.tokens}" if self.tokens else "", f"d{self.docs}" if self.docs else "")
                          if p) or "all"
        # Named by content (the model's fingerprint, the settings' hash), not by the model's or the corpus
        # file's name: the same weights under another name or path (a zoo alias, its GGUF file, a copy of
        # the checkpoint) and a renamed copy of the corpus reuse the same files.
        model_dir = f"model-{self.model_fingerprint.split(':')[-1][:16]}"
        return stats_dir / model_dir / f"{budget}-{digest}"

    def metadata(self, layer: int, module: str, count: int, mom2_sha256: str) -> dict:
        return {"format": STATS_FORMAT, "statistic": "mom2 = sum(k k^T) / count (uncentred, normalised)",
                "layer": layer, "module": module, "count": count, "mom2_sha256": mom2_sha256,
                "model": self.model_name, "corpus_origin": self.corpus_origin, **self.settings()}


def read_cache_file(path: str | os.PathLike, *, expected_dim: int | None = None) -> tuple[torch.Tensor, int, dict]:
    """``(mom2, count, metadata)`` of a statistics file, verified; raises :class:`CacheFileError`. The
    header is checked first (tensor names, a square ``mom2`` of at most :data:`MAX_KEY_DIM`, or exactly
    ``expected_dim``, a plain module name and an integer layer in the metadata), so nothing is allocated
    for a file that claims an absurd shape."""
    def fail(message: str) -> CacheFileError:
        return CacheFileError(message)

    try:
        with open_tensor_file(path, what="statistics file") as f:
            meta = f.meta
            if meta.get("format") != STATS_FORMAT:
                raise fail(f"not a kedit statistics file (format {meta.get('format')!r})")
            if f.names != ["count", "mom2"]:
                raise fail(f"holds tensors {f.names}; expected 'count' and 'mom2'")
            shape = f.shapes["mom2"]
            if len(shape) != 2 or shape[0] != shape[1] or not 0 < shape[0] <= MAX_KEY_DIM:
                raise fail(f"mom2 has shape {list(shape)}, expected a square matrix of side 1..{MAX_KEY_DIM}")
            if expected_dim is not None and shape[0] != expected_dim:
                raise fail(f"mom2 is {shape[0]}x{shape[0]}; the model's keys have dimension {expected_dim}")
            if f.dtypes["mom2"] not in ("F32", "F64") or f.shapes["count"] != (1,):
                raise fail(f"mom2 is {f.dtypes['mom2']} and count has shape {list(f.shapes['count'])}; expected "
                           "F32/F64 and [1]")
            check_name(meta.get("module"), "module name in the metadata", f.path)
            if not isinstance(meta.get("layer"), int) or isinstance(meta.get("layer"), bool):
                raise fail(f"metadata layer {meta.get('layer')!r} is not an integer")
            mom2 = f.get("mom2")
            count = int(f.get("count").reshape(-1)[0])
    except CacheFileError:
        raise
    except TensorFileError as exc:
        raise fail(str(exc).removeprefix(f"{path}: ")) from None
    if tensor_sha256(mom2) != meta.get("mom2_sha256"):
        raise fail("mom2's bytes do not match the hash recorded when the file was written")
    if count <= 0 or count != meta.get("count"):
        raise fail(f"count {count} does not match the recorded {meta.get('count')}")
    if not torch.isfinite(mom2).all():
        raise fail("mom2 contains NaN or infinite values")
    return mom2, count, meta


def write_cache_file(path: Path, mom2: torch.Tensor, count: int, key: _RunKey, layer: int, module: str) -> Path:
    mom2 = mom2.to(MOM2_DTYPES[key.mom2_dtype]).contiguous()
    meta = key.metadata(layer, module, count, tensor_sha256(mom2))
    return atomic_save_safetensors({"mom2": mom2, "count": torch.tensor([count], dtype=torch.int64)}, path, meta)


class CachedCovariance:
    """C0 from the statistics cache, computing what is missing from ``corpus`` in one pass.

    ``prepare(model, layers)`` loads every cached layer and computes all the others together (one
    forward per batch, stopped after the deepest layer), writes them to the cache, then
    ``moment(model, layer)`` returns them. Moments are kept per model object once loaded: a model
    edited afterwards keeps getting the statistics of the model as it was when they were prepared (as
    sequential MEMIT/AlphaEdit use them); make a new source to recompute.

    With ``corpus=None`` the source only reads: it looks for a file in ``stats_dir`` made for this
    model and layer (any corpus; with ``tokens`` given, that budget) and fails clearly if there is none
    or several.

    :param corpus: a path, ``hf:NAME[:CONFIG][:SPLIT]``, a list of strings or a corpus object.
    :param stats_dir: cache directory (default :func:`default_stats_dir`); ``False`` keeps nothing on
        disk (no cache, no resume).
    :param tokens, docs: budgets (see :func:`~kedit_core.stats.collect.collect_second_moments`).
    :param mom2_dtype: ``"float32"`` (default) or ``"float64"`` storage of the normalised moment.
    :param checkpoint_every: seconds between checkpoints of a running computation (0: every chunk).
    :param recompute: ignore existing cache files (they are overwritten).
    :param on_checkpoint: called with a summary dict after each checkpoint of a computation.
    """

    def __init__(self, corpus: "str | os.PathLike | Sequence[str] | Corpus | None" = None,
                 stats_dir: str | os.PathLike | None | bool = None, *, tokens: int | None = None,
                 docs: int | None = None, batch_tokens: int | None = None, chunk_tokens: int | None = None,
                 mom2_dtype: str = "float32", text_field: str = "text", separator: str = "auto",
                 checkpoint_every: float = 600.0, progress: bool = True, recompute: bool = False,
                 on_checkpoint=None):
        if mom2_dtype not in MOM2_DTYPES:
            raise KeditError(f"mom2 dtype {mom2_dtype!r}: expected one of {', '.join(MOM2_DTYPES)}")
        self.corpus = open_corpus(corpus, text_field=text_field, separator=separator) if corpus is not None else None
        if stats_dir is False:
            if self.corpus is None:
                raise KeditError("covariance statistics need a corpus to compute from or a statistics directory")
            self.stats_dir = None
        else:
            self.stats_dir = Path(stats_dir) if stats_dir not in (None, True) else default_stats_dir()
        self.tokens, self.docs = tokens, docs
        self.batch_tokens, self.chunk_tokens = batch_tokens, chunk_tokens
        self.mom2_dtype = mom2_dtype
        self.checkpoint_every = checkpoint_every
        self.progress = progress
        self.recompute = recompute
        self.on_checkpoint = on_checkpoint
        self._moments: "weakref.WeakKeyDictionary[torch.nn.Module, dict[int, Moment]]" = weakref.WeakKeyDictionary()
        self.last_report: dict[int, dict] = {}

    # -- keys and paths ---------------------------------------------------------------------------
    def _key(self, model, fingerprint: str | None = None) -> _RunKey:
        return _RunKey(
            model_fingerprint=fingerprint or model.fingerprint(), model_name=Path(str(model.source)).name or "model",
            tokenizer_fingerprint=tokenizer_fingerprint(model.tokenizer),
            corpus=self.corpus.identity() if self.corpus is not None else {},
            corpus_origin=getattr(self.corpus, "origin", ""),
            tokens=self.tokens, docs=self.docs, context_length=model.adapter.context_length,
            forward_dtype=str(model.dtype).replace("torch.", ""), mom2_dtype=self.mom2_dtype)

    def path_for(self, model, layer: int) -> Path | None:
        """Where ``layer``'s statistics for ``model`` are cached (None without a cache directory)."""
        if self.stats_dir is None or self.corpus is None:
            return None
        return self._key(model).run_dir(self.stats_dir) / f"{model.adapter.mlp_out_name(layer)}.safetensors"

    # -- CovarianceSource --------------------------------------------------------------------------
    def prepare(self, model, layers: Sequence[int]) -> None:
        """Load the cached layers and compute all missing ones in one pass over the corpus."""
        pinned = self._moments.setdefault(model.model, {})
        wanted = sorted(set(int(layer) for layer in layers) - set(pinned))
        if not wanted:
            return
        for layer in wanted:
            model.adapter.mlp_out_name(layer)  # range check
        if self.corpus is None:
            for layer in wanted:
                pinned[layer] = self._lookup(model, layer)
            return
        key = self._key(model)
        run_dir = key.run_dir(self.stats_dir) if self.stats_dir is not None else None
        # One process at a time computes into a cache directory: a second one asking for the same
        # statistics waits, then finds the first one's files instead of computing them again.
        with self._exclusive(run_dir):
            missing = []
            for layer in wanted:
                moment = None if self.recompute or run_dir is None else self._load(model, key, run_dir, layer)
                if moment is None:
                    missing.append(layer)
                else:
                    pinned[layer] = moment
                    self.last_report[layer] = {"layer": layer, "status": "cached", "path": moment.origin,
                                               "count": moment.count}
            missing = _agree_across_ranks(missing)
            if missing:
                self._compute(model, key, run_dir, missing, pinned)

    def _exclusive(self, run_dir: Path | None):
        """A file lock (``filelock``) on ``run_dir`` held by rank 0 while it reads and writes there; the
        OS releases it when the holder dies, even by SIGKILL."""
        if run_dir is None or distributed_info()[0] != 0:
            return contextlib.nullcontext()
        from filelock import FileLock, Timeout

        run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(run_dir / ".lock"))
        try:
            return lock.acquire(timeout=0)  # a context manager that releases the lock
        except Timeout:
            if self.progress:
                print(f"kedit: waiting for another process computing the statistics in {run_dir}", file=sys.stderr,
                      flush=True)
            return lock.acquire()

    def moment(self, model, layer: int) -> Moment:
        pinned = self._moments.get(model.model, {})
        if layer not in pinned:
            self.prepare(model, [layer])
            pinned = self._moments[model.model]
        return pinned[layer]

    # -- internals ----------------------------------------------------------------------------------
    def _load(self, model, key: _RunKey, run_dir: Path, layer: int) -> Moment | None:
        module = model.adapter.mlp_out_name(layer)
        path = run_dir / f"{module}.safetensors"
        if not path.exists():
            return None
        try:
            mom2, count, meta = read_cache_file(path, expected_dim=model.adapter.key_size)
        except CacheFileError as exc:
            warnings.warn(f"statistics cache {path} is corrupt or truncated, or not for this model ({exc}); "
                          "recomputing", RuntimeWarning, stacklevel=3)
            return None
        expected = key.metadata(layer, module, count, meta.get("mom2_sha256"))
        differ = sorted(k for k in expected if k not in _PROVENANCE and expected[k] != meta.get(k))
        if differ:
            warnings.warn(f"statistics cache {path} was made with other settings ({', '.join(differ)}); "
                          "recomputing", RuntimeWarning, stacklevel=3)
            return None
        return Moment(mom2, count, str(path))

    def _lookup(self, model, layer: int) -> Moment:
        module = model.adapter.mlp_out_name(layer)
        key = self._key(model)
        model_dir = key.run_dir(self.stats_dir).parent
        candidates = []
        for path in sorted(model_dir.glob(f"*/{module}.safetensors")) if model_dir.is_dir() else []:
            try:
                mom2, count, meta = read_cache_file(path, expected_dim=model.adapter.key_size)
            except CacheFileError as exc:
                warnings.warn(f"statistics cache {path} is corrupt or truncated ({exc}); ignoring it",
                              RuntimeWarning, stacklevel=3)
                continue
            expected = key.settings()
            same = all(meta.get(k) == expected[k] for k in ("model_fingerprint", "tokenizer_fingerprint",
                                                             "context_length", "mom2_dtype", "kedit_version"))
            if same and meta.get("layer") == layer and (self.tokens is None or meta.get("tokens") == self.tokens):
                candidates.append((path, mom2, count))
        if not candidates:
            raise KeditError(f"no cached statistics for layer {layer} ({module}) of this model in {self.stats_dir}; "
                             "compute them with `kedit stats` or give a corpus (--corpus) to compute from")
        if len(candidates) > 1:
            listing = "; ".join(str(p) for p, _, _ in candidates)
            raise KeditError(f"several cached statistics fit layer {layer} of this model ({listing}); give the "
                             "corpus (--corpus) and budget (--tokens) to choose one")
        path, mom2, count = candidates[0]
        self.last_report[layer] = {"layer": layer, "status": "cached", "path": str(path), "count": count}
        return Moment(mom2, count, str(path))

    def _compute(self, model, key: _RunKey, run_dir: Path | None, layers: list[int], pinned: dict) -> None:
        rank, world = distributed_info()
        checkpoint = None
        if run_dir is not None:
            tag = "-".join(str(layer) for layer in layers)
            checkpoint = run_dir / f".partial-layers{tag}-rank{rank}of{world}.safetensors"
        result = collect_second_moments(
            model, layers, self.corpus, tokens=self.tokens, docs=self.docs, batch_tokens=self.batch_tokens,
            chunk_tokens=self.chunk_tokens, checkpoint=checkpoint, checkpoint_every=self.checkpoint_every,
            progress=self.progress, model_fingerprint=key.model_fingerprint, on_checkpoint=self.on_checkpoint)
        if result.count == 0:
            raise KeditError(f"the corpus {self.corpus.name} gave no tokens to collect statistics from")
        for layer in layers:
            module = model.adapter.mlp_out_name(layer)
            mom2 = result.moment(layer).to(MOM2_DTYPES[self.mom2_dtype])
            origin = f"computed from {self.corpus.name}"
            if run_dir is not None:
                path = run_dir / f"{module}.safetensors"
                if rank == 0:
                    write_cache_file(path, mom2, result.count, key, layer, module)
                origin = str(path)
            pinned[layer] = Moment(mom2, result.count, origin)
            self.last_report[layer] = {"layer": layer, "status": "computed", "path": origin, "count": result.count,
                                       "tokens_per_second": result.info.get("tokens_per_second"),
                                       "resumed_from": result.info.get("resumed_from")}
        _barrier()
        remove_checkpoint(checkpoint)


def _agree_across_ranks(missing: list[int]) -> list[int]:
    """Rank 0's list of layers to compute, on every rank (so all ranks join the same collective)."""
    rank, world = distributed_info()
    if world == 1:
        return missing
    import torch.distributed as dist

    box = [missing]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if distributed_info()[1] > 1:
        import torch.distributed as dist

        dist.barrier()
