"""``cov_accumulate_`` as a recursive blocked SYRK on the vendor GEMM (cuBLAS on CUDA, the CPU BLAS
elsewhere): the same contract as :func:`kedit_core.ops.reference.cov_accumulate_`, about half a GEMM's
arithmetic.

``xᵀx`` restricted to the upper triangle is split by halving the columns ``levels`` times. At level
``l`` the ``2^(l-1)`` off-diagonal blocks ``X_leftᵀ X_right`` of size ``d/2^l`` are one strided
batched GEMM (no copies: the blocks are views of ``x`` and of ``acc``); after the last level the
``2^L`` diagonal blocks are one more batched GEMM whose upper triangles are added. The work is
``1/2 + 1/2^(L+1)`` of the full product's, in ``L + 1`` large GEMMs that run at the library's full
rate, which is what a hand-written tensor-core kernel could not match (``bench/bench_stats.py``
measures both).

Accuracy is the compiled kernel's: 16-bit inputs are multiplied exactly and summed in float32 by the
GEMM (its ``out_dtype`` form), float32 inputs in float32 with TF32 turned off for the call, float64 in
float64; the float32 partial sums never cover more than ``flush_rows`` rows before they are added into
``acc`` (float64 or float32).
"""
from __future__ import annotations

import contextlib

import torch

_HALF_TYPES = (torch.bfloat16, torch.float16)
DEFAULT_FLUSH_ROWS = 16384
MIN_BLOCK = 512  # the smallest block the recursion makes (smaller GEMMs lose the library's rate)


def default_levels(d: int, min_block: int = MIN_BLOCK) -> int:
    """Halvings of ``d`` such that every block has an equal, even width of at least ``min_block``."""
    levels = 0
    while d % (2 ** (levels + 1)) == 0 and d // 2 ** (levels + 1) >= min_block and levels < 6:
        levels += 1
    return levels


@contextlib.contextmanager
def _no_tf32(device: torch.device):
    """float32 products stay float32 (the op's contract), whatever the global matmul precision."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def _bmm(a: torch.Tensor, b: torch.Tensor, product_dtype: torch.dtype) -> torch.Tensor:
    if a.dtype in _HALF_TYPES and a.device.type == "cuda":
        return torch.bmm(a, b, out_dtype=product_dtype)  # cuBLAS: exact products, float32 sums
    if a.dtype != product_dtype:
        a, b = a.to(product_dtype), b.to(product_dtype)
    return torch.bmm(a, b)


def syrk_upper_add_(acc: torch.Tensor, rows: torch.Tensor, levels: int) -> None:
    """``acc[i, j] += Σ_r rows[r, i] rows[r, j]`` for ``i <= j``; ``acc`` contiguous ``[d, d]``."""
    n, d = rows.shape
    product_dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    offset = acc.storage_offset()
    for level in range(1, levels + 1):
        pairs, width = 2 ** (level - 1), d // 2 ** level
        split = rows.view(n, pairs, 2, width)
        left = split[:, :, 0, :].permute(1, 2, 0)   # [pairs, width, n]: column-major views of x
        right = split[:, :, 1, :].permute(1, 0, 2)  # [pairs, n, width]
        # block p of this level sits at rows [2pw, 2pw + w), columns [2pw + w, 2pw + 2w) of acc
        target = acc.as_strided((pairs, width, width), (2 * width * d + 2 * width, d, 1), offset + width)
        target.add_(_bmm(left, right, product_dtype))
    blocks, width = 2 ** levels, d // 2 ** levels
    diagonal = rows.view(n, blocks, width)
    products = _bmm(diagonal.permute(1, 2, 0), diagonal.permute(1, 0, 2), product_dtype)
    target = acc.as_strided((blocks, width, width), (width * d + width, d, 1), offset)
    target.add_(products.triu_())


def cov_accumulate_blocked_(acc: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None, *,
                            levels: int | None = None, flush_rows: int = DEFAULT_FLUSH_ROWS) -> None:
    """``acc[i, j] += Σ_r x[r, i] x[r, j]`` over the rows selected by ``mask``, for ``i <= j`` only.

    Same arguments, checks and results as :func:`kedit_core.ops.reference.cov_accumulate_`; ``levels``
    (default :func:`default_levels`) sets how often the columns are halved.
    """
    d = x.shape[-1]
    if acc.shape != (d, d):
        raise ValueError(f"cov_accumulate_: acc must be [d, d] with d = x.shape[-1] = {d}; got {tuple(acc.shape)}")
    if acc.dtype not in (torch.float64, torch.float32):
        raise ValueError(f"cov_accumulate_: acc must be float64 or float32; got {acc.dtype}")
    if not x.is_floating_point():
        raise ValueError(f"cov_accumulate_: x must be a floating-point tensor; got {x.dtype}")
    if acc.device != x.device:
        raise ValueError(f"cov_accumulate_: acc is on {acc.device} but x on {x.device}")
    rows = x.reshape(-1, d)
    if mask is not None:
        if mask.dtype != torch.bool or mask.numel() * d != x.numel():
            raise ValueError(f"cov_accumulate_: mask must be bool with x's leading shape {tuple(x.shape[:-1])}; "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        if x.device.type == "cuda":
            # Padding rows become exact zeros (a select, so NaN padding stays out) instead of being gathered
            # out: no host synchronisation, so the caller's next forward queues behind this update.
            rows = torch.where(mask.reshape(-1, 1), rows, rows.new_zeros(()))
        else:
            rows = rows[mask.reshape(-1)]
    if rows.shape[0] == 0 or d == 0:
        return
    if rows.stride(-1) != 1 or rows.stride(0) != d:
        rows = rows.contiguous()
    levels = default_levels(d) if levels is None else levels
    if levels and d % (2 ** levels):
        raise ValueError(f"cov_accumulate_: {levels} halvings need d divisible by {2 ** levels}; got d = {d}")
    target = acc if acc.is_contiguous() else torch.zeros_like(acc, memory_format=torch.contiguous_format)
    with _no_tf32(x.device):
        for start in range(0, rows.shape[0], flush_rows):
            syrk_upper_add_(target, rows[start:start + flush_rows], levels)
    if target is not acc:
        acc.add_(target)
