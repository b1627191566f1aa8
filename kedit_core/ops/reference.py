"""Pure-PyTorch references for every kedit op: the fallback when the compiled extension is absent (or
``KEDIT_REFERENCE_OPS=1``) and the oracle the kernels are tested against. Same signatures and
semantics as the schemas in ``csrc/schema.cpp``."""
from __future__ import annotations

import torch


def cov_accumulate_(acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """``acc[i, j] += Σ_r x[r, i] x[r, j]`` over the rows selected by ``mask``, for ``i <= j`` only.

    Products are formed in float32 for float32/bf16/fp16 inputs and in float64 for float64 inputs,
    then added into ``acc`` (float64 or float32); entries below the diagonal are left untouched.
    """
    d = x.shape[-1]
    if acc.shape != (d, d):
        raise ValueError(f"cov_accumulate_: acc must be [d, d] with d = x.shape[-1] = {d}; got {tuple(acc.shape)}")
    if acc.dtype not in (torch.float64, torch.float32):
        raise ValueError(f"cov_accumulate_: acc must be float64 or float32; got {acc.dtype}")
    rows = x.reshape(-1, d)
    if mask is not None:
        if mask.dtype != torch.bool or mask.numel() * d != x.numel():
            raise ValueError(f"cov_accumulate_: mask must be bool with x's leading shape {tuple(x.shape[:-1])}; "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        rows = rows[mask.reshape(-1)]
    if rows.shape[0] == 0:
        return
    rows = rows.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    product = rows.T @ rows
    acc.add_(torch.triu(product).to(acc.dtype))


def _check_gather_args(hidden, rows, positions, segments, weights, num_segments) -> None:
    if hidden.dim() != 3:
        raise ValueError(f"gather_segment_sum: hidden must be [B, T, D]; got shape {tuple(hidden.shape)}")
    if not hidden.is_floating_point():
        raise ValueError(f"gather_segment_sum: hidden must be a floating-point tensor; got {hidden.dtype}")
    n = rows.numel()
    for name, t in (("rows", rows), ("positions", positions), ("segments", segments)):
        if t.dtype != torch.int64 or t.dim() != 1 or t.numel() != n:
            raise ValueError(f"gather_segment_sum: {name} must be a 1-D int64 tensor of length {n} (= rows); "
                             f"got {t.dtype} {tuple(t.shape)}")
    if weights is not None and (weights.dim() != 1 or weights.numel() != n or not weights.is_floating_point()):
        raise ValueError(f"gather_segment_sum: weights must be a 1-D float tensor of length {n}; got "
                         f"{weights.dtype} {tuple(weights.shape)}")
    if num_segments < 0:
        raise ValueError(f"gather_segment_sum: num_segments must be >= 0; got {num_segments}")
    if n:
        if int(rows.min()) < 0 or int(rows.max()) >= hidden.shape[0]:
            raise ValueError(f"gather_segment_sum: rows must lie in [0, {hidden.shape[0]}); got "
                             f"[{int(rows.min())}, {int(rows.max())}]")
        if int(positions.min()) < 0 or int(positions.max()) >= hidden.shape[1]:
            raise ValueError(f"gather_segment_sum: positions must lie in [0, {hidden.shape[1]}); got "
                             f"[{int(positions.min())}, {int(positions.max())}]")
        if int(segments.min()) < 0 or int(segments.max()) >= num_segments:
            raise ValueError(f"gather_segment_sum: segments must lie in [0, {num_segments}); got "
                             f"[{int(segments.min())}, {int(segments.max())}]")


def gather_segment_sum(hidden: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, segments: torch.Tensor,
                       weights: torch.Tensor | None, num_segments: int) -> torch.Tensor:
    """``out[s] = Σ_{i : segments[i] = s} weights[i] · hidden[rows[i], positions[i], :]``.

    Gathers one hidden vector per entry ``i`` (row ``rows[i]`` of the batch, token ``positions[i]``) and
    sums them, weighted, into ``num_segments`` outputs: e.g. the keys at the subjects' last tokens of
    many prompts, averaged per request (weights ``1/count``). Entries are added in index order. The
    result is float32 (float64 for float64 ``hidden``); ``weights`` ``None`` means all ones.
    """
    _check_gather_args(hidden, rows, positions, segments, weights, num_segments)
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    out = torch.zeros(num_segments, hidden.shape[-1], dtype=acc, device=hidden.device)
    if rows.numel() == 0:
        return out
    picked = hidden[rows, positions].to(acc)
    if weights is not None:
        picked = picked * weights.to(acc).unsqueeze(1)
    return out.index_add_(0, segments, picked)


def _check_square(a: torch.Tensor, op: str, name: str) -> None:
    if a.dim() < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"{op}: {name} must be a square matrix or a batch of them [..., n, n]; got shape "
                         f"{tuple(a.shape)}")
    if a.dtype not in (torch.float64, torch.float32):
        raise ValueError(f"{op}: {name} must be float64 or float32; got {a.dtype}")


def _check_rhs(a: torch.Tensor, b: torch.Tensor, op: str, a_name: str, b_name: str) -> None:
    if b.dim() != a.dim() or b.shape[:-1] != a.shape[:-1] or b.dtype != a.dtype or b.device != a.device:
        raise ValueError(f"{op}: {b_name} must be [..., n, m] with {a_name}'s batch shape and n, dtype and device; "
                         f"{a_name} is {a.dtype} {tuple(a.shape)} on {a.device}, {b_name} is {b.dtype} "
                         f"{tuple(b.shape)} on {b.device}")


def spd_factor(a: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factors of a symmetric positive definite matrix or batch ``[..., n, n]``
    (float64/float32). Raises ``RuntimeError`` naming the first batch entry that is not positive
    definite."""
    _check_square(a, "spd_factor", "a")
    return _cholesky_or_raise(a, "spd_factor", "matrix")


def _cholesky_or_raise(a: torch.Tensor, op: str, what: str) -> torch.Tensor:
    factor, info = torch.linalg.cholesky_ex(a)
    flat = info.reshape(-1)
    bad = torch.nonzero(flat).reshape(-1)
    if bad.numel():
        index = int(bad[0])
        raise RuntimeError(f"{op}: {what} {index} of the batch is not positive definite (its leading minor of "
                           f"order {int(flat[index])} is not positive)")
    return factor


def spd_solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a⁻¹ b`` for symmetric positive definite ``a`` ``[..., n, n]`` and ``b`` ``[..., n, m]``: a fresh
    Cholesky factorisation, then two triangular solves."""
    _check_square(a, "spd_solve", "a")
    _check_rhs(a, b, "spd_solve", "a", "b")
    return torch.cholesky_solve(b, _cholesky_or_raise(a, "spd_solve", "matrix"))


def spd_woodbury_solve(factor: torch.Tensor, k: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``X = Y (α I + Kᵀ Y)⁻¹`` with ``Y = C⁻¹ K`` and ``C = L Lᵀ`` given by its lower Cholesky factor.

    With ``α = 1`` this is ``(C + K Kᵀ)⁻¹ K`` by the Woodbury identity (MEMIT's update); with a small
    ``α`` it is EMMET's ``C⁻¹ K (Kᵀ C⁻¹ K + α I)⁻¹``. Cost: two triangular solves with ``m`` right-hand
    sides and one ``m × m`` Cholesky solve, instead of factorising an ``n × n`` matrix. ``Kᵀ C⁻¹ K`` is formed
    as ``Zᵀ Z`` with ``Z = L⁻¹ K``, so it is symmetric positive semi-definite by construction.
    """
    _check_square(factor, "spd_woodbury_solve", "factor")
    _check_rhs(factor, k, "spd_woodbury_solve", "factor", "k")
    z = torch.linalg.solve_triangular(factor, k, upper=False)     # L⁻¹ K
    y = torch.linalg.solve_triangular(factor.mT, z, upper=True)   # C⁻¹ K = L⁻ᵀ L⁻¹ K
    s = z.mT @ z                                                   # Kᵀ C⁻¹ K, a Gram matrix
    s.diagonal(dim1=-2, dim2=-1).add_(alpha)
    small = _cholesky_or_raise(s, "spd_woodbury_solve", "capacitance matrix (alpha*I + K^T C^-1 K)")
    return torch.cholesky_solve(y.mT, small).mT
