"""Collecting C0: the uncentred second moment of the keys (the MLP output projection's input) of
several layers in **one** forward pass over a corpus.

How a run goes (:func:`collect_second_moments`):

* Documents are read in corpus order, tokenised (with the tokenizer's special tokens, as the model
  sees text) and truncated to the model's context length. A token budget cuts the last document so
  that exactly ``tokens`` tokens count; a document budget stops after ``docs`` documents.
* The token stream is cut into *chunks* of about ``chunk_tokens`` tokens. A chunk's documents are
  sorted by length and grouped into padded batches of at most ``batch_tokens`` tokens (a longer
  document is a batch of its own) whose rows are all at least 90% as long as the longest, so padding
  stays under 10%.
* Each batch runs forward once with hooks on every requested layer's projection; the forward stops
  right after the deepest one (later layers and the LM head never run). Every non-padding token's key
  is added into a float64 accumulator per layer with :func:`kedit_core.ops.cov_accumulate_` (upper
  triangle only; keys of small batches are gathered first so each update multiplies at least
  ``batch_tokens / 2`` rows), mirrored once at the end.
* Chunks are the unit of resumption and of distribution: with ``checkpoint=path`` the partial sums
  and the position in the corpus are saved atomically after a chunk at most every
  ``checkpoint_every`` seconds, and a later run with the same settings continues from there, ending
  with the same sums as an uninterrupted run. Under ``torch.distributed`` (``torchrun``), rank ``r``
  of ``W`` forwards the chunks ``r, r + W, ...`` (every rank tokenises the stream to find the chunk
  boundaries, which is cheap next to the forward); sums and counts are all-reduced at the end.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from .. import ops
from .._version import __version__
from ..errors import KeditError, KeditRuntimeError
from ..tracing import TraceDict
from .corpus import Corpus, open_corpus

__all__ = ["SecondMoments", "collect_second_moments", "default_batch_tokens", "distributed_info",
           "init_distributed", "distributed_device", "tokenizer_fingerprint", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "kedit-stats-partial/1"
_TOKENIZE_GROUP = 256  # documents per tokenizer call


@dataclass
class SecondMoments:
    """Result of a collection: per layer, the symmetric float64 ``Σ kkᵀ`` (CPU) and the token count."""

    sums: dict[int, torch.Tensor]
    count: int
    info: dict = field(default_factory=dict)

    def moment(self, layer: int) -> torch.Tensor:
        """The normalised second moment ``Σ kkᵀ / count`` (float64)."""
        if self.count == 0:
            raise KeditError("no tokens were collected: the corpus (or its budget) is empty")
        return self.sums[layer] / self.count


@dataclass(frozen=True)
class _Position:
    """Where the planner is in the corpus after a chunk: what a checkpoint stores."""

    next_chunk: int = 0
    docs_read: int = 0     # documents taken from the corpus iterator (empty ones included)
    docs_used: int = 0     # documents that contributed tokens
    tokens: int = 0        # tokens planned so far (all ranks)


@dataclass
class _Chunk:
    index: int
    documents: list[list[int]]
    after: _Position


def default_batch_tokens(device: torch.device | str) -> int:
    """Tokens per forward batch: enough to keep a GPU busy, small enough for a CPU's caches."""
    # CPU: 2048 keeps padding near 4% with length-sorted chunks (4096: ~8%) while GEMMs stay efficient.
    return 16384 if torch.device(device).type == "cuda" else 2048


def distributed_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised default process group, or ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def distributed_device(device: str = "auto") -> str:
    """The device of this ``torchrun`` rank: ``device`` when given; for ``"auto"``, the rank's own GPU
    (``cuda:LOCAL_RANK``) when the machine has a GPU for every local rank, else the CPU (two ranks never
    share a GPU: NCCL refuses that)."""
    if device != "auto":
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", str(local_rank + 1)))
    if torch.cuda.is_available() and local_ranks <= torch.cuda.device_count():  # the same choice on every rank
        return f"cuda:{local_rank}"
    return "cpu"


def init_distributed(device: str = "auto") -> bool:
    """Initialise ``torch.distributed`` from ``torchrun``'s environment (``WORLD_SIZE`` > 1): NCCL when
    this rank runs on its own GPU (:func:`distributed_device`), otherwise gloo. Returns whether a
    multi-process group is active."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not dist.is_initialized():
        rank_device = torch.device(distributed_device(device))
        backend = "nccl" if rank_device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(rank_device)
        dist.init_process_group(backend)
    return dist.get_world_size() > 1


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides how the tokenizer turns text into ids (vocabulary, merges,
    normalisation, special tokens such as a prepended BOS)."""
    import hashlib
    import json

    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Truncation and padding are per-call state that encoding calls set on the backend; not identity.
        spec = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    specials = {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    h.update(json.dumps(specials, sort_keys=True).encode())
    h.update(repr(tokenizer("a b", add_special_tokens=True)["input_ids"]).encode())
    return "sha256:" + h.hexdigest()


# -- planning ---------------------------------------------------------------------------------------

def _token_stream(corpus: Corpus, tokenizer, max_length: int, skip: int) -> Iterator[list[int]]:
    """Token ids of each document after the first ``skip``, in order (empty lists for documents that
    tokenise to nothing)."""
    docs = corpus.documents()
    for _ in range(skip):
        if next(docs, None) is None:
            return
    group: list[str] = []

    def encode(texts):
        return tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]

    for text in docs:
        group.append(text)
        if len(group) == _TOKENIZE_GROUP:
            yield from encode(group)
            group = []
    if group:
        yield from encode(group)


def _plan_chunks(corpus: Corpus, tokenizer, *, max_length: int, tokens: int | None, docs: int | None,
                 chunk_tokens: int, start: _Position) -> Iterator[_Chunk]:
    pos = start
    current: list[list[int]] = []
    current_tokens = 0
    docs_read, docs_used, total = pos.docs_read, pos.docs_used, pos.tokens
    index = pos.next_chunk

    def budget_left() -> bool:
        return (tokens is None or total < tokens) and (docs is None or docs_used < docs)

    if budget_left():
        for ids in _token_stream(corpus, tokenizer, max_length, skip=pos.docs_read):
            docs_read += 1
            if not ids:
                continue
            if tokens is not None and total + len(ids) > tokens:
                # Keys are causal: cutting the last document leaves its kept tokens' keys unchanged.
                ids = ids[: tokens - total]
            current.append(list(ids))
            current_tokens += len(ids)
            total += len(ids)
            docs_used += 1
            if current_tokens >= chunk_tokens or not budget_left():
                yield _Chunk(index, current, _Position(index + 1, docs_read, docs_used, total))
                index += 1
                current, current_tokens = [], 0
            if not budget_left():
                return
    if current:
        yield _Chunk(index, current, _Position(index + 1, docs_read, docs_used, total))


# A batch's rows are at least this fraction of its longest row, so padding never exceeds 10% of it.
_MIN_ROW_FILL = 0.9


def _batches(documents: Sequence[list[int]], batch_tokens: int, pad_id: int
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, int]]:
    """``(input_ids, attention_mask or None, real_tokens)`` per padded batch, longest documents first:
    at most ``batch_tokens`` tokens (a longer document is a batch of its own), and no document shorter
    than 90% of the batch's longest, so padding stays under 10% (None: the batch has no padding)."""
    order = sorted(range(len(documents)), key=lambda i: (-len(documents[i]), i))
    start = 0
    while start < len(order):
        width = len(documents[order[start]])
        rows = max(1, batch_tokens // max(width, 1))
        end = start + 1
        while end < len(order) and end - start < rows and len(documents[order[end]]) >= _MIN_ROW_FILL * width:
            end += 1
        chosen = [documents[i] for i in order[start:end]]
        start = end
        ids = torch.full((len(chosen), width), pad_id, dtype=torch.long)
        lengths = torch.tensor([len(doc) for doc in chosen])
        for row, doc in enumerate(chosen):
            ids[row, : len(doc)] = torch.tensor(doc, dtype=torch.long)
        if bool((lengths == width).all()):
            yield ids, None, int(lengths.sum())
        else:
            mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
            yield ids, mask, int(lengths.sum())


class _Accumulator:
    """Per-layer float64 ``Σ kkᵀ`` (upper triangle). Keys of small batches are gathered until at
    least ``min_rows`` rows are waiting, so each triangle update (whose cost includes a pass over the
    d x d accumulator) multiplies enough rows; a batch that large on its own goes straight in."""

    def __init__(self, sums: dict[int, torch.Tensor], min_rows: int):
        self.sums = sums
        self.min_rows = min_rows
        self.pending: dict[int, list[torch.Tensor]] = {layer: [] for layer in sums}
        self.pending_rows = 0

    def add(self, keys: dict[int, torch.Tensor], mask: torch.Tensor | None, rows: int) -> None:
        if self.pending_rows == 0 and rows >= self.min_rows:
            for layer, k in keys.items():
                ops.cov_accumulate_(self.sums[layer], k, mask)
            return
        for layer, k in keys.items():
            flat = k.reshape(-1, k.shape[-1])
            if mask is not None and flat.device.type == "cuda":  # zeros instead of a gather: no host sync
                flat = torch.where(mask.reshape(-1, 1), flat, flat.new_zeros(()))
            elif mask is not None:
                flat = flat[mask.reshape(-1)]
            self.pending[layer].append(flat)
        self.pending_rows += rows
        if self.pending_rows >= self.min_rows:
            self.flush()

    def flush(self) -> None:
        if self.pending_rows:
            for layer, parts in self.pending.items():
                ops.cov_accumulate_(self.sums[layer], torch.cat(parts) if len(parts) > 1 else parts[0])
                parts.clear()
            self.pending_rows = 0


# -- checkpoints -------------------------------------------------------------------------------------

def _save_checkpoint(path: Path, sums: dict[int, torch.Tensor], count: int, settings: dict, pos: _Position) -> None:
    from ..tensorfile import atomic_save_safetensors

    tensors = {f"sum.{layer}": s.detach().to("cpu") for layer, s in sums.items()}
    tensors["count"] = torch.tensor([count], dtype=torch.int64)
    meta = {"format": CHECKPOINT_FORMAT, "settings": settings, "position": pos.__dict__}
    atomic_save_safetensors(tensors, path, meta)


def _load_checkpoint(path: Path, settings: dict, layers: Sequence[int], device: torch.device, dim: int):
    """``(sums, count, position)`` from a checkpoint made with the same settings, else None (with a
    warning saying why the file is not used). Shapes are checked before any tensor is read."""
    import warnings

    from ..tensorfile import open_tensor_file

    if not path.exists():
        return None
    try:
        with open_tensor_file(path, what="statistics checkpoint") as f:
            meta = f.meta
            if meta.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
            saved = meta.get("settings") if isinstance(meta.get("settings"), dict) else {}
            if saved != settings:
                differ = sorted(k for k in set(settings) | set(saved) if settings.get(k) != saved.get(k))
                warnings.warn(f"{path}: partial statistics from other settings ({', '.join(differ)}); starting over",
                              RuntimeWarning, stacklevel=3)
                return None
            expected = {f"sum.{layer}": (dim, dim) for layer in layers}
            expected["count"] = (1,)
            if f.shapes != expected:
                raise ValueError(f"tensor shapes {f.shapes}, expected {expected}")
            sums = {layer: f.get(f"sum.{layer}").to(device) for layer in layers}
            count = int(f.get("count")[0])
            pos = _Position(**meta["position"])
    except Exception as exc:  # a truncated or corrupt file is never used
        warnings.warn(f"{path}: unreadable partial statistics ({exc}); starting over", RuntimeWarning, stacklevel=3)
        return None
    return sums, count, pos


# -- the pass ----------------------------------------------------------------------------------------

def _resolve_layers(model, layers: Sequence[int]) -> list[int]:
    layers = sorted(set(int(layer) for layer in layers))
    if not layers:
        raise KeditError("no layers given to collect statistics for")
    for layer in layers:
        model.adapter.mlp_out_name(layer)  # range check with a clear message
    return layers


@torch.no_grad()
def collect_second_moments(model, layers: Sequence[int], corpus, *, tokens: int | None = None,
                           docs: int | None = None, batch_tokens: int | None = None,
                           chunk_tokens: int | None = None, checkpoint: str | os.PathLike | None = None,
                           checkpoint_every: float = 600.0, progress: bool = True,
                           model_fingerprint: str | None = None,
                           on_checkpoint: Callable[[dict], None] | None = None) -> SecondMoments:
    """Σ kkᵀ and the token count for the keys of every layer in ``layers``, from one pass over ``corpus``.

    :param model: a :class:`~kedit_core.models.LoadedModel` (its adapter names the projections).
    :param corpus: anything :func:`~kedit_core.stats.corpus.open_corpus` accepts.
    :param tokens: stop once this many tokens count (the last document is cut); None: no limit.
    :param docs: stop after this many documents; None: no limit.
    :param batch_tokens: padded tokens per forward batch (default :func:`default_batch_tokens`).
    :param chunk_tokens: tokens per chunk (the unit of checkpoints and of distribution); default
        ``32 * batch_tokens``.
    :param checkpoint: file for partial sums; an existing one made with the same settings is resumed.
        It is left in place on success (the caller removes it once the result is stored).
    :param checkpoint_every: seconds between checkpoints (0: after every chunk).
    :param on_checkpoint: called with a summary dict after each checkpoint is written.
    """
    if tokens is not None and tokens <= 0:
        raise KeditError(f"token budget must be positive; got {tokens}")
    if docs is not None and docs <= 0:
        raise KeditError(f"document budget must be positive; got {docs}")
    layers = _resolve_layers(model, layers)
    corpus = open_corpus(corpus)
    adapter, tokenizer = model.adapter, model.tokenizer
    device = model.device
    batch_tokens = int(batch_tokens or default_batch_tokens(device))
    chunk_tokens = int(chunk_tokens or 32 * batch_tokens)
    if batch_tokens <= 0 or chunk_tokens <= 0:
        raise KeditError(f"batch and chunk sizes must be positive; got {batch_tokens} and {chunk_tokens}")
    max_length = adapter.context_length
    rank, world = distributed_info()
    names = {layer: adapter.mlp_out_name(layer) for layer in layers}
    deepest = names[layers[-1]]
    d = adapter.key_size
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    sums = {layer: torch.zeros(d, d, dtype=torch.float64, device=device) for layer in layers}
    count = 0
    pos = _Position()
    ckpt_path = Path(checkpoint) if checkpoint is not None else None
    settings = None
    resumed_from = None
    if ckpt_path is not None:
        from ..fingerprint import model_fingerprint as fingerprint_of

        settings = {
            "model_fingerprint": model_fingerprint or fingerprint_of(model.model),
            "tokenizer": tokenizer_fingerprint(tokenizer), "layers": layers, "corpus": corpus.identity(),
            "tokens": tokens, "docs": docs, "batch_tokens": batch_tokens, "chunk_tokens": chunk_tokens,
            "max_length": max_length, "rank": rank, "world_size": world, "kedit_version": __version__,
        }
        loaded = _load_checkpoint(ckpt_path, settings, layers, device, d)
        if loaded is not None:
            sums, count, pos = loaded
            resumed_from = dict(pos.__dict__)

    from tqdm.auto import tqdm

    bar = tqdm(total=tokens if world == 1 else None, initial=pos.tokens if world == 1 else 0, unit="tok",
               unit_scale=True, dynamic_ncols=True, disable=not progress or rank != 0,
               desc=f"C0 layers {','.join(map(str, layers))}" + (f" rank {rank}/{world}" if world > 1 else ""))
    accumulator = _Accumulator(sums, min_rows=max(1, batch_tokens // 2))
    started = time.perf_counter()
    last_save = started
    forward_tokens = 0
    try:
        for chunk in _plan_chunks(corpus, tokenizer, max_length=max_length, tokens=tokens, docs=docs,
                                  chunk_tokens=chunk_tokens, start=pos):
            if chunk.index % world == rank:
                for input_ids, mask, n_real in _batches(chunk.documents, batch_tokens, pad_id):
                    if device.type == "cuda":  # copies that do not wait for the queued GPU work
                        input_ids = input_ids.pin_memory().to(device, non_blocking=True)
                        mask = mask.pin_memory().to(device, non_blocking=True) if mask is not None else None
                    else:
                        mask = mask.to(device) if mask is not None else None
                    with TraceDict(model.model, list(names.values()), retain_input=True, retain_output=False,
                                   stop_after=deepest) as traces:
                        model.model(input_ids=input_ids, attention_mask=mask, use_cache=False)
                    keys = {layer: traces[name].input for layer, name in names.items()}
                    del traces
                    missing = [names[layer] for layer, k in keys.items() if k is None]
                    if missing:
                        raise KeditRuntimeError(f"the forward pass never reached {', '.join(missing)}")
                    accumulator.add(keys, mask.bool() if mask is not None else None, n_real)
                    count += n_real
                    forward_tokens += n_real
                    bar.update(n_real)
                accumulator.flush()  # a checkpoint after this chunk holds all of it
            pos = chunk.after
            now = time.perf_counter()
            if ckpt_path is not None and now - last_save >= checkpoint_every:
                _save_checkpoint(ckpt_path, sums, count, settings, pos)
                last_save = now
                if on_checkpoint is not None:
                    on_checkpoint({"path": str(ckpt_path), "count": count, **pos.__dict__})
    finally:
        bar.close()
    elapsed = time.perf_counter() - started

    if world > 1:
        count = _all_reduce(sums, count)
    for s in sums.values():
        ops.symmetrize_upper_(s)
    info = {"tokens": count, "documents": pos.docs_used, "chunks": pos.next_chunk, "seconds": elapsed,
            "tokens_per_second": forward_tokens / elapsed if elapsed > 0 else None, "resumed_from": resumed_from,
            "batch_tokens": batch_tokens, "chunk_tokens": chunk_tokens, "world_size": world,
            "corpus": corpus.identity(), "layers": layers}
    return SecondMoments({layer: s.to("cpu") for layer, s in sums.items()}, count, info)


def _all_reduce(sums: dict[int, torch.Tensor], count: int) -> int:
    """Sum partial moments and counts over all ranks (float64; gloo needs CPU tensors)."""
    import torch.distributed as dist

    on_cpu = dist.get_backend() == "gloo"
    some = next(iter(sums.values()))
    total = torch.tensor([count], dtype=torch.int64, device="cpu" if on_cpu else some.device)
    for layer in sorted(sums):
        buf = sums[layer].cpu() if on_cpu else sums[layer]
        dist.all_reduce(buf)
        sums[layer] = buf
    dist.all_reduce(total)
    return int(total.item())


def remove_checkpoint(path: str | os.PathLike | None) -> None:
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
