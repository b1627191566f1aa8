// The one place where kedit's operator schemas are declared. Implementations register per device in
// csrc/cpu/*_cpu.cpp and csrc/cuda/*_cuda.cpp; the pure-PyTorch references live in
// kedit_core/ops/reference.py and serve as fallback and test oracle.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// An empty module so that `import kedit_core._C` loads this library and runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(kedit, m) {
  // acc[i, j] += sum over selected rows r of x[r, i] * x[r, j], for i <= j only (upper triangle,
  // diagonal included); entries below the diagonal are left untouched. x is [..., d]; mask (bool,
  // x's leading shape) selects the rows that count (padding excluded). acc is a float64 (or float32)
  // [d, d] accumulator; products are formed in float32 for float32/bf16/fp16 inputs (float64 for
  // float64 inputs) and added into acc.
  m.def("cov_accumulate_(Tensor(a!) acc, Tensor x, Tensor? mask=None) -> ()");

  // out[s, :] = sum over entries i with segments[i] == s of weights[i] * hidden[rows[i], positions[i], :],
  // added in index order. hidden is [B, T, D] (float32/16, bfloat16, float64); rows, positions, segments
  // are 1-D int64 of one length; weights (float, same length) defaults to ones. Returns
  // [num_segments, D] in float32 (float64 for float64 hidden). Used to read keys at the subjects' last
  // tokens of many prompts and average them per request and template group in one call.
  m.def("gather_segment_sum(Tensor hidden, Tensor rows, Tensor positions, Tensor segments, Tensor? weights, "
        "int num_segments) -> Tensor");
  // Lower Cholesky factors of a batch of symmetric positive definite matrices [..., n, n] (float64 or
  // float32); an error names the first matrix that is not positive definite.
  m.def("spd_factor(Tensor a) -> Tensor");
  // a^-1 b for SPD a [..., n, n] and b [..., n, m]: a fresh Cholesky factorisation and two triangular solves.
  m.def("spd_solve(Tensor a, Tensor b) -> Tensor");
  // X = Y (alpha I + K^T Y)^-1, Y = C^-1 K, from C's lower Cholesky factor [..., n, n] and K [..., n, m]:
  // (C + K K^T)^-1 K when alpha = 1 (Woodbury; MEMIT), C^-1 K (K^T C^-1 K + alpha I)^-1 otherwise (EMMET).
  m.def("spd_woodbury_solve(Tensor factor, Tensor k, float alpha=1.0) -> Tensor");
}
