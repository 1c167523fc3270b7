// The regops operator library: its schemas (regops/schemas.h, shared with the
// CUDA simulation's library). Backend files (cpu/*.cpp, cuda/*.cu) only add
// implementations with TORCH_LIBRARY_IMPL; Python adds fake kernels and
// autograd (regops/ops/*.py).
#include <Python.h>
#include <torch/library.h>

#include "regops/schemas.h"

extern "C" {
// Importing regops._C loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(regops, m) { regops::define_schemas(m); }
