"""The CPU triangle update on what the statistics pass feeds it: more rows than one float32 slice
(4096), masks spanning slices, several output blocks, strided keys, float32 and float64 accumulators."""
import pytest
import torch

import kedit_core  # noqa: F401
from kedit_core import _ext

pytestmark = pytest.mark.skipif(not _ext.loaded(), reason=f"kedit_core._C not loaded: {_ext.status()}")


@pytest.mark.parametrize("acc_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_rows_masked_and_strided(acc_dtype, dtype):
    torch.manual_seed(0)
    wide = torch.randn(3, 3100, 610).to(dtype)
    x = wide[..., 5:605]                     # d = 600 (three 256-wide blocks, the last partial), strided rows
    mask = torch.rand(3, 3100) > 0.2         # ~7400 rows selected: two row slices
    acc = torch.full((600, 600), 3.0, dtype=acc_dtype)
    torch.ops.kedit.cov_accumulate_(acc, x, mask)
    rows = x.reshape(-1, 600)[mask.reshape(-1)].double()
    expected = torch.triu(rows.T @ rows) + torch.triu(torch.full((600, 600), 3.0, dtype=torch.float64))
    err = (torch.triu(acc).double() - expected).abs().max() / expected.abs().max()
    assert err < (1e-6 if acc_dtype == torch.float64 else 1e-5)
    assert torch.equal(torch.tril(acc, -1), torch.tril(torch.full_like(acc, 3.0), -1))
