// The CUDA runtime as regops' kernel files see it: the current stream, the
// device's properties, a device guard, the occupancy query, the kernel launch
// and its error check, and where the CUDA implementations register.
//
// With nvcc these are ATen's and the CUDA runtime's own (the launch is the
// <<<...>>> of the same kernel, so the GPU build is what it would be without
// this header). Under REGOPS_CUDA_SIM the same names come from the SIMT
// execution layer (regops/simt/), which runs the same kernel source on the CPU
// for CPU tensors: the kernel files are written once, against this header.
#pragma once

#if defined(REGOPS_CUDA_SIM)

#include "regops/simt/runtime.h"

// A block's shared array, e.g. REGOPS_SHARED_ARRAY(float, sums, [8][32]): the
// simulation's arrays check every index (the static tag names the declaration,
// one array per block as a __shared__ variable is).
#define REGOPS_SHARED_ARRAY(Type, name, ...)  \
  static char name##_declaration;             \
  const auto name = ::regops::simt::shared_array<Type __VA_ARGS__>(&name##_declaration, #name)
// extern __shared__ Type name[]: the launch's dynamic shared memory.
#define REGOPS_DYNAMIC_SHARED(Type, name) const ::regops::simt::DynamicShared<Type> name(#name)

#else

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <utility>

namespace regops {
namespace cuda {

using Stream = cudaStream_t;
using DeviceGuard = c10::cuda::CUDAGuard;

inline Stream current_stream() { return at::cuda::getCurrentCUDAStream(); }

inline const cudaDeviceProp& device_properties() { return *at::cuda::getCurrentDeviceProperties(); }

// Whether a tensor lives in this backend's device memory.
inline bool on_device(const at::Tensor& tensor) { return tensor.is_cuda(); }

// Blocks of `kernel` that fit on one SM at once with this block size and
// dynamic shared memory (registers and static shared memory included).
template <typename... Params>
int max_active_blocks_per_sm(void (*kernel)(Params...), int threads_per_block, size_t dynamic_shared_bytes = 0) {
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &blocks, reinterpret_cast<const void*>(kernel), threads_per_block, dynamic_shared_bytes));
  return blocks;
}

// kernel<<<grid, block, dynamic_shared_bytes, stream>>>(args...).
template <typename... Params, typename... Args>
inline void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_shared_bytes, Stream stream,
                   Args&&... args) {
  kernel<<<grid, block, dynamic_shared_bytes, stream>>>(std::forward<Args>(args)...);
}

}  // namespace cuda
}  // namespace regops

#define REGOPS_SHARED_ARRAY(Type, name, ...) __shared__ Type name __VA_ARGS__
#define REGOPS_DYNAMIC_SHARED(Type, name) extern __shared__ Type name[]
#define REGOPS_KERNEL_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
// TORCH_LIBRARY_IMPL block of a kernel file's CUDA implementations.
#define REGOPS_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(regops, CUDA, m)

#endif
