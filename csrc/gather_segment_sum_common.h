// Pieces shared by the CPU and CUDA implementations of kedit::gather_segment_sum: argument checks (the
// same messages on both devices: argument, expected, got) and the segment index (CSR) both kernels walk,
// so that every output is summed in the same, deterministic order.
#pragma once
#include <ATen/ATen.h>

namespace kedit {

inline void check_gather_segment_sum_args(const at::Tensor& hidden, const at::Tensor& rows, const at::Tensor& positions,
                                          const at::Tensor& segments, const c10::optional<at::Tensor>& weights,
                                          int64_t num_segments, at::DeviceType device) {
  TORCH_CHECK(hidden.dim() == 3, "gather_segment_sum: hidden must be [B, T, D]; got shape ", hidden.sizes());
  const auto ht = hidden.scalar_type();
  TORCH_CHECK(ht == at::kFloat || ht == at::kHalf || ht == at::kBFloat16 || ht == at::kDouble,
              "gather_segment_sum: hidden must be float32, float16, bfloat16 or float64; got ", ht);
  TORCH_CHECK(hidden.device().type() == device, "gather_segment_sum: hidden is on ", hidden.device());
  const int64_t n = rows.numel();
  const std::pair<const char*, const at::Tensor*> index_args[] = {
      {"rows", &rows}, {"positions", &positions}, {"segments", &segments}};
  for (const auto& arg : index_args) {
    const at::Tensor& t = *arg.second;
    TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 1 && t.numel() == n, "gather_segment_sum: ", arg.first,
                " must be a 1-D int64 tensor of length ", n, " (= rows); got ", t.scalar_type(), " ", t.sizes());
    TORCH_CHECK(t.device() == hidden.device(), "gather_segment_sum: ", arg.first, " must be on hidden's device ",
                hidden.device(), "; got ", t.device());
  }
  if (weights.has_value()) {
    const at::Tensor& w = *weights;
    TORCH_CHECK(w.dim() == 1 && w.numel() == n && at::isFloatingType(w.scalar_type()),
                "gather_segment_sum: weights must be a 1-D float tensor of length ", n, "; got ", w.scalar_type(), " ",
                w.sizes());
    TORCH_CHECK(w.device() == hidden.device(), "gather_segment_sum: weights must be on hidden's device ",
                hidden.device(), "; got ", w.device());
  }
  TORCH_CHECK(num_segments >= 0, "gather_segment_sum: num_segments must be >= 0; got ", num_segments);
  if (n > 0) {
    const int64_t r0 = rows.min().item<int64_t>(), r1 = rows.max().item<int64_t>();
    TORCH_CHECK(r0 >= 0 && r1 < hidden.size(0), "gather_segment_sum: rows must lie in [0, ", hidden.size(0),
                "); got [", r0, ", ", r1, "]");
    const int64_t p0 = positions.min().item<int64_t>(), p1 = positions.max().item<int64_t>();
    TORCH_CHECK(p0 >= 0 && p1 < hidden.size(1), "gather_segment_sum: positions must lie in [0, ", hidden.size(1),
                "); got [", p0, ", ", p1, "]");
    const int64_t s0 = segments.min().item<int64_t>(), s1 = segments.max().item<int64_t>();
    TORCH_CHECK(s0 >= 0 && s1 < num_segments, "gather_segment_sum: segments must lie in [0, ", num_segments,
                "); got [", s0, ", ", s1, "]");
  }
}

inline at::ScalarType gather_accumulator_type(const at::Tensor& hidden) {
  return hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Entries grouped by segment: order[offsets[s] .. offsets[s+1]) lists the entries of segment s in index
// order (a stable sort), so each output is summed entry by entry in the order the caller gave them.
struct SegmentIndex {
  at::Tensor order;    // [n] int64
  at::Tensor offsets;  // [num_segments + 1] int64
};

inline SegmentIndex build_segment_index(const at::Tensor& segments, int64_t num_segments) {
  SegmentIndex index;
  index.order = std::get<1>(segments.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false)).contiguous();
  at::Tensor counts = at::bincount(segments, /*weights=*/{}, /*minlength=*/num_segments);
  index.offsets = at::cat({at::zeros({1}, counts.options()), counts.cumsum(0)}).to(at::kLong).contiguous();
  return index;
}

}  // namespace kedit
