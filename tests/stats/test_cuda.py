"""The CUDA masked symmetric rank-k update and one-pass statistics on a GPU (skipped without one).

The kernels: tensor cores (WMMA) for bf16/fp16 inputs, SIMT for float32; 128x128 or 64x64 tiles on or
above the diagonal only; split-K over rows with atomics; float32 partial sums flushed every 4096 rows;
16-byte loads when rows are aligned, element loads otherwise. These cases hit each of those paths."""
import pytest
import torch

import kedit_core  # noqa: F401  (loads the compiled ops)
from kedit_core import _ext, ops

from ..conftest import cuda

pytestmark = [cuda, pytest.mark.skipif(not _ext.loaded(), reason="kedit_core._C not loaded")]

# Relative to the largest |entry| of the exact result: products are exact in float32 (bf16/fp16 inputs)
# or rounded once (float32 inputs); float32 sums run over at most 4096 rows before reaching float64.
TOLERANCE = {torch.float64: 1e-5, torch.float32: 1e-4}


def exact_upper(x, mask=None):
    rows = x.reshape(-1, x.shape[-1]).double().cpu()
    if mask is not None:
        rows = rows[mask.reshape(-1).cpu()]
    return torch.triu(rows.T @ rows)


def check(acc, expected, acc_dtype, before=None):
    got = acc.double().cpu()
    if before is not None:
        got = got - before.double().cpu()
    scale = expected.abs().max().clamp_min(1e-30)
    err = float((torch.triu(got) - expected).abs().max() / scale)
    assert err < TOLERANCE[acc_dtype], f"relative error {err:.2e}"
    assert torch.count_nonzero(torch.tril(acc, -1)) == 0, "wrote below the diagonal"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("acc_dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n, d", [(1, 1), (17, 63), (300, 64), (1000, 130), (5000, 256), (9000, 1000),
                                  (40000, 72)])
def test_matches_exact_for_every_path(dtype, acc_dtype, n, d):
    # (40000, 72): few tiles -> many row splits (atomics); 5000/9000 rows: more than one flush per block;
    # d = 1000 (multiple of 8): 16-byte loads for 16-bit inputs; 63, 130: element loads and ragged tiles.
    torch.manual_seed(0)
    x = torch.randn(n, d, device="cuda").to(dtype)
    acc = torch.zeros(d, d, dtype=acc_dtype, device="cuda")
    torch.ops.kedit.cov_accumulate_(acc, x, None)
    check(acc, exact_upper(x), acc_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [96, 333])
def test_padding_rows_are_never_read(dtype, d):
    torch.manual_seed(1)
    x = torch.randn(6, 700, d, device="cuda").to(dtype)
    mask = torch.rand(6, 700, device="cuda") > 0.3
    poisoned = x.clone()
    poisoned[~mask] = float("nan")
    acc = torch.zeros(d, d, dtype=torch.float64, device="cuda")
    torch.ops.kedit.cov_accumulate_(acc, poisoned, mask)
    assert torch.isfinite(acc).all()
    check(acc, exact_upper(x, mask), torch.float64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_strided_and_offset_rows(dtype):
    torch.manual_seed(2)
    wide = torch.randn(2001, 520, device="cuda").to(dtype)
    x = wide[1:, 3:259]          # row stride 520, base pointer not 16-byte aligned: element loads
    y = wide[:, :256]            # aligned rows: 16-byte loads
    for view in (x, y):
        assert view.stride(0) == 520
        acc = torch.zeros(256, 256, dtype=torch.float64, device="cuda")
        torch.ops.kedit.cov_accumulate_(acc, view, None)
        check(acc, exact_upper(view), torch.float64)


def test_accumulates_across_calls_and_leaves_the_lower_triangle():
    torch.manual_seed(3)
    chunks = [torch.randn(3000, 200, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    acc = torch.zeros(200, 200, dtype=torch.float64, device="cuda")
    for c in chunks:
        ops.cov_accumulate_(acc, c)
    check(acc, exact_upper(torch.cat(chunks)), torch.float64)
    ops.symmetrize_upper_(acc)
    full = torch.cat(chunks).double()
    torch.testing.assert_close(acc, full.T @ full, rtol=1e-5, atol=1e-3)


def test_float64_inputs_take_the_exact_path():
    x = torch.randn(500, 77, device="cuda", dtype=torch.float64)
    acc = torch.zeros(77, 77, dtype=torch.float64, device="cuda")
    ops.cov_accumulate_(acc, x)
    torch.testing.assert_close(torch.triu(acc).cpu(), exact_upper(x), rtol=1e-12, atol=1e-10)


def test_one_pass_statistics_on_the_gpu_match_the_cpu(small_corpus):
    from kedit_core.stats import collect_second_moments
    from kedit_core.testing import tiny_model

    from .conftest import relative_error

    cpu_model = tiny_model("llama", num_layers=4, hidden_size=64, context_length=64)
    gpu_model = tiny_model("llama", num_layers=4, hidden_size=64, context_length=64)
    gpu_model.model.to("cuda")
    on_cpu = collect_second_moments(cpu_model, [1, 2], small_corpus, batch_tokens=256, progress=False)
    on_gpu = collect_second_moments(gpu_model, [1, 2], small_corpus, batch_tokens=256, progress=False)
    assert on_gpu.count == on_cpu.count
    for layer in (1, 2):
        assert on_gpu.sums[layer].device.type == "cpu"
        assert relative_error(on_gpu.moment(layer), on_cpu.moment(layer)) < 1e-4  # GPU vs CPU forward kernels
