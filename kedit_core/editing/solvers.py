"""The linear algebra of the closed-form updates, with C0 factored once per layer and cached.

Every covariance-based update needs ``C = scale · C0 + shift · I`` (C0 the normalised moment from a
:class:`~kedit_core.stats.CovarianceSource`) against the request keys ``K`` (``d_k × N``):

* MEMIT: ``X = (C + K Kᵀ)⁻¹ K``; the update is ``Δ = R Xᵀ``.
* EMMET: ``X = C⁻¹ K (Kᵀ C⁻¹ K + λ_e I)⁻¹``; ``Δ = R Xᵀ`` (λ_e only when N > 1, as published).
* ROME: ``u = C⁻¹ k* / ‖C⁻¹ k*‖``.
* AlphaEdit: ``X = P (P (K Kᵀ + Σ K_p K_pᵀ) + α I)⁻¹ P K`` with ``P = Û Ûᵀ`` the projector on the null space
  of C0 (eigenvectors ``Û`` of C0 with eigenvalue below a threshold); computed as ``Û S⁻¹ Ûᵀ K`` with the
  ``r × r`` matrix ``S = Ûᵀ (K Kᵀ + Σ K_p K_pᵀ) Û + α I`` (exact: ``X`` lies in the range of ``P``).

:class:`CovarianceFactors` factors ``C`` for every edited layer in one batched ``spd_factor`` call (float64)
and keeps the factors in a :class:`FactorCache` beside the statistics, so each later solve costs two
triangular solves and an ``N × N`` Cholesky solve (``spd_woodbury_solve``). When N is not small against
d_k the direct path factors ``C + K Kᵀ`` afresh (``spd_solve``). The ``"reference"`` methods reproduce the
published arithmetic: ``torch.linalg.solve`` (LU, float64) for MEMIT, explicit inverses for EMMET, a
float32 inverse of C0 for ROME, and for AlphaEdit a float32 SVD of C0, the full ``d_k × d_k`` projector and a
float32 LU solve. The null-space bases live in the same cache as the factors.
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
           "rome_left_vector", "covariance_solve", "alphaedit_solve", "alphaedit_regulariser_solve",
           "moment_digest", "WOODBURY_MAX_RATIO"]

SOLVERS = ("auto", "woodbury", "direct", "reference")
# "auto" uses Woodbury while N <= d_k / 4: 2 d_k² N + N³/3 flops against d_k³/3 for a fresh factorisation.
WOODBURY_MAX_RATIO = 0.25


def moment_digest(mom2: torch.Tensor) -> str:
    """A content hash of a moment (sampled for large ones, like model fingerprints)."""
    return parameter_digest("mom2", mom2)[:32]


class FactorCache:
    """Matrices derived from the statistics, keyed by a tuple that starts with the moment's digest: Cholesky
    factors of ``scale · C0 + shift · I`` (:meth:`key`) and AlphaEdit's null-space bases
    (:meth:`nullspace_key`). Kept in memory; with a ``directory`` also written there (atomically) and read
    back in later processes."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else None
        self._memory: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def key(digest: str, scale: float, shift: float) -> tuple:
        return (digest, float(scale), float(shift))

    @staticmethod
    def nullspace_key(digest: str, layer: int, threshold: float) -> tuple:
        return (digest, "nullspace", int(layer), float(threshold))

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
            save_file({"factor": factor.detach().cpu().contiguous()}, tmp, metadata={"kedit": repr(key)})


_CACHES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_FALLBACK_CACHES: dict[int, FactorCache] = {}


def factor_cache_for(source) -> FactorCache:
    """The factor cache that lives beside a covariance source: one per source object, on disk in the
    source's ``factor_cache_dir`` when it names one. A source that wraps another (``inner``, e.g. an editing
    session's view of the base model's statistics) shares the inner source's cache."""
    while getattr(source, "inner", None) is not None:
        source = source.inner
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
        self._projectors: dict[tuple, torch.Tensor] = {}
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

    def nullspace(self, layer: int, threshold: float) -> torch.Tensor:
        """AlphaEdit's ``Û``: the eigenvectors of the normalised C0 (unscaled) whose eigenvalue is below
        ``threshold``, ``[d_k, r]`` float64, from one ``eigh`` cached beside the factors."""
        key = None if self.identity else self.cache.nullspace_key(self._digests[layer], layer, threshold)
        basis = self.cache.get(key, self.device) if key is not None else None
        if basis is None:
            values, vectors = torch.linalg.eigh(self.moment(layer))
            keep = values < threshold
            if not bool(keep.any()):
                raise KeditError(f"layer {layer}: nullspace_threshold = {threshold:g} keeps no direction of C0 (its "
                                 f"smallest eigenvalue is {float(values[0]):.4g}); raise the threshold above that")
            basis = vectors[:, keep].contiguous()
            if key is not None:
                self.cache.put(key, basis)
        return basis

    def reference_projector(self, layer: int, threshold: float) -> torch.Tensor:
        """The published projector: ``U_s U_sᵀ`` from a float32 SVD of C0 over the singular values below
        ``threshold``, a full ``d_k × d_k`` float32 matrix."""
        name = ("projector", layer, float(threshold))
        if name not in self._projectors:
            u, singular, _ = torch.linalg.svd(self.moment(layer).float(), full_matrices=False)
            small = singular < threshold
            if not bool(small.any()):
                raise KeditError(f"layer {layer}: nullspace_threshold = {threshold:g} keeps no direction of C0 (its "
                                 f"smallest singular value is {float(singular[-1]):.4g}); raise the threshold")
            self._projectors[name] = u[:, small] @ u[:, small].T
        return self._projectors[name]


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
    u = covariance_solve(factors, layer, key.reshape(-1, 1)).reshape(-1)
    return (u / u.norm()).float()


def covariance_solve(factors: CovarianceFactors, layer: int, rhs: torch.Tensor) -> torch.Tensor:
    """``C⁻¹ B`` in float64 for ``B`` ``[d_k, m]``, through the cached factor of C."""
    b = rhs.to(device=factors.device, dtype=torch.float64)
    factor = factors.factor(layer)
    try:
        return torch.cholesky_solve(b, factor) if factor is not None else ops.spd_solve(factors.matrix(layer), b)
    except RuntimeError:
        raise _not_pd(layer, "C") from None


def _preserved(preserved_gram: torch.Tensor | None, device, dtype) -> torch.Tensor | None:
    return None if preserved_gram is None else preserved_gram.to(device=device, dtype=dtype)


def alphaedit_solve(factors: CovarianceFactors, layer: int, keys: torch.Tensor, *, threshold: float, l2: float,
                    preserved_gram: torch.Tensor | None = None,
                    method: Literal["fast", "reference"] = "fast") -> torch.Tensor:
    """AlphaEdit's ``X`` ``[d_k, N]`` for keys ``K`` ``[d_k, N]``, so that the update is ``Δ = R Xᵀ``:
    ``X = P (P (K Kᵀ + G_p) + l2 · I)⁻¹ P K`` with ``G_p = Σ K_p K_pᵀ`` (``preserved_gram``, the keys of
    earlier edits) and ``P`` the null-space projector of C0.

    Fast: in the basis ``Û`` of the null space, ``X = Û S⁻¹ Ûᵀ K`` with ``S = Ûᵀ (K Kᵀ + G_p) Û + l2 · I``
    (``r × r``, SPD, Cholesky in float64). Reference (AlphaEdit_main): the full float32 projector and a
    float32 ``torch.linalg.solve`` of ``P (K Kᵀ + G_p) + l2 · I`` against ``P K``.
    """
    if method == "reference":
        projector = factors.reference_projector(layer, threshold).to(factors.device)
        k = keys.to(device=factors.device, dtype=torch.float32)
        gram = k @ k.T
        preserved = _preserved(preserved_gram, factors.device, torch.float32)
        if preserved is not None:
            gram = gram + preserved
        eye = torch.eye(k.shape[0], dtype=torch.float32, device=factors.device)
        return torch.linalg.solve(projector @ gram + l2 * eye, projector @ k).to(torch.float64)
    basis = factors.nullspace(layer, threshold)
    k = keys.to(device=factors.device, dtype=torch.float64)
    projected = basis.T @ k                                            # Ûᵀ K  [r, N]
    s = _kept_regulariser(basis, preserved_gram, l2, factors.device) + projected @ projected.T
    try:
        return basis @ ops.spd_solve(s, projected)
    except RuntimeError:
        raise _not_pd(layer, "Ûᵀ(K Kᵀ + Σ K_p K_pᵀ)Û + L2·I") from None


def _kept_regulariser(basis: torch.Tensor, preserved_gram: torch.Tensor | None, l2: float, device) -> torch.Tensor:
    """``Ûᵀ G_p Û + l2 · I`` (``r × r``)."""
    preserved = _preserved(preserved_gram, device, torch.float64)
    s = basis.T @ preserved @ basis if preserved is not None else torch.zeros(
        basis.shape[1], basis.shape[1], dtype=torch.float64, device=device)
    s.diagonal().add_(l2)
    return s


def alphaedit_regulariser_solve(factors: CovarianceFactors, layer: int, rhs: torch.Tensor, *, threshold: float,
                                l2: float, preserved_gram: torch.Tensor | None = None) -> torch.Tensor:
    """``Û (Ûᵀ G_p Û + l2 · I)⁻¹ Ûᵀ B``: AlphaEdit's counterpart of ``C⁻¹ B`` (what a penalty on the
    cumulative update needs, see :func:`kedit_core.editing.batch.compute_batch_edit`)."""
    basis = factors.nullspace(layer, threshold)
    b = rhs.to(device=factors.device, dtype=torch.float64)
    s = _kept_regulariser(basis, preserved_gram, l2, factors.device)
    try:
        return basis @ ops.spd_solve(s, basis.T @ b)
    except RuntimeError:
        raise _not_pd(layer, "Ûᵀ Σ K_p K_pᵀ Û + L2·I") from None
