// Small helpers shared by the CUDA kernels: aligned vectors for 16-byte
// loads and stores, the alignment check that selects them, the warp sum of
// the deterministic reductions, and a grid size
// that fills the device without oversubscribing it (kernels use grid-stride
// loops with int64 indices).
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "regops/cuda_runtime.cuh"
#include "regops/macros.h"

namespace regops {

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVector {
  T value[N];
};

template <int Alignment>
REGOPS_INLINE bool is_aligned(const void* pointer) {
  return reinterpret_cast<uintptr_t>(pointer) % Alignment == 0;
}

// Every vector load and store of a kernel goes through these two, so the
// simulation can check the alignment that the GPU requires (a misaligned
// vector access faults there).
template <typename Vector, typename T>
__device__ __forceinline__ Vector load_vector(const T* pointer) {
#if defined(REGOPS_CUDA_SIM)
  simt::check_vector_alignment(pointer, alignof(Vector), "load");
#endif
  return *reinterpret_cast<const Vector*>(pointer);
}

template <typename Vector, typename T>
__device__ __forceinline__ void store_vector(T* pointer, const Vector& value) {
#if defined(REGOPS_CUDA_SIM)
  simt::check_vector_alignment(pointer, alignof(Vector), "store");
#endif
  *reinterpret_cast<Vector*>(pointer) = value;
}

// Whether every pointer allows 16-byte vector accesses.
inline bool can_vectorize(std::initializer_list<const void*> pointers) {
  for (const void* pointer : pointers) {
    if (!is_aligned<16>(pointer)) return false;
  }
  return true;
}

// The sum of value over the 32 lanes of a warp by a fixed shuffle-down tree
// (the same order in every run), valid in lane 0.
template <typename T>
__device__ __forceinline__ T warp_sum(T value) {
#pragma unroll
  for (int delta = 16; delta > 0; delta /= 2) value += __shfl_down_sync(0xffffffffu, value, delta);
  return value;
}

// Blocks for a grid-stride loop of `kernel` over work_items threads' worth
// of work: as many as are resident at once on the device (the occupancy of
// this kernel at this block size, so a kernel with many registers gets fewer
// blocks per SM), or fewer when there is not that much work. More would only
// add tail effects.
template <typename... Params>
int64_t grid_size_for(void (*kernel)(Params...), int64_t work_items, int threads_per_block,
                      size_t dynamic_shared_bytes = 0) {
  const int64_t sms = cuda::device_properties().multiProcessorCount;
  const int64_t resident = std::max(1, cuda::max_active_blocks_per_sm(kernel, threads_per_block, dynamic_shared_bytes));
  const int64_t needed = (work_items + threads_per_block - 1) / threads_per_block;
  return std::max<int64_t>(1, std::min<int64_t>(needed, sms * resident));
}

}  // namespace regops
