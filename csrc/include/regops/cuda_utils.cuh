// Small helpers shared by the CUDA kernels: aligned vectors for 16-byte
// loads and stores, and a grid size that fills the device without
// oversubscribing it (kernels use grid-stride loops with int64 indices).
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>

namespace regops {

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVector {
  T value[N];
};

template <int Alignment>
inline bool is_aligned(const void* pointer) {
  return reinterpret_cast<uintptr_t>(pointer) % Alignment == 0;
}

// Enough resident blocks to saturate memory bandwidth; more only adds tail
// effects for a grid-stride loop.
inline int64_t grid_size_for(int64_t work_items, int threads_per_block, int blocks_per_sm = 8) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t needed = (work_items + threads_per_block - 1) / threads_per_block;
  return std::max<int64_t>(1, std::min<int64_t>(needed, sms * blocks_per_sm));
}

}  // namespace regops
