// CPU registrations of kedit::spd_factor, kedit::spd_solve and kedit::spd_woodbury_solve (LAPACK through
// ATen; see ../spd_solve_common.h).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../spd_solve_common.h"

namespace kedit {
namespace {

at::Tensor spd_factor_cpu(const at::Tensor& a) { return spd_factor_impl(a); }
at::Tensor spd_solve_cpu(const at::Tensor& a, const at::Tensor& b) { return spd_solve_impl(a, b); }
at::Tensor spd_woodbury_solve_cpu(const at::Tensor& factor, const at::Tensor& k, double alpha) {
  return spd_woodbury_solve_impl(factor, k, alpha);
}

}  // namespace

TORCH_LIBRARY_IMPL(kedit, CPU, m) {
  m.impl("spd_factor", &spd_factor_cpu);
  m.impl("spd_solve", &spd_solve_cpu);
  m.impl("spd_woodbury_solve", &spd_woodbury_solve_cpu);
}

}  // namespace kedit
