"""kedit::gather_segment_sum against its pure-PyTorch reference and an exact float64 oracle, plus opcheck."""
import pytest
import torch

import kedit_core  # noqa: F401  (loads the compiled ops)
from kedit_core import _ext, ops
from kedit_core.ops import reference

from ..conftest import cuda

# Relative to the largest |entry| of the exact float64 result: the inputs are rounded to the dtype in
# every path; the sums run in float32 (float64 for float64 inputs).
TOLERANCE = {torch.float32: 1e-6, torch.float16: 1e-6, torch.bfloat16: 1e-6, torch.float64: 1e-13}
needs_ext = pytest.mark.skipif(not _ext.loaded(), reason=f"kedit_core._C not loaded: {_ext.status()}")


def exact(hidden, rows, positions, segments, weights, num_segments):
    out = torch.zeros(num_segments, hidden.shape[-1], dtype=torch.float64)
    for i in range(rows.numel()):
        w = 1.0 if weights is None else float(weights[i])
        out[segments[i]] += w * hidden[rows[i], positions[i]].double()
    return out


def implementations():
    impls = [("reference", reference.gather_segment_sum)]
    if _ext.loaded():
        impls.append(("compiled", torch.ops.kedit.gather_segment_sum))
    return impls


def case(dtype, n=40, b=6, t=9, d=33, segments=7, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, d, generator=g).to(dtype)
    rows = torch.randint(0, b, (n,), generator=g)
    positions = torch.randint(0, t, (n,), generator=g)
    segs = torch.randint(0, segments, (n,), generator=g)
    weights = torch.rand(n, generator=g)
    return [x.to(device) for x in (hidden, rows, positions, segs, weights)] + [segments]


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("with_weights", [True, False])
def test_matches_exact_sum(dtype, with_weights):
    hidden, rows, positions, segs, weights, s = case(dtype)
    if not with_weights:
        weights = None
    expected = exact(hidden, rows, positions, segs, weights, s)
    for name, fn in implementations():
        got = fn(hidden, rows, positions, segs, weights, s)
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), name
        err = (got.double() - expected).abs().max() / expected.abs().max()
        assert err <= TOLERANCE[dtype], f"{name} {dtype}: rel err {err:.2e}"


def test_non_contiguous_hidden_and_empty_segments():
    hidden = torch.randn(5, 12, 20)[:, ::2, 3:17]  # strided in every dimension
    rows, positions = torch.tensor([0, 4, 2]), torch.tensor([5, 0, 3])
    segs = torch.tensor([2, 2, 0])
    expected = exact(hidden, rows, positions, segs, None, 4)
    for name, fn in implementations():
        got = fn(hidden, rows, positions, segs, None, 4)
        torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6, msg=name)
        assert torch.equal(got[1], torch.zeros(14)) and torch.equal(got[3], torch.zeros(14)), name


def test_group_means_as_weights():
    """The use in MEMIT: mean within template groups, then across groups, per request."""
    hidden = torch.randn(6, 4, 8)
    # request 0 owns rows 0-2 (group sizes 1, 2), request 1 rows 3-5
    rows = torch.arange(6)
    positions = torch.tensor([1, 2, 3, 0, 1, 2])
    segs = torch.tensor([0, 0, 0, 1, 1, 1])
    weights = torch.tensor([0.5, 0.25, 0.25] * 2)
    got = ops.gather_segment_sum(hidden, rows, positions, segs, weights, 2)
    picked = hidden[rows, positions]
    manual = torch.stack([0.5 * picked[0] + 0.5 * picked[1:3].mean(0), 0.5 * picked[3] + 0.5 * picked[4:6].mean(0)])
    torch.testing.assert_close(got, manual, rtol=1e-6, atol=1e-6)


@needs_ext
def test_deterministic_and_equal_to_reference():
    hidden, rows, positions, segs, weights, s = case(torch.float32, n=500, b=30, t=20, d=130, segments=50, seed=4)
    a = torch.ops.kedit.gather_segment_sum(hidden, rows, positions, segs, weights, s)
    b = torch.ops.kedit.gather_segment_sum(hidden, rows, positions, segs, weights, s)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, reference.gather_segment_sum(hidden, rows, positions, segs, weights, s),
                               rtol=1e-6, atol=1e-6)


@needs_ext
def test_bad_arguments_name_the_argument():
    h = torch.randn(2, 3, 4)
    ok = torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match=r"hidden must be \[B, T, D\]"):
        torch.ops.kedit.gather_segment_sum(torch.randn(2, 3), ok, ok, ok, None, 2)
    with pytest.raises(RuntimeError, match="positions must be a 1-D int64"):
        torch.ops.kedit.gather_segment_sum(h, ok, ok.int(), ok, None, 2)
    with pytest.raises(RuntimeError, match=r"rows must lie in \[0, 2\)"):
        torch.ops.kedit.gather_segment_sum(h, torch.tensor([0, 2]), ok, ok, None, 2)
    with pytest.raises(RuntimeError, match=r"segments must lie in \[0, 1\)"):
        torch.ops.kedit.gather_segment_sum(h, ok, ok, ok, None, 1)
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 2\)"):
        reference.gather_segment_sum(h, torch.tensor([0, 2]), ok, ok, None, 2)


@needs_ext
def test_opcheck():
    for dtype in (torch.float32, torch.bfloat16):
        hidden, rows, positions, segs, weights, s = case(dtype, n=12, segments=4)
        torch.library.opcheck(torch.ops.kedit.gather_segment_sum.default, (hidden, rows, positions, segs, weights, s))
        torch.library.opcheck(torch.ops.kedit.gather_segment_sum.default, (hidden, rows, positions, segs, None, s))


def test_dispatch_is_visible():
    assert ops.implementation("gather_segment_sum", "cpu").implementation == ("compiled" if _ext.loaded()
                                                                             else "reference")


@cuda
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_cuda_matches_exact(dtype):
    hidden, rows, positions, segs, weights, s = case(dtype, n=3000, b=64, t=30, d=700, segments=300, seed=5)
    expected = exact(hidden, rows, positions, segs, weights, s)
    got = torch.ops.kedit.gather_segment_sum(*(x.cuda() for x in (hidden, rows, positions, segs, weights)), s)
    assert ((got.cpu().double() - expected).abs().max() / expected.abs().max()) <= 10 * TOLERANCE[dtype]
    again = torch.ops.kedit.gather_segment_sum(*(x.cuda() for x in (hidden, rows, positions, segs, weights)), s)
    assert torch.equal(got, again)  # no atomics: bitwise reproducible
