"""The linear algebra of the closed-form updates, with C0 factored once per layer and cached.

Every covariance-based update needs ``C = scale · C0 + shift · I`` (C0 the normalised moment from a
:class:`~kedit_core.stats.CovarianceSource`) against the request keys ``K`` (``d_k × N``):

* MEMIT: ``X = (C + K Kᵀ)⁻¹ K``; the update is ``Δ = R Xᵀ``.
* EMMET: ``X = C⁻¹ K (Kᵀ C⁻¹ K + λ_e I)⁻¹``; ``Δ = R Xᵀ`` (λ_e only when N > 1, as published).
* ROME: ``u = C⁻¹ k* / ‖C⁻¹ k*‖``.

:class:`CovarianceFactors` factors ``C`` for every edited layer in one batched ``spd_factor`` call (float64)
and keeps the factors in a :class:`FactorCache` beside the statistics, so each later solve costs two
triangular solves and an ``N × N`` Cholesky solve (``spd_woodbury_solve``). When N is not small against
d_k the direct path factors ``C + K Kᵀ`` afresh (``spd_solve``). The ``"reference"`` methods reproduce the
published arithmetic: ``torch.linalg.solve`` (LU, float64) for MEMIT, explicit inverses for EMMET and a
float32 inverse of C0 for ROME.
"""
from __future__ import annotations

import hashlib
import os
import weakref
from pathlib import Path
from typing import Literal

import torch

from .. import ops
from ..errors import KeditError, NumericalError
from ..fingerprint import parameter_digest

__all__ = ["FactorCache", "factor_cache_for", "CovarianceFactors", "SOLVERS", "memit_solve", "emmet_solve",
           "rome_left_vector", "moment_digest", "WOODBURY_MAX_RATIO"]

SOLVERS = ("auto", "woodbury", "direct", "reference")
# "auto" uses Woodbury while N <= d_k / 4: 2 d_k² N + N³/3 flops against d_k³/3 for a fresh factorisation.
WOODBURY_MAX_RATIO = 0.25


def moment_digest(mom2: torch.Tensor) -> str:
    """A content hash of a moment (sampled for large ones, like model fingerprints)."""
    return parameter_digest("mom2", mom2)[:32]


class FactorCache:
    """Cholesky factors of ``scale · C0 + shift · I`` keyed by (moment digest, scale, shift). Kept in
    memory; with a ``directory`` also written there (atomically) and read back in later processes."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else None
        self._memory: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def key(digest: str, scale: float, shift: float) -> tuple:
        return (digest, float(scale), float(shift))

    def _path(self, key: tuple) -> Path | None:
        if self.directory is None:
            return None
        name = hashlib.sha256(repr(key).encode()).hexdigest()[:24]
        return self.directory / f"factor-{name}.safetensors"

    def get(self, key: tuple, device) -> torch.Tensor | None:
        if key in self._memory:
            return self._memory[key].to(device)
        path = self._path(key)
        if path is not None and path.exists():
            from safetensors.torch import load_file

            try:
                factor = load_file(str(path))["factor"]
            except Exception:  # a damaged cache file is recomputed, never trusted
                return None
            self._memory[key] = factor
            return factor.to(device)
        return None

    def put(self, key: tuple, factor: torch.Tensor) -> None:
        self._memory[key] = factor
        path = self._path(key)
        if path is None:
            return
        from safetensors.torch import save_file

        from ..atomic import atomic_path

        with atomic_path(path) as tmp:
            save_file({"factor": factor.detach().cpu().contiguous()}, tmp,
                      metadata={"kedit": repr({"digest": key[0], "scale": key[1], "shift": key[2]})})


_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_FALLBACK_CACHES: dict[int, FactorCache] = {}


def factor_cache_for(source) -> FactorCache:
    """The factor cache that lives beside a covariance source: one per source object, on disk in the
    source's ``factor_cache_dir`` when it names one."""
    try:
        cache = _CACHES.get(source)
    except TypeError:  # not weak-referenceable
        return _FALLBACK_CACHES.setdefault(id(source), FactorCache(getattr(source, "factor_cache_dir", None)))
    if cache is None:
        cache = FactorCache(getattr(source, "factor_cache_dir", None))
        _CACHES[source] = cache
    return cache


class CovarianceFactors:
    """``C_l = scale · C0_l + shift · I`` for the edited layers, read through ``source`` (or the
    identity when ``source`` is None, i.e. no covariance adjustment) and factored on demand in one
    batched call."""

    def __init__(self, model, source, layers: list[int], *, scale: float = 1.0, shift: float = 0.0,
                 cache: FactorCache | None = None, device=None):
        self.model = model
        self.source = source
        self.layers = list(layers)
        self.scale, self.shift = float(scale), float(shift)
        self.device = torch.device(device) if device is not None else model.device
        self.cache = cache if cache is not None else (factor_cache_for(source) if source is not None else FactorCache())
        self._moments: dict[int, torch.Tensor] = {}
        self._digests: dict[int, str] = {}
        self._factors: dict[int, torch.Tensor | None] = {}
        self.origins: dict[int, str] = {}

    @property
    def identity(self) -> bool:
        return self.source is None

    def prepare(self) -> None:
        """Read the moments (``source.prepare`` once for all layers)."""
        if self.identity:
            return
        self.source.prepare(self.model, self.layers)
        d_k = self.model.adapter.key_size
        for layer in self.layers:
            moment = self.source.moment(self.model, layer)
            mom2 = moment.mom2
            if tuple(mom2.shape) != (d_k, d_k):
                raise KeditError(f"covariance statistics for layer {layer} ({moment.origin}) are "
                                 f"{tuple(mom2.shape)}; this model's keys need {d_k}x{d_k}")
            # Cheap necessary conditions for a second moment (the full check is the Cholesky factor the
            # fast solvers compute; the published solves would run on without one).
            diagonal = torch.diagonal(mom2)
            if not torch.isfinite(mom2).all() or bool((diagonal < 0).any()) or not bool((diagonal > 0).any()):
                raise NumericalError(f"covariance statistics for layer {layer} ({moment.origin}) are not a second "
                                     "moment: NaN/inf values, a negative diagonal or all zeros (indefinite or "
                                     "singular C0); recompute them")
            self._moments[layer] = mom2
            self._digests[layer] = moment_digest(mom2)
            self.origins[layer] = moment.origin

    def moment(self, layer: int) -> torch.Tensor:
        """The normalised moment C0 of ``layer`` (float64, on the solve device)."""
        if self.identity:
            return torch.eye(self.model.adapter.key_size, dtype=torch.float64, device=self.device)
        if layer not in self._moments:
            raise KeditError(f"layer {layer} is not among the prepared layers {self.layers}")
        return self._moments[layer].to(device=self.device, dtype=torch.float64)

    def matrix(self, layer: int) -> torch.Tensor:
        """``scale · C0 + shift · I`` in float64."""
        c = self.moment(layer) * self.scale
        if self.shift:
            c.diagonal().add_(self.shift)
        return c

    def factor_all(self) -> None:
        """Factor every layer's matrix that is not cached yet, in one batched call. A layer whose matrix
        is not positive definite (too few statistics tokens) gets no factor; solves then use the direct
        path, which only needs ``C + K Kᵀ`` to be positive definite."""
        missing = []
        for layer in self.layers:
            if layer in self._factors:
                continue
            key = self._key(layer)
            cached = self.cache.get(key, self.device) if key is not None else None
            if cached is not None:
                self._factors[layer] = cached
            else:
                missing.append(layer)
        if not missing:
            return
        stacked = torch.stack([self.matrix(layer) for layer in missing])
        try:
            factors = ops.spd_factor(stacked)
        except RuntimeError:
            factors = None
        for i, layer in enumerate(missing):
            factor = factors[i] if factors is not None else self._factor_one(layer)
            self._factors[layer] = factor
            if factor is not None and self._key(layer) is not None:
                self.cache.put(self._key(layer), factor)

    def _factor_one(self, layer: int) -> torch.Tensor | None:
        try:
            return ops.spd_factor(self.matrix(layer))
        except RuntimeError:
            return None

    def _key(self, layer: int):
        if self.identity:
            return None
        return self.cache.key(self._digests[layer], self.scale, self.shift)

    def factor(self, layer: int) -> torch.Tensor | None:
        if layer not in self._factors:
            self.factor_all()
        return self._factors.get(layer)


def _choose(method: str, n: int, d_k: int, has_factor: bool) -> str:
    if method not in SOLVERS:
        raise KeditError(f"unknown solver {method!r}; expected one of {', '.join(SOLVERS)}")
    if method == "auto":
        return "woodbury" if has_factor and n <= WOODBURY_MAX_RATIO * d_k else "direct"
    if method == "woodbury" and not has_factor:
        return "direct"
    return method


def _not_pd(layer: int, what: str) -> NumericalError:
    return NumericalError(f"layer {layer}: {what} is not positive definite; the covariance statistics are probably "
                      "estimated from too few tokens (collect more) or the update weight is too small")


def _singular(layer: int, what: str) -> NumericalError:
    return NumericalError(f"layer {layer}: {what} is singular (the published solve needs it invertible); the "
                          "covariance statistics are probably degenerate (collect them from more tokens)")


def memit_solve(factors: CovarianceFactors, layer: int, keys: torch.Tensor,
                method: Literal["auto", "woodbury", "direct", "reference"] = "auto") -> torch.Tensor:
    """``X = (C + K Kᵀ)⁻¹ K`` in float64 for keys ``K`` ``[d_k, N]``."""
    k = keys.to(device=factors.device, dtype=torch.float64)
    chosen = _choose(method, k.shape[1], k.shape[0], method != "reference" and factors.factor(layer) is not None)
    if chosen == "reference":  # memit_main: torch.linalg.solve(λ·cov.double() + K Kᵀ, K)
        try:
            return torch.linalg.solve(factors.matrix(layer) + k @ k.T, k)
        except RuntimeError:
            raise _singular(layer, "λ C0 + K Kᵀ") from None
    try:
        if chosen == "woodbury":
            return ops.spd_woodbury_solve(factors.factor(layer), k, 1.0)
        return ops.spd_solve(factors.matrix(layer) + k @ k.T, k)
    except RuntimeError:
        raise _not_pd(layer, "C + K Kᵀ") from None


def emmet_solve(factors: CovarianceFactors, layer: int, keys: torch.Tensor, emmet_lambda: float,
                method: Literal["auto", "woodbury", "direct", "reference"] = "auto") -> torch.Tensor:
    """``X = C⁻¹ K (Kᵀ C⁻¹ K + λ_e I)⁻¹`` in float64 (λ_e dropped for a single request, as published)."""
    k = keys.to(device=factors.device, dtype=torch.float64)
    n = k.shape[1]
    ridge = emmet_lambda if n > 1 else 0.0
    if method == "reference":  # emmet_main: explicit inverses, pinv if D is singular
        try:
            c_inv = torch.inverse(factors.matrix(layer))
        except RuntimeError:
            raise _singular(layer, "C0") from None
        d = k.T @ c_inv @ k
        if n > 1:
            d = d + emmet_lambda * torch.eye(n, dtype=d.dtype, device=d.device)
        try:
            d_inv = torch.inverse(d)
        except RuntimeError:
            d_inv = torch.linalg.pinv(d)
        return (d_inv @ k.T @ c_inv).T
    factor = factors.factor(layer)
    try:
        if factor is None:
            factor = ops.spd_factor(factors.matrix(layer))
        return ops.spd_woodbury_solve(factor, k, ridge)
    except RuntimeError:
        raise _not_pd(layer, "C (or Kᵀ C⁻¹ K + λ_e I)") from None


def rome_left_vector(factors: CovarianceFactors, layer: int, key: torch.Tensor,
                     method: Literal["auto", "reference"] = "auto") -> torch.Tensor:
    """ROME's ``u = C⁻¹ k* / ‖C⁻¹ k*‖`` (float32). Reference: the float32 inverse of C0 times k*."""
    if factors.identity:
        u = key.float()
        return u / u.norm()
    if method == "reference":  # compute_u.get_inv_cov: torch.inverse of the float32 moment
        try:
            inv = torch.inverse(factors.moment(layer).float())
        except RuntimeError:
            raise _singular(layer, "C0") from None
        u = inv @ key.to(inv.device).float()
        return u / u.norm()
    factor = factors.factor(layer)
    k = key.to(device=factors.device, dtype=torch.float64).reshape(-1, 1)
    try:
        u = torch.cholesky_solve(k, factor) if factor is not None else ops.spd_solve(factors.matrix(layer), k)
    except RuntimeError:
        raise _not_pd(layer, "C0") from None
    u = u.reshape(-1)
    return (u / u.norm()).float()
