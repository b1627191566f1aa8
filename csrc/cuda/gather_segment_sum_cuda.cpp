// Torch-facing glue for the CUDA kedit::gather_segment_sum: validates tensors, builds the segment index
// (a stable sort of the segment ids), and launches the kernel body on the current stream. Builds only
// with CUDA torch.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../gather_segment_sum_common.h"
#include "gather_segment_sum_cuda.h"

namespace kedit {
namespace {

at::Tensor gather_segment_sum_cuda(const at::Tensor& hidden, const at::Tensor& rows, const at::Tensor& positions,
                                   const at::Tensor& segments, const c10::optional<at::Tensor>& weights,
                                   int64_t num_segments) {
  check_gather_segment_sum_args(hidden, rows, positions, segments, weights, num_segments, at::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const at::ScalarType acc_type = gather_accumulator_type(hidden);
  at::Tensor out = at::zeros({num_segments, hidden.size(2)}, hidden.options().dtype(acc_type));
  if (rows.numel() == 0 || hidden.size(2) == 0 || num_segments == 0) return out;
  at::Tensor source = hidden.stride(2) == 1 ? hidden : hidden.contiguous();
  const at::Tensor rows_c = rows.contiguous(), positions_c = positions.contiguous();
  at::Tensor w;
  if (weights.has_value()) w = weights->to(acc_type).contiguous();
  const SegmentIndex index = build_segment_index(segments.contiguous(), num_segments);
  const auto st = source.scalar_type();
  const cuda::GatherInputType type = st == at::kDouble     ? cuda::GatherInputType::kFloat64
                                     : st == at::kHalf     ? cuda::GatherInputType::kFloat16
                                     : st == at::kBFloat16 ? cuda::GatherInputType::kBFloat16
                                                           : cuda::GatherInputType::kFloat32;
  cudaError_t err = cuda::gather_segment_sum_launch(
      source.data_ptr(), type, source.stride(0), source.stride(1), source.size(2), rows_c.data_ptr<int64_t>(),
      positions_c.data_ptr<int64_t>(), weights.has_value() ? w.data_ptr() : nullptr,
      index.order.data_ptr<int64_t>(), index.offsets.data_ptr<int64_t>(), num_segments, out.data_ptr(),
      acc_type == at::kDouble, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "gather_segment_sum: CUDA kernel launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kedit, CUDA, m) { m.impl("gather_segment_sum", &gather_segment_sum_cuda); }

}  // namespace kedit
