"""kedit::spd_factor / spd_solve / spd_woodbury_solve against float64 LU solves and their references."""
import pytest
import torch

import kedit_core  # noqa: F401
from kedit_core import _ext, ops
from kedit_core.ops import reference

from ..conftest import cuda

# Relative error against a float64 LU solve of the same (float64-rounded) system.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-3}
needs_ext = pytest.mark.skipif(not _ext.loaded(), reason=f"kedit_core._C not loaded: {_ext.status()}")


def spd(batch, n, seed=0, dtype=torch.float64, cond_shift=0.1):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(*batch, n, 2 * n, generator=g, dtype=torch.float64)
    return (a @ a.mT / (2 * n) + cond_shift * torch.eye(n, dtype=torch.float64)).to(dtype)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def implementations(name):
    impls = [("reference", getattr(reference, name))]
    if _ext.loaded():
        impls.append(("compiled", getattr(torch.ops.kedit, name)))
    return impls


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_factor_reconstructs(dtype):
    a = spd((3,), 40, dtype=dtype)
    for name, fn in implementations("spd_factor"):
        factor = fn(a)
        assert torch.equal(torch.tril(factor), factor), name
        assert rel(factor @ factor.mT, a) <= TOLERANCE[dtype], name


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_solve_matches_lu(dtype):
    a, b = spd((2,), 50, seed=1, dtype=dtype), torch.randn(2, 50, 7, dtype=torch.float64).to(dtype)
    expected = torch.linalg.solve(a.double(), b.double())
    for name, fn in implementations("spd_solve"):
        assert rel(fn(a, b), expected) <= TOLERANCE[dtype], name


@pytest.mark.parametrize("alpha", [1.0, 0.1, 0.0])
def test_woodbury_matches_lu_to_1e_8(alpha):
    """MEMIT's (C + KKᵀ)⁻¹K (alpha = 1) and EMMET's C⁻¹K(KᵀC⁻¹K + αI)⁻¹ from C's cached factor."""
    c = spd((), 300, seed=2)
    k = torch.randn(300, 20, dtype=torch.float64)
    if alpha == 1.0:
        expected = torch.linalg.solve(c + k @ k.T, k)
    else:
        c_inv_k = torch.linalg.solve(c, k)
        expected = c_inv_k @ torch.linalg.inv(k.T @ c_inv_k + alpha * torch.eye(20, dtype=torch.float64))
    factor = torch.linalg.cholesky(c)
    for name, fn in implementations("spd_woodbury_solve"):
        assert rel(fn(factor, k, alpha), expected) <= 1e-8, name


def test_batched_over_layers():
    c = spd((4,), 64, seed=3)
    k = torch.randn(4, 64, 5, dtype=torch.float64)
    x = ops.spd_woodbury_solve(ops.spd_factor(c), k, 1.0)
    for i in range(4):
        assert rel(x[i], torch.linalg.solve(c[i] + k[i] @ k[i].T, k[i])) <= 1e-10


def test_not_positive_definite_names_the_matrix():
    a = spd((3,), 10)
    a[1] = -a[1]
    for name, fn in implementations("spd_factor"):
        with pytest.raises(RuntimeError, match="matrix 1 of the batch is not positive definite"):
            fn(a)


@needs_ext
def test_bad_arguments_name_the_argument():
    with pytest.raises(RuntimeError, match="a must be a square matrix"):
        torch.ops.kedit.spd_factor(torch.zeros(3, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="must be float64 or float32"):
        torch.ops.kedit.spd_factor(torch.eye(3, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="k must be"):
        torch.ops.kedit.spd_woodbury_solve(torch.eye(3, dtype=torch.float64), torch.ones(4, 2, dtype=torch.float64),
                                           1.0)


@needs_ext
def test_opcheck():
    a = spd((2,), 6)
    k = torch.randn(2, 6, 3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.kedit.spd_factor.default, (a,))
    torch.library.opcheck(torch.ops.kedit.spd_solve.default, (a, k))
    torch.library.opcheck(torch.ops.kedit.spd_woodbury_solve.default, (torch.linalg.cholesky(a), k, 1.0))


def test_gradcheck_reference_woodbury():
    """The composition is differentiable (float64) where callers need it."""
    c = spd((), 8)
    factor = torch.linalg.cholesky(c)
    k = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda k: reference.spd_woodbury_solve(factor, k, 1.0), (k,))


@cuda
@needs_ext
def test_cuda_matches_cpu():
    c = spd((3,), 200, seed=4)
    k = torch.randn(3, 200, 16, dtype=torch.float64)
    factor = torch.ops.kedit.spd_factor(c.cuda())
    x = torch.ops.kedit.spd_woodbury_solve(factor, k.cuda(), 1.0).cpu()
    for i in range(3):
        assert rel(x[i], torch.linalg.solve(c[i] + k[i] @ k[i].T, k[i])) <= 1e-8
    assert rel(torch.ops.kedit.spd_solve(c.cuda(), k.cuda()).cpu(), torch.linalg.solve(c, k)) <= 1e-10
