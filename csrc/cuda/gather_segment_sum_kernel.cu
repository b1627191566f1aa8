// CUDA kernel body for kedit::gather_segment_sum. Needs only CUDA's own headers.
//
// Grid: x covers the d columns (one thread per column, so a warp reads 32 consecutive elements of a
// gathered hidden vector: coalesced), y strides over segments. Each thread walks its segment's entries
// in the order given by the segment index and keeps the running sum in a register, then writes the
// output once: no atomics, so results are bitwise reproducible.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "gather_segment_sum_cuda.h"

namespace kedit {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;

template <typename Acc>
__device__ __forceinline__ Acc to_acc(float v) { return static_cast<Acc>(v); }
template <typename Acc>
__device__ __forceinline__ Acc to_acc(double v) { return static_cast<Acc>(v); }
template <typename Acc>
__device__ __forceinline__ Acc to_acc(__half v) { return static_cast<Acc>(__half2float(v)); }
template <typename Acc>
__device__ __forceinline__ Acc to_acc(__nv_bfloat16 v) { return static_cast<Acc>(__bfloat162float(v)); }

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
gather_segment_sum_kernel(const T* __restrict__ hidden, int64_t stride_b, int64_t stride_t, int64_t d,
                          const int64_t* __restrict__ rows, const int64_t* __restrict__ positions,
                          const Acc* __restrict__ weights, const int64_t* __restrict__ order,
                          const int64_t* __restrict__ offsets, int64_t num_segments, Acc* __restrict__ out) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= d) return;
  for (int64_t s = blockIdx.y; s < num_segments; s += gridDim.y) {
    Acc sum = Acc(0);
    const int64_t end = offsets[s + 1];
    for (int64_t j = offsets[s]; j < end; ++j) {
      const int64_t i = order[j];
      const Acc value = to_acc<Acc>(hidden[rows[i] * stride_b + positions[i] * stride_t + col]);
      sum += weights != nullptr ? weights[i] * value : value;
    }
    out[s * d + col] = sum;
  }
}

template <typename T, typename Acc>
cudaError_t launch_typed(const void* hidden, int64_t stride_b, int64_t stride_t, int64_t d, const int64_t* rows,
                         const int64_t* positions, const void* weights, const int64_t* order, const int64_t* offsets,
                         int64_t num_segments, void* out, cudaStream_t stream) {
  const unsigned grid_x = static_cast<unsigned>((d + kThreads - 1) / kThreads);
  const unsigned grid_y = static_cast<unsigned>(num_segments < kMaxGridY ? num_segments : kMaxGridY);
  gather_segment_sum_kernel<T, Acc><<<dim3(grid_x, grid_y), kThreads, 0, stream>>>(
      static_cast<const T*>(hidden), stride_b, stride_t, d, rows, positions, static_cast<const Acc*>(weights), order,
      offsets, num_segments, static_cast<Acc*>(out));
  return cudaGetLastError();
}

}  // namespace

cudaError_t gather_segment_sum_launch(const void* hidden, GatherInputType type, int64_t stride_b, int64_t stride_t,
                                      int64_t d, const int64_t* rows, const int64_t* positions, const void* weights,
                                      const int64_t* order, const int64_t* offsets, int64_t num_segments, void* out,
                                      bool acc_is_double, cudaStream_t stream) {
  if (num_segments <= 0 || d <= 0) return cudaSuccess;
  switch (type) {
    case GatherInputType::kFloat64:
      if (!acc_is_double) return cudaErrorInvalidValue;
      return launch_typed<double, double>(hidden, stride_b, stride_t, d, rows, positions, weights, order, offsets,
                                          num_segments, out, stream);
    case GatherInputType::kFloat32:
      return launch_typed<float, float>(hidden, stride_b, stride_t, d, rows, positions, weights, order, offsets,
                                        num_segments, out, stream);
    case GatherInputType::kFloat16:
      return launch_typed<__half, float>(hidden, stride_b, stride_t, d, rows, positions, weights, order, offsets,
                                         num_segments, out, stream);
    case GatherInputType::kBFloat16:
      return launch_typed<__nv_bfloat16, float>(hidden, stride_b, stride_t, d, rows, positions, weights, order,
                                                offsets, num_segments, out, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace kedit
