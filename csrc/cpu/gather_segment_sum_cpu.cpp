// CPU implementation of kedit::gather_segment_sum: one task per block of segments; each output row is
// the weighted sum of its entries' gathered hidden vectors, added in index order (deterministic).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../gather_segment_sum_common.h"

namespace kedit {
namespace {

template <typename T, typename Acc>
void gather_segment_sum_kernel(const at::Tensor& hidden, const at::Tensor& rows, const at::Tensor& positions,
                               const at::Tensor* weights, const SegmentIndex& index, at::Tensor& out) {
  const T* base = hidden.data_ptr<T>();
  const int64_t stride_b = hidden.stride(0), stride_t = hidden.stride(1), stride_d = hidden.stride(2);
  const int64_t d = hidden.size(2);
  const int64_t* row = rows.data_ptr<int64_t>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  const Acc* w = weights != nullptr ? weights->data_ptr<Acc>() : nullptr;
  const int64_t* order = index.order.data_ptr<int64_t>();
  const int64_t* offsets = index.offsets.data_ptr<int64_t>();
  Acc* dst = out.data_ptr<Acc>();
  const int64_t num_segments = out.size(0);
  at::parallel_for(0, num_segments, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      Acc* out_row = dst + s * d;
      for (int64_t j = offsets[s]; j < offsets[s + 1]; ++j) {
        const int64_t i = order[j];
        const T* src = base + row[i] * stride_b + pos[i] * stride_t;
        const Acc scale = w != nullptr ? w[i] : Acc(1);
        for (int64_t c = 0; c < d; ++c) out_row[c] += scale * static_cast<Acc>(src[c * stride_d]);
      }
    }
  });
}

at::Tensor gather_segment_sum_cpu(const at::Tensor& hidden, const at::Tensor& rows, const at::Tensor& positions,
                                  const at::Tensor& segments, const c10::optional<at::Tensor>& weights,
                                  int64_t num_segments) {
  check_gather_segment_sum_args(hidden, rows, positions, segments, weights, num_segments, at::DeviceType::CPU);
  const at::ScalarType acc_type = gather_accumulator_type(hidden);
  at::Tensor out = at::zeros({num_segments, hidden.size(2)}, hidden.options().dtype(acc_type));
  if (rows.numel() == 0 || hidden.size(2) == 0) return out;
  const at::Tensor rows_c = rows.contiguous(), positions_c = positions.contiguous();
  at::Tensor w;
  if (weights.has_value()) w = weights->to(acc_type).contiguous();
  const SegmentIndex index = build_segment_index(segments.contiguous(), num_segments);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, hidden.scalar_type(), "gather_segment_sum_cpu", [&] {
    if (acc_type == at::kDouble) {
      gather_segment_sum_kernel<scalar_t, double>(hidden, rows_c, positions_c, weights.has_value() ? &w : nullptr,
                                                  index, out);
    } else {
      gather_segment_sum_kernel<scalar_t, float>(hidden, rows_c, positions_c, weights.has_value() ? &w : nullptr,
                                                 index, out);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(kedit, CPU, m) { m.impl("gather_segment_sum", &gather_segment_sum_cpu); }

}  // namespace kedit
