// The one place where regops' operator schemas are defined. Backend files
// (cpu/*.cpp, cuda/*.cu) only add implementations with TORCH_LIBRARY_IMPL;
// Python adds fake kernels and autograd (regops/ops/*.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing regops._C loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(regops, m) {
  // Dropout. seed is a one-element int64 tensor on the input's device (or the
  // CPU) so that a seed drawn from the device generator needs no host sync;
  // mask is one bit per element (see csrc/include/regops/philox.h).
  m.def("dropout_forward(Tensor input, float p, Tensor seed, int offset, bool store_mask) -> (Tensor, Tensor)");
  m.def("dropout_forward_(Tensor(a!) input, float p, Tensor seed, int offset, bool store_mask) -> Tensor");
  m.def("dropout_backward(Tensor grad, Tensor mask, float p) -> Tensor");
  // The raw generator, for known-answer tests: counter (N, 4) and key (N, 2)
  // hold uint32 words in int64; returns the (N, 4) output words.
  m.def("philox4x32_10(Tensor counter, Tensor key) -> Tensor");
}
