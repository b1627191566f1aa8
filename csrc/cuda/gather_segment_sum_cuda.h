// Launch interface of the CUDA kernel body for kedit::gather_segment_sum. Raw pointers and a stream only,
// so the .cu file needs nothing but CUDA's own headers (compile-checked with plain nvcc); the torch-facing
// glue (gather_segment_sum_cuda.cpp) validates tensors, builds the segment index and calls this.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace kedit {
namespace cuda {

enum class GatherInputType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// out[s, c] = sum over j in [offsets[s], offsets[s+1]) of w[i] * hidden[rows[i], positions[i], c], i = order[j],
// summed in j order (deterministic). hidden has element strides (stride_b, stride_t, 1) and d columns;
// weights (nullable) and out have the accumulator type: double when acc_is_double (only with kFloat64
// input), float otherwise. out is [num_segments, d] row-major and is fully overwritten.
cudaError_t gather_segment_sum_launch(const void* hidden, GatherInputType type, int64_t stride_b, int64_t stride_t,
                                      int64_t d, const int64_t* rows, const int64_t* positions, const void* weights,
                                      const int64_t* order, const int64_t* offsets, int64_t num_segments, void* out,
                                      bool acc_is_double, cudaStream_t stream);

}  // namespace cuda
}  // namespace kedit
