"""Deltas: what computing an edit returns. Applying and reverting are shared and exact.

A :class:`Deltas` maps parameter names to update tensors in each parameter's own layout (GPT-2's
Conv1D weights are in x out, so their deltas are too). :func:`apply_deltas` adds them and keeps the
original values of exactly the touched parameters, so :meth:`AppliedDeltas.revert` restores
bit-identical weights. Saved files (safetensors) carry the editor, the resolved hyper-parameters, a
hash of the requests and the base model's fingerprint; applying them to another model is refused.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import nn

from ._version import __version__
from .errors import FingerprintMismatchError, KeditError
from .fingerprint import model_fingerprint

FORMAT = "kedit-deltas/1"
METADATA_KEY = "kedit"


def safetensors_metadata(meta: dict) -> dict[str, str]:
    """kedit's metadata as one sorted JSON string under one key: safetensors writes its metadata map
    in hash order, so several keys would make identical saves differ byte-wise."""
    return {METADATA_KEY: json.dumps(meta, sort_keys=True, default=str)}


def read_safetensors_metadata(raw: dict | None) -> dict:
    raw = raw or {}
    try:
        return json.loads(raw[METADATA_KEY]) if METADATA_KEY in raw else {}
    except json.JSONDecodeError:
        return {}


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, meta: dict) -> Path:
    """Write ``tensors`` (moved to the CPU, in sorted name order) and kedit's metadata to ``path``
    atomically: a temporary file in the same directory, then a rename, so a reader (or a process
    killed mid-write) never sees a partial file."""
    from safetensors.torch import save_file

    from .atomic import atomic_path

    tensors = {name: t.detach().to("cpu").contiguous() for name, t in sorted(tensors.items())}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=safetensors_metadata(meta))
    return Path(path)


@dataclass
class Deltas:
    tensors: dict[str, torch.Tensor]
    editor: str = "unknown"
    hparams: dict = field(default_factory=dict)
    requests_sha256: str | None = None
    base_fingerprint: str | None = None
    extra: dict = field(default_factory=dict)

    # -- inspection ----------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self.tensors)

    def norms(self) -> dict[str, float]:
        return {name: float(t.double().norm()) for name, t in sorted(self.tensors.items())}

    def __len__(self) -> int:
        return len(self.tensors)

    # -- files ---------------------------------------------------------------------------------
    def metadata(self) -> dict:
        # No timestamps: the same edit must give byte-identical files.
        return {
            "format": FORMAT,
            "editor": self.editor,
            "hparams": self.hparams,
            "requests_sha256": self.requests_sha256,
            "base_fingerprint": self.base_fingerprint,
            "kedit_version": __version__,
            "extra": self.extra,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors file atomically (temporary file + rename)."""
        return atomic_save_safetensors(self.tensors, path, self.metadata())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Deltas":
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.exists():
            raise KeditError(f"delta file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = read_safetensors_metadata(f.metadata())
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise KeditError(f"{path} is not a readable safetensors file: {exc}") from None
        if meta.get("format") != FORMAT:
            raise KeditError(f"{path} is not a kedit delta file (metadata format={meta.get('format')!r}, "
                             f"expected {FORMAT!r})")
        return cls(tensors=tensors, editor=meta.get("editor", "unknown"), hparams=meta.get("hparams") or {},
                   requests_sha256=meta.get("requests_sha256"), base_fingerprint=meta.get("base_fingerprint"),
                   extra=meta.get("extra") or {})

    # -- applying ------------------------------------------------------------------------------
    def apply(self, model: nn.Module, *, check_fingerprint: bool = True) -> "AppliedDeltas":
        return apply_deltas(model, self, check_fingerprint=check_fingerprint)


def _parameters(model: nn.Module, names) -> dict[str, nn.Parameter]:
    # Tied weights answer to every name they have (GPT-2's lm_head.weight is transformer.wte.weight).
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = [n for n in names if n not in params]
    if missing:
        raise KeditError(f"the model has no parameter(s) {missing}; these deltas were made for another architecture")
    by_tensor: dict[int, str] = {}
    for n in names:
        other = by_tensor.setdefault(id(params[n]), n)
        if other != n:
            raise KeditError(f"deltas for {other!r} and {n!r} name the same (tied) parameter; give one of them")
    return {n: params[n] for n in names}


class AppliedDeltas(contextlib.AbstractContextManager):
    """Deltas added to a model; :meth:`revert` restores the exact original weights. Also a context
    manager that reverts on exit."""

    def __init__(self, model: nn.Module, originals: dict[str, torch.Tensor]):
        self.model = model
        self._originals = originals
        self.reverted = False

    @torch.no_grad()
    def revert(self) -> None:
        if self.reverted:
            return
        params = _parameters(self.model, self._originals)
        for name, original in self._originals.items():
            params[name].copy_(original)
        self.reverted = True

    def __exit__(self, exc_type, exc, tb):
        self.revert()
        return False


@torch.no_grad()
def add_deltas_(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add ``tensors`` to the named parameters in place; returns copies of the originals. If any shape
    is wrong nothing is changed."""
    params = _parameters(model, tensors)
    for name, delta in tensors.items():
        if tuple(delta.shape) != tuple(params[name].shape):
            raise KeditError(f"delta for {name} has shape {tuple(delta.shape)}; the parameter has "
                             f"{tuple(params[name].shape)}")
    originals = {name: params[name].detach().clone() for name in tensors}
    try:
        for name, delta in tensors.items():
            param = params[name]
            # Add in the promoted dtype, round once into the parameter's dtype.
            param.copy_(param.to(torch.promote_types(param.dtype, delta.dtype)) + delta.to(param.device))
    except BaseException:
        for name, original in originals.items():
            params[name].copy_(original)
        raise
    return originals


def apply_deltas(model: nn.Module, deltas: Deltas, *, check_fingerprint: bool = True) -> AppliedDeltas:
    """Add ``deltas`` to ``model``. Refuses (:class:`FingerprintMismatchError`) if the deltas were
    computed for a model with another fingerprint, unless ``check_fingerprint=False``."""
    if check_fingerprint and deltas.base_fingerprint:
        actual = model_fingerprint(model)
        if actual != deltas.base_fingerprint:
            raise FingerprintMismatchError(
                f"these deltas (editor '{deltas.editor}') were computed for the model with fingerprint "
                f"{deltas.base_fingerprint}, but this model's fingerprint is {actual}. Load the same base model "
                "(same weights, no other edits applied), or pass check_fingerprint=False / --force to override.")
    return AppliedDeltas(model, add_deltas_(model, deltas.tensors))


@contextlib.contextmanager
def temporarily_applied(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Add ``tensors`` for the duration of a ``with`` block and restore the exact weights afterwards,
    also on error. Editors that must measure the partially edited model (MEMIT, sequential ROME) use
    this, so computing an edit never leaves the model changed."""
    originals = add_deltas_(model, tensors)
    try:
        yield
    finally:
        AppliedDeltas(model, originals).revert()


@contextlib.contextmanager
def preserved_weights(model: nn.Module, names) -> Iterator[None]:
    """Snapshot the named parameters and restore them bit-exactly when the block ends (also on error):
    for editors that change weights in place while they compute (fine-tuning)."""
    params = _parameters(model, list(names))
    with torch.no_grad():
        originals = {n: p.detach().clone() for n, p in params.items()}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(originals[n])
