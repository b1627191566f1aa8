// Launch interface of the CUDA kernel body for kedit::cov_accumulate_. Raw pointers and a stream
// only, so the .cu file needs nothing but CUDA's own headers (it is compile-checked with plain nvcc);
// the torch-facing glue (cov_accumulate_cuda.cpp) validates tensors and calls this.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace kedit {
namespace cuda {

enum class InputType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// acc[i, j] += sum_{r < n_selected} x[rows[r], i] * x[rows[r], j]  for i <= j  (acc is d x d, row-major).
// x is row-major with `row_stride` elements between rows; `rows` (device memory) lists the selected
// row indices, or is nullptr to take rows 0..n_selected-1. Products are summed in float32 registers
// (tensor cores for bf16/fp16 on compute capability >= 8.0/7.0, SIMT otherwise) and flushed into the
// float64 (acc_is_double) or float32 accumulator at least every 4096 rows. Only tiles on or above the
// diagonal are launched, only entries on or above it are written; unselected (padding) rows are never
// read. Queries the current device's compute capability; launches on `stream`.
cudaError_t cov_accumulate_launch(const void* x, InputType x_type, int64_t row_stride, int64_t d,
                                  const int64_t* rows, int64_t n_selected, void* acc, bool acc_is_double,
                                  int sm_count, cudaStream_t stream);

}  // namespace cuda
}  // namespace kedit
