"""Where editors get covariance statistics (C0) from. Editors read C0 only through a
:class:`CovarianceSource`; they never compute or cache it themselves.

``mom2`` is the *normalised* uncentred second moment of the keys (the MLP output projection's input)
at one layer, ``E[k kᵀ] = Σ k kᵀ / count``, a ``[d_k, d_k]`` float tensor on the CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol, runtime_checkable

import torch

from ..errors import KeditError


@dataclass(frozen=True)
class Moment:
    mom2: torch.Tensor            # [d_k, d_k], normalised
    count: int | None             # number of key vectors behind it, when known
    origin: str                   # human-readable provenance (cache file, user file, ...)


@runtime_checkable
class CovarianceSource(Protocol):
    """Editors call :meth:`prepare` once with every layer they will edit (so a computing source can
    collect all of them in one pass over its corpus), then :meth:`moment` per layer."""

    def prepare(self, model, layers: list[int]) -> None:
        """Make the moments of ``layers`` available (compute or load them); may be a no-op."""

    def moment(self, model, layer: int) -> Moment:
        """The normalised second moment at ``layer`` of ``model`` (a LoadedModel)."""


class InMemoryCovariance:
    """C0 given directly as tensors, ``{layer: mom2}`` (tests, notebooks)."""

    def __init__(self, moments: Mapping[int, torch.Tensor], counts: Mapping[int, int] | None = None):
        self._moments = dict(moments)
        self._counts = dict(counts or {})

    def prepare(self, model, layers: list[int]) -> None:
        missing = sorted(set(layers) - set(self._moments))
        if missing:
            raise KeditError(f"no covariance statistics given for layer(s) {missing} (have {sorted(self._moments)})")

    def moment(self, model, layer: int) -> Moment:
        if layer not in self._moments:
            raise KeditError(f"no covariance statistics given for layer {layer} (have layers {sorted(self._moments)})")
        return Moment(self._moments[layer], self._counts.get(layer), "in memory")


def read_moment_file(path: str | os.PathLike, *, expected_dim: int | None = None) -> Moment:
    """Read a precomputed moment: a safetensors file with tensor ``mom2`` (and optional ``count``). The
    header is checked (names, a square ``mom2`` of ``expected_dim``) before anything is read."""
    from ..tensorfile import FLOAT_DTYPES, open_tensor_file

    with open_tensor_file(path, what="covariance file") as f:
        if "mom2" not in f.shapes:
            raise f.fail(f"expected a tensor named 'mom2'; found {f.names}")
        shape = f.shapes["mom2"]
        if len(shape) != 2 or shape[0] != shape[1]:
            raise f.fail(f"'mom2' must be a square matrix; got shape {list(shape)}")
        if expected_dim is not None and shape[0] != expected_dim:
            raise f.fail(f"'mom2' is {shape[0]}x{shape[0]} but the model's keys have dimension {expected_dim}")
        if f.dtypes["mom2"] not in FLOAT_DTYPES:
            raise f.fail(f"'mom2' has dtype {f.dtypes['mom2']}; expected a floating-point matrix")
        if "count" in f.shapes and f.shapes["count"] not in ((), (1,)):
            raise f.fail(f"'count' has shape {list(f.shapes['count'])}; expected one number")
        mom2 = f.get("mom2")
        count = int(f.get("count").reshape(-1)[0]) if "count" in f.shapes else None
    if not torch.isfinite(mom2).all():
        raise KeditError(f"{path}: 'mom2' contains NaN or infinite values")
    return Moment(mom2, count, str(path))


class FileCovariance:
    """C0 from user-supplied files, one per layer (the CLI's ``--cov LAYER=PATH.safetensors``); layers
    without a file fall back to ``fallback`` (another source) if given."""

    def __init__(self, files: Mapping[int, str | os.PathLike], fallback: CovarianceSource | None = None):
        self.files = {int(k): Path(v) for k, v in files.items()}
        self.fallback = fallback

    def prepare(self, model, layers: list[int]) -> None:
        rest = [layer for layer in layers if layer not in self.files]
        if rest and self.fallback is None:
            raise KeditError(f"no covariance file given for layer(s) {rest} (given: {sorted(self.files)}); pass "
                             "--cov LAYER=PATH for each edited layer, or a corpus to compute statistics from")
        if rest:
            self.fallback.prepare(model, rest)

    def moment(self, model, layer: int) -> Moment:
        if layer in self.files:
            return read_moment_file(self.files[layer], expected_dim=model.adapter.key_size)
        if self.fallback is not None:
            return self.fallback.moment(model, layer)
        raise KeditError(f"no covariance file given for layer {layer} (given: {sorted(self.files)}); pass "
                         f"--cov {layer}=PATH or a statistics directory")


def parse_cov_args(values: list[str] | None) -> dict[int, Path]:
    """``["5=/x/l5.safetensors", ...]`` -> ``{5: Path(...)}``, with clear errors."""
    out: dict[int, Path] = {}
    for value in values or []:
        layer, sep, path = value.partition("=")
        if not sep or not layer.strip().isdigit() or not path:
            raise KeditError(f"--cov {value!r}: expected LAYER=PATH.safetensors, e.g. --cov 5=stats/layer5.safetensors")
        if int(layer) in out:
            raise KeditError(f"--cov: layer {layer} given twice")
        out[int(layer)] = Path(path)
    return out
