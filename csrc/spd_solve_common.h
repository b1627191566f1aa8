// kedit's symmetric positive definite factor/solve ops, written once on ATen's linear algebra (LAPACK on
// the CPU, cuSOLVER/MAGMA on CUDA) and registered for each device by cpu/spd_solve_cpu.cpp and
// cuda/spd_solve_cuda.cpp. What they add over calling torch.linalg from Python: one batched call for
// all layers, argument checks naming the argument, and errors that say which matrix of a batch is not
// positive definite.
#pragma once
#include <ATen/ATen.h>

namespace kedit {

inline void check_spd_square(const at::Tensor& a, const char* op, const char* name) {
  TORCH_CHECK(a.dim() >= 2 && a.size(-1) == a.size(-2), op, ": ", name,
              " must be a square matrix or a batch of them [..., n, n]; got shape ", a.sizes());
  TORCH_CHECK(a.scalar_type() == at::kDouble || a.scalar_type() == at::kFloat, op, ": ", name,
              " must be float64 or float32; got ", a.scalar_type());
}

inline void check_spd_rhs(const at::Tensor& a, const at::Tensor& b, const char* op, const char* a_name,
                          const char* b_name) {
  const bool same_batch = b.dim() == a.dim() && b.sizes().slice(0, b.dim() - 1) == a.sizes().slice(0, a.dim() - 1);
  TORCH_CHECK(same_batch && b.scalar_type() == a.scalar_type() && b.device() == a.device(), op, ": ", b_name,
              " must be [..., n, m] with ", a_name, "'s batch shape and n, dtype and device; ", a_name, " is ",
              a.scalar_type(), " ", a.sizes(), " on ", a.device(), ", ", b_name, " is ", b.scalar_type(), " ", b.sizes(),
              " on ", b.device());
}

// Lower Cholesky factor; raises naming the first batch entry that is not positive definite.
inline at::Tensor cholesky_or_raise(const at::Tensor& a, const char* op, const char* what) {
  auto result = at::linalg_cholesky_ex(a, /*upper=*/false, /*check_errors=*/false);
  const at::Tensor& factor = std::get<0>(result);
  const at::Tensor info = std::get<1>(result).reshape({-1});
  const at::Tensor bad = info.nonzero();
  if (bad.numel() > 0) {
    const int64_t index = bad[0][0].item<int64_t>();
    const int64_t order = info[index].item<int64_t>();
    TORCH_CHECK(false, op, ": ", what, " ", index, " of the batch is not positive definite (its leading minor of order ",
                order, " is not positive)");
  }
  return factor;
}

inline at::Tensor spd_factor_impl(const at::Tensor& a) {
  check_spd_square(a, "spd_factor", "a");
  return cholesky_or_raise(a, "spd_factor", "matrix").contiguous();  // LAPACK writes column-major
}

inline at::Tensor spd_solve_impl(const at::Tensor& a, const at::Tensor& b) {
  check_spd_square(a, "spd_solve", "a");
  check_spd_rhs(a, b, "spd_solve", "a", "b");
  return at::cholesky_solve(b, cholesky_or_raise(a, "spd_solve", "matrix"), /*upper=*/false).contiguous();
}

// X = Y (alpha I + K^T Y)^-1 with Y = C^-1 K, C = L L^T. With Z = L^-1 K: Y = L^-T Z and K^T Y = Z^T Z, so
// the m x m matrix is a Gram matrix (symmetric positive definite by construction). Cost: two triangular
// solves with m right-hand sides and an m x m Cholesky solve. alpha = 1 gives (C + K K^T)^-1 K (Woodbury).
inline at::Tensor spd_woodbury_solve_impl(const at::Tensor& factor, const at::Tensor& k, double alpha) {
  check_spd_square(factor, "spd_woodbury_solve", "factor");
  check_spd_rhs(factor, k, "spd_woodbury_solve", "factor", "k");
  const at::Tensor z = at::linalg_solve_triangular(factor, k, /*upper=*/false, /*left=*/true);
  const at::Tensor y = at::linalg_solve_triangular(factor.mT(), z, /*upper=*/true, /*left=*/true);
  at::Tensor s = at::matmul(z.mT(), z);
  s.diagonal(0, -2, -1).add_(alpha);
  const at::Tensor small = cholesky_or_raise(s, "spd_woodbury_solve", "capacitance matrix (alpha*I + K^T C^-1 K)");
  return at::cholesky_solve(y.mT(), small, /*upper=*/false).mT().contiguous();
}

}  // namespace kedit
