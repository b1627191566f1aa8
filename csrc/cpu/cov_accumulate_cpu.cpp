// CPU implementation of kedit::cov_accumulate_: a masked symmetric rank-k update of the upper triangle.
//
// The selected rows are gathered (padding rows are never copied or multiplied) in slices of at most
// kRowSlice rows, converted to the product type (float32, or float64 for float64 inputs). For each
// slice and each block row I of the output (kBlock rows), one GEMM forms P = X[:, I]^T X[:, I.start:]
// into a reused scratch buffer (the BLAS library threads it), and a parallel loop adds P's upper part
// into the accumulator, converting to its type on the fly. Work is about (1 + kBlock/d) / 2 of a full
// X^T X, and the float32 sums that reach the float64 accumulator never run over more than kRowSlice
// rows, which bounds their rounding error whatever the caller's batch size.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../cov_accumulate_common.h"

namespace kedit {
namespace {

constexpr int64_t kBlock = 256;      // output rows per GEMM
constexpr int64_t kRowSlice = 4096;  // rows summed in the product type before reaching the accumulator

// acc[start + i, j] += product[i, j - start] for the entries on or above the diagonal; `product` is
// a contiguous [rows, d - start] matrix.
template <typename Prod, typename Acc>
void add_upper_block(Acc* acc, const Prod* product, int64_t d, int64_t start, int64_t rows) {
  const int64_t width = d - start;
  // About `width` elements per row; aim for ~64k elements per task.
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(width, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      Acc* out = acc + (start + i) * d + start;
      const Prod* in = product + i * width;
      for (int64_t j = i; j < width; ++j) out[j] += static_cast<Acc>(in[j]);
    }
  });
}

template <typename Prod, typename Acc>
void update_upper(at::Tensor& acc, const at::Tensor& rows, at::Tensor& scratch) {
  const int64_t d = rows.size(1);
  for (int64_t start = 0; start < d; start += kBlock) {
    const int64_t len = std::min(kBlock, d - start);
    const int64_t width = d - start;
    at::Tensor product = scratch.narrow(0, 0, len * width).view({len, width});
    at::mm_out(product, rows.narrow(1, start, len).t(), rows.narrow(1, start, width));
    add_upper_block<Prod, Acc>(acc.data_ptr<Acc>(), product.const_data_ptr<Prod>(), d, start, len);
  }
}

void cov_accumulate_cpu(at::Tensor acc, const at::Tensor& x, const c10::optional<at::Tensor>& mask) {
  check_cov_accumulate_args(acc, x, mask, at::DeviceType::CPU);
  const int64_t d = x.size(-1);
  at::Tensor flat = x.reshape({-1, d});
  at::Tensor index;
  int64_t n_selected = flat.size(0);
  if (mask.has_value()) {
    index = mask->reshape({-1}).nonzero().squeeze(1);
    n_selected = index.size(0);
  }
  if (n_selected == 0 || d == 0) return;
  const auto product_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor scratch = at::empty({std::min(kBlock, d) * d}, flat.options().dtype(product_type));

  for (int64_t r0 = 0; r0 < n_selected; r0 += kRowSlice) {
    const int64_t len = std::min(kRowSlice, n_selected - r0);
    at::Tensor rows = index.defined() ? flat.index_select(0, index.narrow(0, r0, len)) : flat.narrow(0, r0, len);
    rows = rows.to(product_type).contiguous();
    if (product_type == at::kDouble) {
      if (acc.scalar_type() == at::kDouble) update_upper<double, double>(acc, rows, scratch);
      else update_upper<double, float>(acc, rows, scratch);
    } else {
      if (acc.scalar_type() == at::kDouble) update_upper<float, double>(acc, rows, scratch);
      else update_upper<float, float>(acc, rows, scratch);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(kedit, CPU, m) { m.impl("cov_accumulate_", &cov_accumulate_cpu); }

}  // namespace kedit
