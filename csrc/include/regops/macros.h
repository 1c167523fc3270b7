// Qualifiers shared by host and device code, so one definition of the math
// serves the CPU kernels (g++) and the CUDA kernels (nvcc).
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define REGOPS_INLINE __host__ __device__ __forceinline__
#else
#define REGOPS_INLINE inline
#endif

// The C++ CPU kernels (csrc/cpu/) only. REGOPS_CPU_CLONES compiles a hot
// loop for x86-64-v4 (AVX-512 with BW/VL: narrowing float32 to bfloat16 bits
// needs its 16-bit element instructions) and x86-64-v3 (AVX2, FMA) as well
// as the baseline, and the loader picks the widest the processor has. The
// loops a clone calls must be inlined into it (REGOPS_ALWAYS_INLINE) to be
// compiled for its target.
#define REGOPS_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define REGOPS_ALWAYS_INLINE inline __attribute__((always_inline))
