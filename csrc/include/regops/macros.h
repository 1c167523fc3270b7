// Qualifiers shared by host and device code, so one definition of the math
// serves the CPU kernels (g++) and the CUDA kernels (nvcc).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define REGOPS_HOST_DEVICE __host__ __device__
#define REGOPS_INLINE __host__ __device__ __forceinline__
#else
#define REGOPS_HOST_DEVICE
#define REGOPS_INLINE inline
#endif
