// regops._C_cuda_sim: the CUDA kernels of csrc/cuda/ run by the SIMT layer on
// CPU tensors. Its operators live in their own namespace, regops_cuda_sim,
// with regops' own schemas (regops/schemas.h), plus the simulation's
// controls: the schedule seed and the log of launch configurations.
#include <Python.h>
#include "regops/aten.h"
#include <torch/library.h>

#include "regops/schemas.h"
#include "regops/simt/runtime.h"

extern "C" {
// Importing regops._C_cuda_sim loads this library, which runs the registrations below.
PyObject* PyInit__C_cuda_sim(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda_sim", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace regops {
namespace simt {
namespace {

void set_schedule_seed_op(int64_t seed) { set_schedule_seed(static_cast<uint64_t>(seed)); }

// One row per launch since the last call: grid x, y, z, block x, y, z and
// the dynamic shared memory in bytes.
at::Tensor take_launches_op() {
  const std::vector<LaunchRecord> records = take_launch_log();
  at::Tensor table = at::empty({static_cast<int64_t>(records.size()), 7}, at::kLong);
  auto rows = table.accessor<int64_t, 2>();
  for (size_t i = 0; i < records.size(); ++i) {
    const LaunchRecord& r = records[i];
    const int64_t values[7] = {r.grid.x, r.grid.y, r.grid.z, r.block.x, r.block.y, r.block.z,
                               static_cast<int64_t>(r.dynamic_shared_bytes)};
    for (int j = 0; j < 7; ++j) rows[i][j] = values[j];
  }
  return table;
}

}  // namespace
}  // namespace simt
}  // namespace regops

TORCH_LIBRARY(regops_cuda_sim, m) {
  regops::define_schemas(m);
  m.def("set_schedule_seed(int seed) -> ()", &regops::simt::set_schedule_seed_op);
  m.def("take_launches() -> Tensor", &regops::simt::take_launches_op);
}
