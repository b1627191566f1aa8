"""kedit's ops, one Python entry point each, routed to an implementation chosen per device.

For each op and device type the implementation is chosen in this order, and the choice is visible in
``kedit plugins`` (key ``"ops"``) and through :func:`describe`:

1. ``KEDIT_REFERENCE_OPS=1``: the pure-PyTorch reference, always.
2. An explicit selection of a plugin-supplied implementation, by :func:`select` or by the environment
   variable ``KEDIT_OPS="cov_accumulate_@cpu=myplugin.fast_cov,..."``. Plugins offer implementations
   through the ``register_ops`` hook; they are never picked silently.
3. A built-in implementation measured faster than the compiled kernel on that device
   (:data:`BUILTIN_PREFERRED`): ``cov_accumulate_`` on CUDA runs as a blocked SYRK on cuBLAS
   (:mod:`kedit_core.ops.blocked`), which ``bench/bench_stats.py`` measured ahead of kedit's own
   tensor-core kernel on an H200 (``bench/results/gpu/``).
4. The compiled op ``torch.ops.kedit.<op>`` when ``kedit_core._C`` is loaded and has a kernel for
   the device.
5. The pure-PyTorch reference (:mod:`kedit_core.ops.reference`).

Built-in implementations are selectable by name like the others (``"blocked"``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from .. import _ext
from ..errors import KeditError
from . import blocked, reference

__all__ = ["cov_accumulate_", "describe", "gather_segment_sum", "implementation", "select", "spd_factor", "spd_solve",
           "spd_woodbury_solve", "OP_NAMES"]


@dataclass(frozen=True)
class OpChoice:
    op: str
    device: str
    implementation: str  # "reference", "compiled", or "<plugin>:<name>"
    reason: str
    fn: Callable


OP_NAMES: tuple[str, ...] = ("cov_accumulate_", "gather_segment_sum", "spd_factor", "spd_solve", "spd_woodbury_solve")
_REFERENCES: dict[str, Callable] = {name: getattr(reference, name) for name in OP_NAMES}
# Built-in alternatives to the compiled kernels, by op and name.
BUILTINS: dict[str, dict[str, Callable]] = {"cov_accumulate_": {"blocked": blocked.cov_accumulate_blocked_}}
# (op, device type) -> the built-in chosen by default there, and the measurement behind the choice.
BUILTIN_PREFERRED: dict[tuple[str, str], tuple[str, str]] = {
    ("cov_accumulate_", "cuda"): ("blocked", "blocked SYRK on cuBLAS measured faster than the compiled kernel "
                                             "(bench/results/gpu/stats-cuda.json)"),
}
_selected: dict[tuple[str, str], str] = {}
_cache: dict[tuple[str, str], OpChoice] = {}


def _env_selections() -> dict[tuple[str, str], str]:
    spec = os.environ.get("KEDIT_OPS", "").strip()
    out: dict[tuple[str, str], str] = {}
    if not spec:
        return out
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item or "@" not in item.split("=", 1)[0]:
            raise KeditError(f"KEDIT_OPS: entry {item!r} must look like 'op@device=implementation'")
        key, impl = item.split("=", 1)
        op, device = key.split("@", 1)
        out[(op.strip(), device.strip())] = impl.strip()
    return out


def _plugin_implementations(op: str, device: str) -> dict[str, Callable]:
    from ..plugins import get_registry

    return {key: reg.obj for key, reg in get_registry().op_implementations(op, device).items()}


def _compiled_has_kernel(op: str, device: str) -> bool:
    if not _ext.loaded():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device)
    if key is None:
        return False
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(f"kedit::{op}", key))
    except (RuntimeError, AttributeError):  # private API: fall back to probing the op table
        return hasattr(torch.ops.kedit, op)


def implementation(op: str, device: str | torch.device = "cpu") -> OpChoice:
    """The implementation :func:`cov_accumulate_` and friends use for ``op`` on ``device``, and why."""
    if op not in _REFERENCES:
        raise KeditError(f"unknown kedit op {op!r}; known ops: {', '.join(OP_NAMES)}")
    device = torch.device(device).type
    key = (op, device)
    if key in _cache:
        return _cache[key]
    if os.environ.get("KEDIT_REFERENCE_OPS", "") in {"1", "true", "yes"}:
        choice = OpChoice(op, device, "reference", "KEDIT_REFERENCE_OPS=1", _REFERENCES[op])
    else:
        wanted = _selected.get(key) or _env_selections().get(key)
        if wanted in ("reference", "compiled"):
            if wanted == "compiled" and not _compiled_has_kernel(op, device):
                raise KeditError(f"op {op} on {device}: the compiled implementation was selected but "
                                 f"kedit_core._C has no {device} kernel ({_ext.status()})")
            fn = getattr(torch.ops.kedit, op) if wanted == "compiled" else _REFERENCES[op]
            choice = OpChoice(op, device, wanted, "selected explicitly", fn)
        elif wanted in BUILTINS.get(op, {}):
            choice = OpChoice(op, device, wanted, "selected explicitly", BUILTINS[op][wanted])
        elif wanted:
            impls = _plugin_implementations(op, device)
            if wanted not in impls:
                raise KeditError(f"op {op} on {device}: implementation {wanted!r} was selected but no plugin "
                                 f"registers it; available: {sorted(impls) or 'none'}")
            choice = OpChoice(op, device, wanted, "selected explicitly", impls[wanted])
        elif (op, device) in BUILTIN_PREFERRED:
            name, why = BUILTIN_PREFERRED[(op, device)]
            choice = OpChoice(op, device, name, why, BUILTINS[op][name])
        elif _compiled_has_kernel(op, device):
            choice = OpChoice(op, device, "compiled", "kedit_core._C has a kernel for this device",
                              getattr(torch.ops.kedit, op))
        else:
            choice = OpChoice(op, device, "reference", f"no compiled kernel ({_ext.status()})", _REFERENCES[op])
    _cache[key] = choice
    return choice


def select(op: str, implementation_name: str | None, device: str = "cpu") -> None:
    """Choose the implementation of ``op`` on ``device``: ``"reference"``, ``"compiled"``, a built-in
    (``"blocked"``), a plugin's ``"<plugin>:<name>"``, or ``None`` to go back to the default order."""
    key = (op, torch.device(device).type)
    if implementation_name is None:
        _selected.pop(key, None)
    else:
        _selected[key] = implementation_name
    _cache.clear()


def reset_cache() -> None:
    """Forget cached choices (after plugins or environment variables change)."""
    _cache.clear()


def describe(devices: tuple[str, ...] = ("cpu", "cuda")) -> dict:
    """What each op runs on each device, why, and which plugin implementations are available."""
    out: dict = {}
    for op in OP_NAMES:
        out[op] = {}
        for device in devices:
            choice = implementation(op, device)
            out[op][device] = {
                "selected": choice.implementation,
                "reason": choice.reason,
                "available": ["reference"] + (["compiled"] if _compiled_has_kernel(op, device) else [])
                + sorted(BUILTINS.get(op, {})) + sorted(_plugin_implementations(op, device)),
            }
    return out


def cov_accumulate_(acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Add ``xᵀx`` over the rows selected by ``mask`` into the upper triangle of ``acc`` (see
    :func:`kedit_core.ops.reference.cov_accumulate_`). Use :func:`symmetrize_upper_` at the end."""
    implementation("cov_accumulate_", x.device).fn(acc, x, mask)


def symmetrize_upper_(acc: torch.Tensor) -> torch.Tensor:
    """Mirror the upper triangle of a square matrix into its lower triangle, in place."""
    upper = torch.triu(acc)
    acc.copy_(upper + torch.triu(acc, diagonal=1).T)
    return acc


def gather_segment_sum(hidden: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, segments: torch.Tensor,
                       weights: torch.Tensor | None, num_segments: int) -> torch.Tensor:
    """Weighted sums of gathered hidden vectors per segment (see
    :func:`kedit_core.ops.reference.gather_segment_sum`): keys at subject positions averaged per request."""
    return implementation("gather_segment_sum", hidden.device).fn(hidden, rows, positions, segments, weights,
                                                                  num_segments)


def spd_factor(a: torch.Tensor) -> torch.Tensor:
    """Batched lower Cholesky factors of SPD matrices ``[..., n, n]`` (see :mod:`kedit_core.ops.reference`)."""
    return implementation("spd_factor", a.device).fn(a)


def spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a⁻¹ b`` for SPD ``a`` through a fresh Cholesky factorisation."""
    return implementation("spd_solve", a.device).fn(a, b)


def spd_woodbury_solve(factor: torch.Tensor, k: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``C⁻¹K (αI + KᵀC⁻¹K)⁻¹`` from C's Cholesky factor: ``(C + KKᵀ)⁻¹K`` for ``α = 1``."""
    return implementation("spd_woodbury_solve", factor.device).fn(factor, k, float(alpha))


if _ext.loaded():  # shape functions so the compiled ops work under FakeTensor / torch.compile / opcheck
    from . import fake as _fake  # noqa: F401
