"""Deltas: what computing an edit returns. Applying and reverting are shared and exact.

A :class:`Deltas` maps parameter names to update tensors in each parameter's own layout (GPT-2's
Conv1D weights are in x out, so their deltas are too). :func:`apply_deltas` adds them and keeps the
original values of exactly the touched parameters, so :meth:`AppliedDeltas.revert` restores
bit-identical weights. Saved files (safetensors) carry the editor, the resolved hyper-parameters, a
hash of the requests and the base model's fingerprint; applying them to another model is refused.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import nn

from ._version import __version__
from .errors import FingerprintMismatchError, KeditError, NumericalError
from .fingerprint import model_fingerprint
from .tensorfile import (FLOAT_DTYPES, METADATA_KEY, atomic_save_safetensors, open_tensor_file,
                         read_safetensors_metadata, safetensors_metadata, tensor_sha256)

FORMAT = "kedit-deltas/1"
# The helpers delta files share with the other tensor files (kept importable from here).
__all__ = ["Deltas", "AppliedDeltas", "apply_deltas", "add_deltas_", "temporarily_applied", "preserved_weights",
           "FORMAT", "METADATA_KEY", "safetensors_metadata", "read_safetensors_metadata", "atomic_save_safetensors"]


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
        """Write a safetensors file atomically (temporary file + rename), with the sha256 of every
        tensor's bytes in the metadata so that :meth:`load` notices a changed or damaged tensor."""
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in self.tensors.items()}
        meta = {**self.metadata(), "tensors_sha256": {name: tensor_sha256(t) for name, t in sorted(tensors.items())}}
        return atomic_save_safetensors(tensors, path, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, *, model: nn.Module | None = None) -> "Deltas":
        """Read a delta file, verified: kedit's format, plain parameter names, floating-point tensors
        whose bytes match the sha256 recorded when the file was written, finite values, metadata of
        the right types. With ``model``, every name and shape is checked against its parameters before
        any tensor is read. Raises :class:`~kedit_core.errors.TensorFileError` (or :class:`KeditError`
        for deltas made for another architecture) naming the file."""
        with open_tensor_file(path, what="delta file") as f:
            meta = f.meta
            if meta.get("format") != FORMAT:
                raise f.fail(f"not a kedit delta file (metadata format={meta.get('format')!r}, expected {FORMAT!r})")
            fields = {"editor": (str,), "hparams": (dict,), "requests_sha256": (str, type(None)),
                      "base_fingerprint": (str, type(None)), "extra": (dict,), "tensors_sha256": (dict,)}
            for key, types in fields.items():
                if key not in meta or not isinstance(meta[key], types):
                    got = f"is {meta[key]!r}" if key in meta else "is missing"
                    raise f.fail(f"metadata field {key!r} {got}; expected "
                                 f"{' or '.join('null' if t is type(None) else t.__name__ for t in types)}")
            hashes = meta["tensors_sha256"]
            if sorted(hashes) != f.names:
                raise f.fail(f"the recorded tensor hashes name {sorted(hashes)[:5]}, the file holds {f.names[:5]}")
            for name in f.names:
                if f.dtypes[name] not in FLOAT_DTYPES:
                    raise f.fail(f"tensor {name!r} has dtype {f.dtypes[name]}; deltas are floating point")
            if model is not None:
                _check_against(model, f.shapes, str(f.path))
            tensors = {}
            for name in f.names:
                tensor = f.get(name)
                if tensor_sha256(tensor) != hashes[name]:
                    raise f.fail(f"tensor {name!r}: its bytes do not match the sha256 recorded when the file was "
                                 "written (the file was changed or damaged)")
                if not torch.isfinite(tensor).all():
                    raise f.fail(f"tensor {name!r} holds NaN or infinite values")
                tensors[name] = tensor
        return cls(tensors=tensors, editor=meta["editor"], hparams=meta["hparams"],
                   requests_sha256=meta["requests_sha256"], base_fingerprint=meta["base_fingerprint"],
                   extra=meta["extra"])

    # -- applying ------------------------------------------------------------------------------
    def apply(self, model: nn.Module, *, check_fingerprint: bool = True) -> "AppliedDeltas":
        return apply_deltas(model, self, check_fingerprint=check_fingerprint)


def _check_against(model: nn.Module, shapes: Mapping[str, tuple], source: str) -> None:
    """Every name is a parameter of ``model`` with that shape (before any tensor is read)."""
    params = _parameters(model, list(shapes))
    for name, shape in shapes.items():
        if tuple(shape) != tuple(params[name].shape):
            raise KeditError(f"{source}: the delta for {name} has shape {list(shape)}; the model's parameter has "
                             f"{list(params[name].shape)}")


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
            updated = (param.to(torch.promote_types(param.dtype, delta.dtype)) + delta.to(param.device)).to(param.dtype)
            # A sum that overflows the parameter's dtype (bf16/fp16) would ship inf weights: refuse it.
            if not torch.isfinite(updated).all() and torch.isfinite(originals[name]).all():
                raise NumericalError(f"adding the delta to {name} gives NaN or infinite values in "
                                     f"{str(param.dtype).replace('torch.', '')} (largest absolute delta "
                                     f"{float(delta.abs().max()):.3g}); the model is left unchanged")
            param.copy_(updated)
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
