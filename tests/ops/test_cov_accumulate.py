"""kedit::cov_accumulate_ against its pure-PyTorch reference, plus opcheck."""
import pytest
import torch

import kedit_core  # noqa: F401  (loads the compiled ops)
from kedit_core import _ext, ops
from kedit_core.ops import reference
from kedit_core.ops.blocked import cov_accumulate_blocked_, default_levels

from ..conftest import cuda

# Tolerances relative to the largest |entry| of the exact float64 result, per input dtype: the kernel
# forms products in float32 from inputs that were rounded to the input dtype in both paths.
TOLERANCE = {torch.float32: 2e-6, torch.float16: 2e-6, torch.bfloat16: 2e-6, torch.float64: 1e-12}
needs_ext = pytest.mark.skipif(not _ext.loaded(), reason=f"kedit_core._C not loaded: {_ext.status()}")


def exact(x, mask):
    rows = x.reshape(-1, x.shape[-1]).double()
    if mask is not None:
        rows = rows[mask.reshape(-1)]
    return torch.triu(rows.T @ rows)


def blocked_deep(acc, x, mask=None):
    """The blocked SYRK with as many halvings as the width allows and small flushes: every code path."""
    cov_accumulate_blocked_(acc, x, mask, levels=default_levels(x.shape[-1], min_block=4), flush_rows=64)


def implementations(device):
    impls = [("reference", reference.cov_accumulate_), ("blocked", cov_accumulate_blocked_),
             ("blocked-deep", blocked_deep)]
    if _ext.loaded():
        impls.append(("compiled", torch.ops.kedit.cov_accumulate_))
    return impls


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("shape", [(37, 19), (3, 50, 300), (1, 513)])
@pytest.mark.parametrize("with_mask", [True, False])
def test_matches_exact_upper_triangle(dtype, shape, with_mask):
    torch.manual_seed(0)
    x = torch.randn(*shape).to(dtype)
    mask = (torch.rand(shape[:-1]) > 0.3) if with_mask else None
    d = shape[-1]
    expected = exact(x, mask)
    for name, fn in implementations("cpu"):
        acc = torch.full((d, d), 7.0, dtype=torch.float64)
        lower_before = torch.tril(acc, -1).clone()
        fn(acc, x, mask)
        got_upper = torch.triu(acc) - torch.triu(torch.full_like(acc, 7.0))
        scale = expected.abs().max().clamp_min(1e-30)
        err = (got_upper - expected).abs().max() / scale
        assert err <= TOLERANCE[dtype], f"{name} {dtype} {shape}: rel err {err:.2e}"
        assert torch.equal(torch.tril(acc, -1), lower_before), f"{name} wrote below the diagonal"


@needs_ext
@pytest.mark.parametrize("acc_dtype", [torch.float64, torch.float32])
def test_compiled_equals_reference(acc_dtype):
    torch.manual_seed(1)
    x = torch.randn(4, 64, 700)
    mask = torch.rand(4, 64) > 0.5
    a = torch.zeros(700, 700, dtype=acc_dtype)
    b = torch.zeros(700, 700, dtype=acc_dtype)
    torch.ops.kedit.cov_accumulate_(a, x, mask)
    reference.cov_accumulate_(b, x, mask)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_padding_rows_do_not_count():
    x = torch.randn(2, 5, 8)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, :3] = True
    x_poisoned = x.clone()
    x_poisoned[~mask] = float("nan")  # padding rows must never be read into the product
    for name, fn in implementations("cpu"):
        acc = torch.zeros(8, 8, dtype=torch.float64)
        fn(acc, x_poisoned, mask)
        assert torch.isfinite(acc).all(), name
        torch.testing.assert_close(acc, exact(x, mask), rtol=1e-6, atol=1e-6)


def test_accumulates_across_calls_and_symmetrizes():
    torch.manual_seed(2)
    chunks = [torch.randn(30, 12) for _ in range(4)]
    acc = torch.zeros(12, 12, dtype=torch.float64)
    for c in chunks:
        ops.cov_accumulate_(acc, c)
    ops.symmetrize_upper_(acc)
    full = torch.cat(chunks).double()
    torch.testing.assert_close(acc, full.T @ full, rtol=1e-6, atol=1e-6)


@needs_ext
def test_bad_arguments_name_the_argument():
    with pytest.raises(RuntimeError, match="acc must be a square"):
        torch.ops.kedit.cov_accumulate_(torch.zeros(3, 4, dtype=torch.float64), torch.randn(2, 4), None)
    with pytest.raises(RuntimeError, match="mask must be bool"):
        torch.ops.kedit.cov_accumulate_(torch.zeros(4, 4, dtype=torch.float64), torch.randn(2, 4), torch.ones(2))
    with pytest.raises(RuntimeError, match="x must be float32, float16, bfloat16 or float64"):
        torch.ops.kedit.cov_accumulate_(torch.zeros(4, 4, dtype=torch.float64), torch.ones(2, 4, dtype=torch.int64),
                                        None)


@needs_ext
def test_opcheck():
    x = torch.randn(16, 24)
    mask = torch.rand(16) > 0.4
    for args in [(torch.zeros(24, 24, dtype=torch.float64), x, mask),
                 (torch.zeros(24, 24, dtype=torch.float64), x.to(torch.bfloat16), None)]:
        torch.library.opcheck(torch.ops.kedit.cov_accumulate_.default, args)


def test_dispatch_is_visible_and_reference_can_be_forced(monkeypatch):
    choice = ops.implementation("cov_accumulate_", "cpu")
    assert choice.implementation == ("compiled" if _ext.loaded() else "reference")
    monkeypatch.setenv("KEDIT_REFERENCE_OPS", "1")
    ops.reset_cache()
    try:
        assert ops.implementation("cov_accumulate_", "cpu").implementation == "reference"
    finally:
        monkeypatch.delenv("KEDIT_REFERENCE_OPS")
        ops.reset_cache()


@cuda
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("acc_dtype", [torch.float64, torch.float32])
def test_cuda_matches_reference(dtype, acc_dtype):
    torch.manual_seed(3)
    x = torch.randn(3, 200, 333, device="cuda").to(dtype)
    mask = torch.rand(3, 200, device="cuda") > 0.25
    acc = torch.zeros(333, 333, dtype=acc_dtype, device="cuda")
    torch.ops.kedit.cov_accumulate_(acc, x, mask)
    expected = exact(x.cpu(), mask.cpu())
    scale = expected.abs().max()
    assert ((torch.triu(acc.cpu().double()) - expected).abs().max() / scale) < (1e-5 if acc_dtype == torch.float64 else 1e-4)
    assert torch.equal(torch.tril(acc, -1), torch.zeros_like(acc).tril(-1))


def test_blocked_levels_cover_the_upper_triangle_once():
    """Every (i <= j) is added exactly once whatever the recursion depth: ones in, counts out."""
    x = torch.ones(5, 96, dtype=torch.float64)
    for levels in range(0, 6):
        acc = torch.zeros(96, 96, dtype=torch.float64)
        cov_accumulate_blocked_(acc, x, levels=levels)
        assert torch.equal(acc, torch.triu(torch.full((96, 96), 5.0, dtype=torch.float64))), levels
    with pytest.raises(ValueError, match="divisible by 8"):
        cov_accumulate_blocked_(torch.zeros(100, 100, dtype=torch.float64), torch.ones(3, 100), levels=3)
    assert default_levels(4096) == 3 and default_levels(3072) == 2 and default_levels(16384) == 5
    assert default_levels(513) == 0


def test_default_cuda_choice_is_the_blocked_syrk():
    """The routing the GPU measurements decided (bench/results/gpu/): no GPU is needed to check it."""
    choice = ops.implementation("cov_accumulate_", "cuda")
    if not __import__("os").environ.get("KEDIT_REFERENCE_OPS"):
        assert choice.implementation == "blocked" and "measured" in choice.reason


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("acc_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("levels", [0, 1, 3])
def test_cuda_blocked_matches_exact(dtype, acc_dtype, levels):
    torch.manual_seed(4)
    x = torch.randn(3, 700, 512, device="cuda").to(dtype)
    mask = torch.rand(3, 700, device="cuda") > 0.25
    acc = torch.full((512, 512), 2.0, dtype=acc_dtype, device="cuda")
    cov_accumulate_blocked_(acc, x, mask, levels=levels, flush_rows=1000)
    expected = exact(x.cpu(), mask.cpu()) + torch.triu(torch.full((512, 512), 2.0, dtype=torch.float64))
    scale = expected.abs().max()
    tol = 1e-12 if dtype == torch.float64 and acc_dtype == torch.float64 else (
        1e-5 if acc_dtype == torch.float64 else 1e-4)
    assert ((torch.triu(acc.cpu().double()) - expected).abs().max() / scale) < tol
    assert torch.equal(torch.tril(acc, -1), torch.full_like(acc, 2.0).tril(-1))
