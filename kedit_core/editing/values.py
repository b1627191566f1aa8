"""Value optimisation (MEMIT's ``compute_z``, ROME's ``compute_v``): for each request, the vector ``δ``
that, added at the subject's last token of one layer, makes the model predict the new target.

Per request the loss is the published one::

    NLL of the target tokens over the rewriting prompts (per token, then averaged over prompts)
  + kl_factor · KL(current ‖ initial) of the next-token distribution on "{subject} is a"
  + v_weight_decay · ‖δ‖ / ‖h_init‖²                       (the norm, not squared)

optimised with Adam (lr ``v_lr``); after each step ``‖δ‖`` is clamped to ``clamp_norm_factor · ‖h_init‖``;
a request stops once its loss is below 5e-2, and the loop leaves on its last iteration before updating,
so at most ``v_num_grad_steps − 1`` steps are taken. The result is ``z = h_init + δ`` with ``h_init`` the
un-edited vector at the injection site for the bare prompt.

Two implementations with the same semantics:

* :func:`optimise_values_reference` — the published loop: one request at a time, a full forward per
  step, ``torch.optim.Adam``, logits everywhere.
* :func:`optimise_values_batched` — kedit's default: all requests of a chunk in one batch (δ is
  ``[N, d]``); the layers below the injection site run once and are replayed; above it, the positions
  before each row's fact token never change either, so their keys/values are kept from the first pass
  and later steps run each row only from its own fact token on (prefixes left-padded so the rows line
  up, true position ids; rows grouped by how many positions they need into a few forwards); the forward
  stops after the last layer and the unembedding runs only where the loss
  reads logits. The first pass runs each row's prefix through every layer (for its keys/values) but its
  suffix only up to the injection site, and the prefix tokens that the rows of one context template share
  (the template's text) once per template, not once per request; a request that stops is
  frozen (its rows leave the batch); Adam is applied row-wise with the same arithmetic as
  ``torch.optim.Adam``, so each request follows the trajectory it would follow alone. Optional: stop a
  request as soon as its target is the argmax at every target position of every rewriting prompt.

Batches are sized from memory (:func:`plan_value_batches`): the first request runs alone while a meter
counts what it holds (the tensors kept across steps and those autograd saves in its first step), and the
others are packed into batches whose predicted peak fits the budget (the device's free memory, or
``memory_bytes``; ``--max-memory``), capped on a CPU where larger batches stop paying. A request that
cannot fit alone is a :class:`~kedit_core.errors.KeditError`, raised by the meter before the memory is
taken. Under ``torchrun`` (:func:`optimise_values_across_ranks`) each process optimises a contiguous share
of the requests and the values are gathered, so every rank holds them all.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import KeditError
from ..text import cache_kwargs
from ..tracing import TraceDict, primary, replace_primary
from .forward import BlockOutput, replaying_blocks
from .rows import TokenRows

__all__ = ["ValueSettings", "Injection", "ValueResult", "ValueStore", "optimise_values_batched",
           "optimise_values_across_ranks", "optimise_values_reference", "plan_value_batches", "free_memory",
           "parse_memory"]

LOSS_THRESHOLD = 5e-2  # compute_z / compute_v: `if loss < 5e-2: break`
# Tokens (of all rows) per value batch on a CPU: past this a step costs the same per token (measured on
# SmolLM2-135M, bench/results/README.md), so larger batches only take memory.
CPU_BATCH_TOKENS = 2048
# Peak memory of a batch over what the meter counts (the backward's gradients, transient logits,
# allocator slack); measured on SmolLM2-135M on the CPU.
MEMORY_HEADROOM = 1.5
FREE_MEMORY_SHARE = 0.8   # of the memory the device reports free, the share value batches may plan with
# Fields that size batches: they change how requests are grouped, not any request's result (each
# follows its own trajectory), so they are not part of a stored batch's key.
SIZING_FIELDS = ("batch_requests", "memory_bytes", "batch_tokens")


@dataclass(frozen=True)
class ValueSettings:
    num_steps: int
    lr: float
    weight_decay: float
    clamp_norm_factor: float
    kl_factor: float
    loss_threshold: float = LOSS_THRESHOLD
    stop_when_most_probable: bool = False
    batch_requests: int | None = None  # requests per batch; None: sized from memory (plan_value_batches)
    memory_bytes: int | None = None    # what value batches may take; None: a share of the device's free memory
    batch_tokens: int | None = None    # tokens (all rows) per batch at most; None: CPU_BATCH_TOKENS on a CPU
    reuse_prefix: bool = True      # compute only the positions from each row's fact token on, above the replay
    max_buckets: int = 8           # rows are grouped by positions to compute into at most this many forwards
    min_bucket_rows: int = 32      # ... each of at least this many rows


@dataclass(frozen=True)
class Injection:
    """Where ``δ`` goes and where the loss reads.

    ``site="block"``: the output of block ``layer`` (MEMIT: the residual stream of the last edited layer);
    ``site="mlp"``: the output of block ``layer``'s MLP (ROME). The NLL reads logits computed from block
    ``nll_layer``'s output (final norm, then unembedding; MEMIT's ``v_loss_layer``), the KL the model's
    final logits.
    """

    layer: int
    site: Literal["block", "mlp"]
    nll_layer: int


@dataclass
class ValueResult:
    target: torch.Tensor           # [N, d] float32: z = h_init + δ
    init: torch.Tensor             # [N, d] h_init
    delta: torch.Tensor            # [N, d]
    steps: list[int] = field(default_factory=list)         # Adam steps taken per request
    final_loss: list[float] = field(default_factory=list)  # the last loss computed per request
    batches: list[int] = field(default_factory=list)       # requests per batch, in order
    plan: dict = field(default_factory=dict)               # how the batches were sized (memory, measured bytes)


class ValueStore:
    """Finished batches of value optimisation kept on disk, so an interrupted edit resumes.

    Value optimisation is most of a large MEMIT run (hours for 10,000 GPT-J requests on the published
    code); each finished batch of requests is written here at once (atomically) under a key made of
    everything its result depends on: the base model's fingerprint, the value settings, the injection
    site and the batch's token rows (requests, context templates and targets, tokenised). Running the
    same edit again with the same directory loads those batches instead of recomputing them; change
    anything and the keys differ, so nothing stale is reused."""

    def __init__(self, directory, base_fingerprint: str):
        self.directory = Path(directory)
        self.base_fingerprint = base_fingerprint
        self.loaded = 0
        self.saved = 0
        self.loaded_seconds = 0.0   # what the loaded batches took when they were computed

    def key(self, rows: TokenRows, requests: list[int], target_lengths, settings: ValueSettings,
            injection: Injection) -> str:
        local = {req: i for i, req in enumerate(requests)}
        chunk = [[rows.ids[r], rows.lookup[r], rows.labels[r], rows.kind[r], local[rows.owner[r]]]
                 for r in rows.rows_of(requests)]
        payload = {"model": self.base_fingerprint, "settings": _result_settings(settings),
                   "injection": asdict(injection), "rows": chunk, "target_lengths": [target_lengths[r] for r in requests]}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]

    def _path(self, key: str):
        return self.directory / f"values-{key}.pt"

    def _plan_path(self, rows: TokenRows, target_lengths, settings: ValueSettings, injection: Injection) -> Path:
        """Where the batch plan of this whole edit is kept: a resumed run groups the requests as the first
        run did (free memory differs between runs), so its stored batches are found again."""
        key = self.key(rows, list(range(len(target_lengths))), target_lengths, settings, injection)
        return self.directory / f"plan-{key}.json"

    def load_plan(self, rows, target_lengths, settings, injection) -> dict | None:
        path = self._plan_path(rows, target_lengths, settings, injection)
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None

    def save_plan(self, rows, target_lengths, settings, injection, plan: dict) -> None:
        from ..atomic import write_json_atomic

        write_json_atomic(self._plan_path(rows, target_lengths, settings, injection), plan)

    def load(self, key: str) -> ValueResult | None:
        path = self._path(key)
        if not path.exists():
            return None
        try:  # weights_only: loading never runs code; a damaged file is recomputed, never trusted
            data = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(data, dict) or not all(isinstance(data.get(k), torch.Tensor)
                                                     for k in ("target", "init", "delta")):
                raise ValueError("not a batch of values")
        except Exception as exc:
            import warnings

            warnings.warn(f"{path} is unreadable ({type(exc).__name__}); recomputing that batch of values",
                          RuntimeWarning, stacklevel=2)
            return None
        self.loaded += 1
        self.loaded_seconds += float(data.get("seconds", 0.0))
        return ValueResult(target=data["target"], init=data["init"], delta=data["delta"], steps=list(data["steps"]),
                           final_loss=list(data["final_loss"]))

    def save(self, key: str, result: ValueResult, seconds: float = 0.0) -> None:
        from ..atomic import atomic_path

        with atomic_path(self._path(key)) as tmp:
            torch.save({"target": result.target, "init": result.init, "delta": result.delta,
                        "steps": list(result.steps), "final_loss": list(result.final_loss),
                        "seconds": float(seconds)}, tmp)
        self.saved += 1


def _result_settings(settings: ValueSettings) -> dict:
    return {k: v for k, v in asdict(settings).items() if k not in SIZING_FIELDS}


# --------------------------------------------------------------------------------------------------
# Memory

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_memory(value: int | float | str) -> int:
    """Bytes from ``4000000``, ``"512MiB"``, ``"8GB"``, ``"1.5g"`` (K/M/G/T alone are binary units)."""
    import re

    if isinstance(value, (int, float)) and not isinstance(value, bool):
        amount, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if match is None or match.group(2).lower() not in _UNITS:
            raise KeditError(f"memory size {value!r}: expected a number of bytes or a size such as 512MiB, 8GB, 1.5G")
        amount, unit = float(match.group(1)), match.group(2).lower()
    size = int(amount * _UNITS[unit])
    if size <= 0:
        raise KeditError(f"memory size {value!r} must be positive")
    return size


def free_memory(device) -> int:
    """Bytes the device can still give: on a GPU what the driver reports free plus what torch's caching
    allocator holds unused; on a CPU the memory the OS reports available."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    import psutil

    return int(psutil.virtual_memory().available)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _tensor_bytes(obj, seen: set) -> int:
    """Bytes of the tensors in a nest of tuples/lists (each storage counted once)."""
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(x, seen) for x in obj)
    return 0


class _MemoryMeter:
    """Counts what a batch of value optimisation holds at its first step (every request is active then,
    so it holds the most): the tensors kept across steps, and those autograd saves for the backward
    (parameters excluded). Past ``budget`` bytes it raises a :class:`KeditError` at once, before more is
    taken (batches are planned to use ``1 / MEMORY_HEADROOM`` of it); ``what`` names the requests."""

    def __init__(self, model, budget: int, what: str, budget_text: str):
        self.budget, self.what, self.budget_text = budget, what, budget_text
        self.parameters = {p.untyped_storage().data_ptr() for p in model.model.parameters()}
        self.seen: set = set()
        self.held = 0
        self.saved = 0

    @property
    def total(self) -> int:
        return self.held + self.saved

    def hold(self, obj) -> None:
        self.held += _tensor_bytes(obj, self.seen)
        self._check()

    def pack(self, t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.parameters and ptr not in self.seen:
            self.seen.add(ptr)
            self.saved += t.untyped_storage().nbytes()
            self._check()
        return t

    @staticmethod
    def unpack(t: torch.Tensor):
        return t

    def _check(self) -> None:
        if self.total > self.budget:
            raise KeditError(f"value optimisation does not fit in memory: {self.what} holds more than the "
                             f"{_gib(self.budget)} it may use ({self.budget_text}); give it more memory (--max-memory), "
                             "use a smaller dtype, or fewer context templates")

    def saving(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def plan_value_batches(sizes: Sequence[int], bytes_per_token: float, budget: int, max_tokens: int | None,
                       first: int = 0) -> list[list[int]]:
    """Requests ``first..`` (``sizes[i]``: tokens in request ``i``'s rows) in consecutive batches whose
    predicted peak (``MEMORY_HEADROOM · bytes_per_token · tokens``) fits ``budget`` and whose tokens stay
    within ``max_tokens``. Raises :class:`KeditError` for a request that does not fit alone."""
    per_batch = budget / (MEMORY_HEADROOM * bytes_per_token)
    if max_tokens is not None:
        per_batch = min(per_batch, max_tokens)
    chunks: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for i in range(first, len(sizes)):
        need = MEMORY_HEADROOM * bytes_per_token * sizes[i]
        if need > budget:
            raise KeditError(f"value optimisation does not fit in memory: request {i} alone needs about {_gib(need)} "
                             f"and {_gib(budget)} may be used; give it more memory (--max-memory), use a smaller "
                             "dtype, or fewer context templates")
        if current and tokens + sizes[i] > per_batch:
            chunks.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += sizes[i]
    if current:
        chunks.append(current)
    return chunks


# --------------------------------------------------------------------------------------------------
# Shared pieces


def _site_module(model, injection: Injection) -> str:
    adapter = model.adapter
    return adapter.layer_name(injection.layer) if injection.site == "block" else adapter.mlp_name(injection.layer)


def _float_type(model) -> torch.dtype:
    """δ and the losses are float32 (as published), float64 for a float64 model."""
    return torch.float64 if model.dtype == torch.float64 else torch.float32


def _logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of hidden states ``[..., d]`` (final norm, unembedding, soft-capping: the adapter's)."""
    return model.adapter.logits(hidden)


def _adam_step_rows(delta, grad, exp_avg, exp_avg_sq, rows, step, lr, beta1=0.9, beta2=0.999, eps=1e-8):
    """``torch.optim.Adam``'s update (defaults, single-tensor arithmetic) applied to ``rows`` only."""
    g = grad[rows]
    m = exp_avg[rows].lerp_(g, 1 - beta1)
    v = exp_avg_sq[rows].mul_(beta2).addcmul_(g, g, value=1 - beta2)
    exp_avg[rows] = m
    exp_avg_sq[rows] = v
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    denom = (v.sqrt() / (bias_correction2 ** 0.5)).add_(eps)
    delta[rows] = delta[rows].addcdiv(m, denom, value=-step_size)


# --------------------------------------------------------------------------------------------------
# Batched


def optimise_values_batched(model, rows: TokenRows, target_lengths: Sequence[int], settings: ValueSettings,
                            injection: Injection, *, progress: bool = False,
                            store: ValueStore | None = None) -> ValueResult:
    """Optimise every request's ``δ`` in batches (``settings.batch_requests`` requests each, or sized from
    memory: see the module docstring). ``rows`` come from :func:`~kedit_core.editing.rows.value_rows`.
    With ``store``, batches finished by an earlier (interrupted) run are loaded from it, in the grouping
    that run chose, and each new one is saved to it."""
    n = len(target_lengths)
    sizes = [0] * n
    for r, owner in enumerate(rows.owner):
        sizes[owner] += len(rows.ids[r])
    results: list[ValueResult] = []
    budget = settings.memory_bytes or int(FREE_MEMORY_SHARE * free_memory(model.device))
    budget_text = ("--max-memory" if settings.memory_bytes else
                   f"{FREE_MEMORY_SHARE:.0%} of the free memory on {model.device.type}")
    max_tokens = settings.batch_tokens or (CPU_BATCH_TOKENS if model.device.type == "cpu" else None)
    plan = store.load_plan(rows, target_lengths, settings, injection) if store is not None else None
    if plan is None and settings.batch_requests is not None:
        step = settings.batch_requests
        plan = {"chunks": [list(range(s, min(n, s + step))) for s in range(0, n, step)], "sized_by": "batch_requests"}
    bar = tqdm(total=n * max(settings.num_steps - 1, 0), desc="optimising values", unit="step", disable=not progress,
               leave=False)

    def run(chunk: list[int], meter: _MemoryMeter, reuse: bool = True) -> ValueResult:
        key = None if store is None else store.key(rows, chunk, target_lengths, settings, injection)
        done = store.load(key) if key is not None and reuse else None
        if done is not None:
            bar.update(len(chunk) * max(settings.num_steps - 1, 0))
            return done
        started = time.perf_counter()
        try:
            done = _optimise_chunk(model, rows, chunk, target_lengths, settings, injection, bar, meter)
        except torch.OutOfMemoryError:
            raise KeditError(f"value optimisation ran out of device memory on requests {chunk[0]}..{chunk[-1]} "
                             f"(budget {_gib(budget)}, {budget_text}); pass a smaller --max-memory") from None
        if key is not None:   # (the result is on the CPU: the clock covers the device's work)
            store.save(key, done, time.perf_counter() - started)
        return done

    try:
        if plan is None:
            # The first request alone, its memory counted; the others planned from what it held.
            meter = _MemoryMeter(model, budget, "request 0 alone", budget_text)
            results.append(run([0], meter, reuse=False))  # (computed, not loaded: its memory is the measure)
            bytes_per_token = meter.total / sizes[0]
            plan_value_batches(sizes[:1], bytes_per_token, budget, None)  # request 0 fits with the headroom too
            plan = {"chunks": [[0]] + plan_value_batches(sizes, bytes_per_token, budget, max_tokens, first=1),
                    "sized_by": "memory", "budget_bytes": budget, "budget": budget_text,
                    "bytes_per_token": bytes_per_token, "headroom": MEMORY_HEADROOM, "max_tokens": max_tokens}
            if store is not None:
                store.save_plan(rows, target_lengths, settings, injection, plan)
        for chunk in plan["chunks"][len(results):]:
            what = f"requests {chunk[0]}..{chunk[-1]}" if len(chunk) > 1 else f"request {chunk[0]} alone"
            results.append(run(chunk, _MemoryMeter(model, budget, what, budget_text)))
    finally:
        bar.close()
    return ValueResult(target=torch.cat([r.target for r in results]), init=torch.cat([r.init for r in results]),
                       delta=torch.cat([r.delta for r in results]), steps=[s for r in results for s in r.steps],
                       final_loss=[x for r in results for x in r.final_loss], batches=[len(c) for c in plan["chunks"]],
                       plan={k: v for k, v in plan.items() if k != "chunks"})


def _rows_of_requests(rows: TokenRows, requests: Sequence[int]) -> TokenRows:
    """The rows of ``requests``, renumbered ``0..len(requests)-1`` in that order."""
    local = {req: i for i, req in enumerate(requests)}
    out = TokenRows()
    for r in rows.rows_of(requests):
        out.append(rows.ids[r], rows.lookup[r], rows.labels[r], owner=local[rows.owner[r]], kind=rows.kind[r],
                   template=rows.template[r])
    return out


def optimise_values_across_ranks(model, rows: TokenRows, target_lengths: Sequence[int], settings: ValueSettings,
                                 injection: Injection, *, progress: bool = False,
                                 store: ValueStore | None = None) -> ValueResult:
    """:func:`optimise_values_batched` split over the processes of a ``torch.distributed`` group (as
    ``torchrun`` starts them): rank ``r`` takes the ``r``-th of ``world`` consecutive shares of the
    requests (balanced by tokens), and the values are gathered so every rank returns all of them. Each
    request follows the trajectory it follows in one process, so the results equal a single process's to
    float rounding. Without a group (or with one process) this is :func:`optimise_values_batched`."""
    from ..stats.collect import distributed_info

    rank, world = distributed_info()
    n = len(target_lengths)
    if world == 1 or n == 1:
        return optimise_values_batched(model, rows, target_lengths, settings, injection, progress=progress, store=store)
    import torch.distributed as dist

    sizes = [0] * n
    for r, owner in enumerate(rows.owner):
        sizes[owner] += len(rows.ids[r])
    prefix = [0]
    for size in sizes:
        prefix.append(prefix[-1] + size)
    bounds = [0]
    for k in range(1, world):   # cut nearest to k/world of the tokens, every rank keeping a request if it can
        low, high = min(bounds[-1] + 1, n), max(min(bounds[-1] + 1, n), n - (world - k))
        bounds.append(min(range(low, high + 1), key=lambda j: abs(prefix[j] - prefix[n] * k / world)))
    bounds.append(n)
    mine = list(range(bounds[rank], bounds[rank + 1]))
    part = None
    if mine:
        part = optimise_values_batched(model, _rows_of_requests(rows, mine), [target_lengths[i] for i in mine],
                                       settings, injection, progress=progress and rank == 0, store=store)
        part = {"target": part.target, "init": part.init, "delta": part.delta, "steps": part.steps,
                "final_loss": part.final_loss, "batches": part.batches, "plan": part.plan}
    parts: list = [None] * world
    dist.all_gather_object(parts, part)
    parts = [p for p in parts if p is not None]
    return ValueResult(target=torch.cat([p["target"] for p in parts]), init=torch.cat([p["init"] for p in parts]),
                       delta=torch.cat([p["delta"] for p in parts]), steps=[s for p in parts for s in p["steps"]],
                       final_loss=[x for p in parts for x in p["final_loss"]],
                       batches=[b for p in parts for b in p["batches"]],
                       plan={"world_size": world, "requests_per_rank": [bounds[k + 1] - bounds[k] for k in range(world)],
                             "per_rank": [p["plan"] for p in parts]})


def _buckets(need: torch.Tensor, max_buckets: int) -> list[torch.Tensor]:
    """Rows grouped for the per-step forwards: contiguous groups of the rows sorted by ``need`` (the
    positions each must compute, from its own split to its end), so rows padded together need about
    as many positions."""
    order = torch.argsort(need.cpu(), stable=True)
    return [g.to(need.device) for g in torch.tensor_split(order, min(max_buckets, len(order))) if g.numel()]


def _prefix_cache(snapshot, rows: torch.Tensor):
    """A fresh cache holding the bucket's constant prefix keys/values for ``rows`` (its own tensors are
    never extended in place, so every step starts from the same prefix)."""
    from transformers import DynamicCache

    if rows.numel() == snapshot[0][0].shape[0]:  # every row still active: the snapshot itself, not a copy
        return DynamicCache(ddp_cache_data=list(snapshot))
    return DynamicCache(ddp_cache_data=[(k.index_select(0, rows), v.index_select(0, rows)) for k, v in snapshot])


def _left_aligned(t: torch.Tensor, split: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Positions ``[0, split[b])`` of row ``b`` of ``t`` (positions along ``dim``; rows along 0) moved to
    the end of a ``width``-long axis; the positions before them are filler (masked out by the caller)."""
    idx = (torch.arange(width, device=t.device).unsqueeze(0) - (width - split).unsqueeze(1)).clamp_min(0)
    shape = [t.shape[0]] + [1] * (t.dim() - 1)
    shape[dim] = width
    idx = idx.reshape(shape).expand(*[t.shape[i] if i != dim else width for i in range(t.dim())])
    return t.gather(dim, idx)


def _from_split(t: torch.Tensor, split: torch.Tensor, width: int) -> torch.Tensor:
    """Positions ``[split[b], split[b] + width)`` of each row ``b`` of ``t`` ``[B, T, ...]`` (clamped at the
    end; the caller masks what lies past a row's length)."""
    idx = (split.unsqueeze(1) + torch.arange(width, device=t.device).unsqueeze(0)).clamp_max(t.shape[1] - 1)
    idx = idx.reshape(idx.shape + (1,) * (t.dim() - 2)).expand((t.shape[0], width) + tuple(t.shape[2:]))
    return t.gather(1, idx)


class _SharedPrefixes:
    """Keys/values of the rows' prefixes (the tokens before each row's fact token) at every layer, for the
    aligned suffix layout of :func:`_optimise_chunk`. Rows filled from the same context template begin
    with the same tokens (the template's text): those are run once per template, and each row runs only
    its own prefix tokens on top of them. :meth:`prefix_cache` lays a bucket's prefixes out so that they
    all end at the same column (the fact tokens, which start the suffixes, line up), each row's template
    part right before the column where its own tokens start; columns a row does not use are masked
    (their keys/values zeroed), and positions stay true."""

    def __init__(self, model, rows: TokenRows, chunk_rows: list[int], batch, row_split: torch.Tensor, last_name: str):
        from transformers import DynamicCache

        self.model, self.batch, self.row_split, self.last_name = model, batch, row_split, last_name
        device = model.device
        groups: dict[tuple, list[int]] = {}
        for b, r in enumerate(chunk_rows):
            if rows.template[r] >= 0:
                groups.setdefault((rows.kind[r], rows.template[r]), []).append(b)
        self.group = torch.full((len(chunk_rows),), -1, dtype=torch.long)
        self.common = torch.zeros(len(chunk_rows), dtype=torch.long)
        heads, lengths = [], []
        ids = batch.input_ids.cpu()
        split = row_split.cpu()
        for members in groups.values():
            if len(members) < 2:
                continue
            first = ids[members[0]]
            c = int(split[members].min())
            for b in members[1:]:
                same = (ids[b, :c] == first[:c]).long()
                c = int(same.cumprod(0).sum())
            if c == 0:
                continue
            self.group[members] = len(heads)
            self.common[members] = c
            heads.append(first[:c])
            lengths.append(c)
        self.group, self.common = self.group.to(device), self.common.to(device)
        self.keys = None
        if heads:
            width = max(lengths)
            head_ids = torch.full((len(heads), width), int(model.tokenizer.pad_token_id), dtype=torch.long)
            head_mask = torch.zeros(len(heads), width, dtype=torch.long)
            for g, h in enumerate(heads):
                head_ids[g, : len(h)] = h
                head_mask[g, : len(h)] = 1
            cache = DynamicCache()
            with torch.no_grad(), TraceDict(model.model, [last_name], stop_after=last_name):
                model.model(input_ids=head_ids.to(device), attention_mask=head_mask.to(device), use_cache=True,
                            **cache_kwargs(model.model, cache))
            self.keys = [(layer.keys, layer.values) for layer in cache.layers]

    def prefix_cache(self, bucket_rows: torch.Tensor, split: torch.Tensor):
        """``(cache, mask)`` for a bucket's prefixes: a DynamicCache of ``[rows, heads, P, d]`` per layer and
        the ``[rows, P]`` mask of the columns in use; ``(None, None)`` when no row has a prefix."""
        from transformers import DynamicCache

        model, device = self.model, self.model.device
        if int(split.max()) == 0:
            return None, None
        common = self.common[bucket_rows]
        own = split - common
        width_own, width_head = int(own.max()), int(common.max())
        total = width_head + width_own
        columns = torch.arange(total, device=device).unsqueeze(0)
        # template part at [width_head - common, width_head); own tokens at [width_head, width_head + own)
        head_mask = (columns >= width_head - common.unsqueeze(1)) & (columns < width_head)
        own_mask = (columns >= width_head) & (columns < width_head + own.unsqueeze(1))
        mask = (head_mask | own_mask).long()
        past = None
        if width_head > 0:
            group = self.group[bucket_rows].clamp_min(0)
            past = DynamicCache(ddp_cache_data=[
                (_left_aligned(k.index_select(0, group), common, width_head, 2),
                 _left_aligned(v.index_select(0, group), common, width_head, 2)) for k, v in self.keys])
        if width_own > 0:
            idx = (common.unsqueeze(1) + torch.arange(width_own, device=device).unsqueeze(0)).clamp_max(
                self.batch.input_ids.shape[1] - 1)
            own_ids = torch.gather(self.batch.input_ids[bucket_rows], 1, idx)
            own_ids = torch.where(own_mask[:, width_head:].bool(), own_ids, int(model.tokenizer.pad_token_id))
            cache = past if past is not None else DynamicCache()
            with torch.no_grad(), TraceDict(model.model, [self.last_name], stop_after=self.last_name):
                model.model(input_ids=own_ids, attention_mask=mask, position_ids=idx, use_cache=True,
                            **cache_kwargs(model.model, cache))
        else:
            cache = past
        # Unused columns may hold padding's keys/values (even NaN where a padded row attended to nothing): zero.
        unused = (mask == 0)[:, None, :, None]
        for layer in cache.layers:
            layer.keys = layer.keys.masked_fill(unused, 0)
            layer.values = layer.values.masked_fill(unused, 0)
        return cache, mask


def _optimise_chunk(model, rows: TokenRows, requests: list[int], target_lengths, settings: ValueSettings,
                    injection: Injection, bar, meter: _MemoryMeter | None = None) -> ValueResult:
    from transformers import DynamicCache

    adapter = model.adapter
    device = model.device
    n = len(requests)
    local_of = {req: i for i, req in enumerate(requests)}
    chunk_rows = rows.rows_of(requests)
    batch = rows.batch(chunk_rows, model.tokenizer.pad_token_id, device)
    owner = torch.tensor([local_of[rows.owner[r]] for r in chunk_rows], dtype=torch.long, device=device)
    is_kl = torch.tensor([rows.kind[r] == "kl" for r in chunk_rows], device=device)
    # Each request's first rewriting row (its bare prompt) defines h_init; its KL row the KL term.
    first_row, kl_row = [-1] * n, [-1] * n
    for b, r in enumerate(chunk_rows):
        i = local_of[rows.owner[r]]
        if rows.kind[r] == "kl":
            kl_row[i] = b
        elif first_row[i] < 0:
            first_row[i] = b
    first_row = torch.tensor(first_row, dtype=torch.long, device=device)
    kl_row = torch.tensor(kl_row, dtype=torch.long, device=device)
    acc = _float_type(model)
    n_rewrite = torch.zeros(n, dtype=acc, device=device).index_add_(
        0, owner[~is_kl], torch.ones(int((~is_kl).sum()), dtype=acc, device=device))
    target_len = torch.tensor([float(target_lengths[r]) for r in requests], dtype=acc, device=device)
    # Every target token of every rewriting row: (row, position, token).
    label_rows, label_pos = torch.nonzero(batch.labels != -100, as_tuple=True)
    label_tok = batch.labels[label_rows, label_pos]

    site = _site_module(model, injection)
    nll_name = adapter.layer_name(injection.nll_layer)
    last_name = adapter.layer_name(adapter.num_layers - 1)
    traced = list(dict.fromkeys([site, nll_name, last_name]))
    replay_layer = injection.layer if injection.site == "block" else injection.layer - 1
    reuse_prefix = settings.reuse_prefix and replay_layer < adapter.num_layers - 1

    # One pass without δ, bucket by bucket: the output of the last replayed block (the blocks up to it
    # never run again), h_init at the injection site, and the keys/values of the layers above it at the
    # positions before each row's fact token (they never change). Later steps run each row only from its
    # fact token on: its prefix keys/values are left-padded to the bucket's longest prefix, so the fact
    # tokens of all rows line up, and position ids keep every token's true position.
    lengths = batch.attention_mask.sum(1)
    row_split = batch.lookup if reuse_prefix else torch.zeros_like(batch.lookup)
    n_buckets = max(1, min(settings.max_buckets, len(chunk_rows) // settings.min_bucket_rows))
    plan = _buckets(lengths - row_split, n_buckets)
    names = [site] + ([adapter.layer_name(replay_layer)] if replay_layer >= 0 else [])
    init = torch.zeros(n, adapter.hidden_size, dtype=acc, device=device)
    cached, buckets = None, []
    shared = _SharedPrefixes(model, rows, chunk_rows, batch, row_split, last_name) if reuse_prefix else None
    for bucket_rows in plan:
        split = row_split[bucket_rows]
        width = int((lengths[bucket_rows] - split).max())
        local = torch.full((len(chunk_rows),), -1, dtype=torch.long, device=device)
        local[bucket_rows] = torch.arange(bucket_rows.numel(), device=device)
        mine = torch.nonzero(local[first_row] >= 0).reshape(-1)  # requests whose bare prompt is here
        valid = torch.arange(width, device=device).unsqueeze(0) < (lengths[bucket_rows] - split).unsqueeze(1)
        ids = torch.where(valid, _from_split(batch.input_ids[bucket_rows], split, width), model.tokenizer.pad_token_id)
        positions = split.unsqueeze(1) + torch.arange(width, device=device).unsqueeze(0)
        snapshot = None
        if shared is not None:
            # The prefixes (each row's tokens before its fact token) through every layer, their template part
            # computed once per template; then the suffixes up to the injection site only.
            cache, prefix_mask = shared.prefix_cache(bucket_rows, split)
            if cache is not None:
                snapshot = [(torch.zeros(bucket_rows.numel(), 1, prefix_mask.shape[1], 1, dtype=layer.keys.dtype,
                                         device=device),) * 2 if i <= replay_layer else (layer.keys, layer.values)
                            for i, layer in enumerate(cache.layers)]   # (below the replay: a length stand-in)
                mask = torch.cat([prefix_mask, valid.to(prefix_mask.dtype)], dim=1)
            else:
                mask = valid.long()
            deepest = names[0] if injection.site == "mlp" else names[-1]
            with torch.no_grad(), TraceDict(model.model, names, retain_output=True, stop_after=deepest) as td:
                model.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=cache is not None,
                            **cache_kwargs(model.model, cache))
            del cache
            init[mine] = primary(td[site].output)[local[first_row[mine]], 0].to(acc)   # the fact token: column 0
            replay_hidden = None
            if replay_layer >= 0:
                block_out = primary(td[names[-1]].output)
                if cached is None:
                    cached = BlockOutput(block_out[:0], td[names[-1]].output)
                replay_hidden = block_out
        else:
            end_col = int(lengths[bucket_rows].max())
            with torch.no_grad(), TraceDict(model.model, names, retain_output=True, stop_after=last_name) as td:
                model.model(input_ids=batch.input_ids[bucket_rows, :end_col],
                            attention_mask=batch.attention_mask[bucket_rows, :end_col], use_cache=False)
            site_out = primary(td[site].output)
            init[mine] = site_out[local[first_row[mine]], batch.lookup[first_row[mine]]].to(acc)
            replay_hidden = None
            if replay_layer >= 0:
                block_out = primary(td[names[-1]].output)
                if cached is None:
                    cached = BlockOutput(block_out[:0], td[names[-1]].output)
                replay_hidden = _from_split(block_out, split, width)
            mask = valid.long()
        buckets.append((bucket_rows, split, snapshot, replay_hidden, ids, mask.to(batch.attention_mask.dtype),
                        positions))
        del td
        if meter is not None:
            meter.hold(buckets[-1])
    del shared
    init_norm_sq = init.norm(dim=1) ** 2

    d = adapter.hidden_size
    delta = torch.zeros(n, d, dtype=acc, device=device)
    exp_avg, exp_avg_sq = torch.zeros_like(delta), torch.zeros_like(delta)
    kl_init = None
    active = torch.ones(n, dtype=torch.bool, device=device)
    steps = [0] * n
    final_loss = [float("nan")] * n
    label_is = torch.zeros(len(chunk_rows), dtype=torch.bool, device=device)

    # The published loop leaves its last iteration before updating, so that forward changes nothing and is
    # skipped (unless it is the only one).
    for it in range(max(settings.num_steps - 1, 1)):
        req_idx = torch.nonzero(active).reshape(-1)
        row_active = active[owner]
        delta_var = delta.clone().requires_grad_(True)
        nll = torch.zeros(n, dtype=acc, device=device)
        kl_logp = torch.zeros(n, 1, dtype=acc, device=device)
        misses = torch.zeros(n, dtype=acc, device=device)
        metering = meter.saving() if meter is not None and it == 0 else contextlib.nullcontext()
        with torch.enable_grad(), metering:
            for bucket_rows, split, snapshot, replay_hidden, ids, mask, positions in buckets:
                keep = row_active[bucket_rows]
                if not bool(keep.any()):
                    continue
                sel = bucket_rows[keep]
                kept = keep.nonzero().reshape(-1)
                sub_owner = owner[sel]
                arange = torch.arange(sel.numel(), device=device)
                lookup = batch.lookup[sel] - split[kept]

                def add_delta(output, layer, arange=arange, lookup=lookup, sub_owner=sub_owner):
                    if layer != site:
                        return output
                    h = primary(output)
                    h = h.index_put((arange, lookup), h[arange, lookup] + delta_var[sub_owner].to(h.dtype))
                    return replace_primary(output, h)

                past = _prefix_cache(snapshot, kept) if snapshot is not None else None
                replay = (replaying_blocks(model, replay_layer, cached, replay_hidden[kept])
                          if cached is not None else contextlib.nullcontext())
                with replay, TraceDict(model.model, traced, retain_output=True, stop_after=last_name,
                                       edit_output=add_delta) as tdb:
                    model.model(input_ids=ids[kept], attention_mask=mask[kept], position_ids=positions[kept],
                                use_cache=past is not None, **cache_kwargs(model.model, past))
                local = torch.full((len(chunk_rows),), -1, dtype=torch.long, device=device)
                local[sel] = arange
                label_is.zero_()
                label_is[sel] = True
                lab = label_is[label_rows]
                l_rows, l_tok = local[label_rows[lab]], label_tok[lab]
                l_pos = label_pos[lab] - row_split[label_rows[lab]]
                if l_rows.numel():
                    logp = torch.log_softmax(_logits(model, primary(tdb[nll_name].output)[l_rows, l_pos]).to(acc),
                                             dim=-1)
                    l_owner = sub_owner[l_rows]
                    nll = nll.index_add(0, l_owner, -logp.gather(1, l_tok.unsqueeze(1)).squeeze(1))
                    if settings.stop_when_most_probable:
                        misses = misses.index_add(0, l_owner, (logp.argmax(-1) != l_tok).to(acc))
                kl_sel = is_kl[sel]
                if bool(kl_sel.any()):
                    k_local = arange[kl_sel]
                    logits = _logits(model, primary(tdb[last_name].output)[k_local, lookup[k_local]]).to(acc)
                    if kl_logp.shape[1] != logits.shape[1]:
                        kl_logp = torch.zeros(n, logits.shape[1], dtype=acc, device=device)
                    kl_logp = kl_logp.index_put((sub_owner[k_local],), torch.log_softmax(logits, dim=-1))
            nll = nll / target_len / n_rewrite.clamp_min(1)
            if kl_init is None:
                kl_init = kl_logp.detach().clone()  # every request is active at step 0
            kl = (kl_logp.exp() * (kl_logp - kl_init)).sum(-1) * active
            decay = settings.weight_decay * delta_var.norm(dim=1) / init_norm_sq
            loss = nll + settings.kl_factor * kl + decay
            done = (loss.detach() < settings.loss_threshold) & active
            if settings.stop_when_most_probable:
                done |= (misses == 0) & active
            for r, value in zip(req_idx.tolist(), loss.detach()[req_idx].tolist()):
                final_loss[r] = value
            go = active & ~done
            if it >= settings.num_steps - 1:
                go = torch.zeros_like(go)
            if bool(go.any()):
                (loss * go).sum().backward()
        active = go
        go_idx = torch.nonzero(go).reshape(-1)
        bar.update(int(req_idx.numel()))
        if go_idx.numel() == 0:
            break
        with torch.no_grad():
            _adam_step_rows(delta, delta_var.grad, exp_avg, exp_avg_sq, go_idx, it + 1, settings.lr)
            # Project back into the ball ‖δ‖ <= clamp_norm_factor · ‖h_init‖.
            max_norm = settings.clamp_norm_factor * init[go_idx].norm(dim=1)
            norms = delta[go_idx].norm(dim=1)
            over = norms > max_norm
            if bool(over.any()):
                rows_over = go_idx[over]
                delta[rows_over] = delta[rows_over] * max_norm[over].unsqueeze(1) / norms[over].unsqueeze(1)
        for r in go_idx.tolist():
            steps[r] += 1
    return ValueResult(target=(init + delta).cpu(), init=init.cpu(), delta=delta.cpu(), steps=steps,
                       final_loss=final_loss)


# --------------------------------------------------------------------------------------------------
# The published loop


def optimise_values_reference(model, rows: TokenRows, target_lengths: Sequence[int], settings: ValueSettings,
                              injection: Injection, *, progress: bool = False) -> ValueResult:
    """``compute_z`` / ``compute_v`` as published: one request at a time, a full forward per step (the
    model's logits for the KL term; for MEMIT's site the NLL from the final norm and unembedding of
    block ``nll_layer``'s output over every position, for ROME's the model's logits),
    ``torch.optim.Adam`` on a ``[d]`` vector."""
    adapter = model.adapter
    device = model.device
    n = len(target_lengths)
    site = _site_module(model, injection)
    nll_name = adapter.layer_name(injection.nll_layer)
    acc = _float_type(model)
    out = ValueResult(target=torch.zeros(n, adapter.hidden_size, dtype=acc),
                      init=torch.zeros(n, adapter.hidden_size, dtype=acc),
                      delta=torch.zeros(n, adapter.hidden_size, dtype=acc), steps=[0] * n, final_loss=[float("nan")] * n)
    for i in tqdm(range(n), desc="optimising values (one at a time)", disable=not progress, leave=False):
        req_rows = rows.rows_of([i])
        rewrite = [r for r in req_rows if rows.kind[r] == "rewrite"]
        kl = [r for r in req_rows if rows.kind[r] == "kl"]
        order = rewrite + kl  # rewriting prompts first, the KL prompt last
        batch = rows.batch(order, model.tokenizer.pad_token_id, device)
        lookup = batch.lookup.tolist()
        n_rw = len(rewrite)
        targets = batch.labels[:n_rw]
        delta = torch.zeros(adapter.hidden_size, dtype=acc, device=device, requires_grad=True)
        state: dict = {"init": None}

        def edit(output, layer):
            if layer != site:
                return output
            h = primary(output)
            if state["init"] is None:
                state["init"] = h[0, lookup[0]].detach().clone()
            h = h.clone()
            for b, idx in enumerate(lookup):
                h[b, idx, :] += delta.to(h.dtype)
            return replace_primary(output, h)

        opt = torch.optim.Adam([delta], lr=settings.lr)
        kl_init = None
        for it in range(settings.num_steps):
            opt.zero_grad()
            with torch.enable_grad():
                with TraceDict(model.model, [nll_name, site], retain_output=True, edit_output=edit) as td:
                    logits = model.model(**batch.model_inputs, use_cache=False).logits
                kl_logp = torch.log_softmax(logits[n_rw:][torch.arange(len(kl)), batch.lookup[n_rw:]].to(acc), dim=1)
                if kl_init is None:
                    kl_init = kl_logp.detach().clone()
                if injection.site == "block":
                    full = _logits(model, primary(td[nll_name].output)[:n_rw])
                else:
                    full = logits[:n_rw]
                log_probs = torch.log_softmax(full.to(acc), dim=2)
                picked = torch.gather(log_probs, 2, torch.where(targets != -100, targets, 0).unsqueeze(2)).squeeze(2)
                mask = (targets != -100).float()
                nll = (-(picked * mask).sum(1) / target_lengths[i]).mean()
                kl_loss = settings.kl_factor * F.kl_div(kl_init, kl_logp, log_target=True, reduction="batchmean")
                decay = settings.weight_decay * (torch.norm(delta) / torch.norm(state["init"]) ** 2)
                loss = nll + kl_loss + decay
                out.final_loss[i] = float(loss.detach())
                if loss < settings.loss_threshold:
                    break
                if settings.stop_when_most_probable:
                    hit = (log_probs.argmax(-1) == targets) | (targets == -100)
                    if bool(hit.all()):
                        break
                if it == settings.num_steps - 1:
                    break
                loss.backward()
            opt.step()
            out.steps[i] += 1
            max_norm = settings.clamp_norm_factor * state["init"].norm()
            if delta.norm() > max_norm:
                with torch.no_grad():
                    delta[...] = delta * max_norm / delta.norm()
        init = state["init"].to(acc).cpu()
        out.init[i] = init
        out.delta[i] = delta.detach().cpu()
        out.target[i] = init + delta.detach().cpu()
    return out
