// Small helpers shared by the CUDA kernels: aligned vectors for 16-byte
// loads and stores, and a grid size that fills the device without
// oversubscribing it (kernels use grid-stride loops with int64 indices).
#pragma once

#include <algorithm>
#include <cstdint>

#include "regops/cuda_runtime.cuh"

namespace regops {

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVector {
  T value[N];
};

template <int Alignment>
inline bool is_aligned(const void* pointer) {
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

// Enough resident blocks to saturate memory bandwidth; more only adds tail
// effects for a grid-stride loop.
inline int64_t grid_size_for(int64_t work_items, int threads_per_block, int blocks_per_sm = 8) {
  const int64_t sms = cuda::device_properties().multiProcessorCount;
  const int64_t needed = (work_items + threads_per_block - 1) / threads_per_block;
  return std::max<int64_t>(1, std::min<int64_t>(needed, sms * blocks_per_sm));
}

}  // namespace regops
