// CUDA registrations of kedit::spd_factor, kedit::spd_solve and kedit::spd_woodbury_solve: the same ATen
// composition as on the CPU (../spd_solve_common.h); ATen's linalg routines run cuSOLVER (or MAGMA for
// batches) on the current stream. No kernel body of our own: cuSOLVER's headers are not available to
// kernel sources here, and these factorisations are exactly what it does best. Builds only with CUDA torch.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../spd_solve_common.h"

namespace kedit {
namespace {

at::Tensor spd_factor_cuda(const at::Tensor& a) {
  const c10::cuda::CUDAGuard guard(a.device());
  return spd_factor_impl(a);
}
at::Tensor spd_solve_cuda(const at::Tensor& a, const at::Tensor& b) {
  const c10::cuda::CUDAGuard guard(a.device());
  return spd_solve_impl(a, b);
}
at::Tensor spd_woodbury_solve_cuda(const at::Tensor& factor, const at::Tensor& k, double alpha) {
  const c10::cuda::CUDAGuard guard(factor.device());
  return spd_woodbury_solve_impl(factor, k, alpha);
}

}  // namespace

TORCH_LIBRARY_IMPL(kedit, CUDA, m) {
  m.impl("spd_factor", &spd_factor_cuda);
  m.impl("spd_solve", &spd_solve_cuda);
  m.impl("spd_woodbury_solve", &spd_woodbury_solve_cuda);
}

}  // namespace kedit
