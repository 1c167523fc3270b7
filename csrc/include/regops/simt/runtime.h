// The SIMT execution layer: what a CUDA kernel file sees of the CUDA language
// and runtime, implemented on the CPU, so that the kernels of csrc/cuda/ run
// unchanged on CPU tensors (the regops._C_cuda_sim extension).
//
// A launch runs its blocks one after another in a seeded random order (in
// parallel on ATen's thread pool, one block per OS thread at a time). The
// threads of a block are cooperative fibers: a fiber runs until it reaches a
// barrier or a warp collective, or exits, and at every release the fibers
// resume in a random order drawn from the schedule seed. Barriers, warp
// collectives, shared memory, vector accesses and launch configurations are
// checked: a defect raises c10::Error (RuntimeError in Python) naming the
// block, the thread and the source line, where the GPU would hang, fault or
// silently compute garbage. src: csrc/simt/runtime.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <math.h>  // the float overloads of sqrt & co. in the global namespace, as CUDA has them

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// ---- the language: qualifiers and built-in variables ---------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// __shared__ is left undefined on purpose: shared arrays are declared with
// REGOPS_SHARED_ARRAY (regops/cuda_runtime.cuh), whose accesses are checked.

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

// Set by the scheduler for the fiber (thread index) and the block it runs;
// a fiber never leaves the OS thread that runs its block.
extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;
constexpr int warpSize = 32;

// ---- math with CUDA's names -------------------------------------------------------------

#define REGOPS_SIMT_MIN_MAX(T)                         \
  inline T min(T a, T b) { return b < a ? b : a; }     \
  inline T max(T a, T b) { return a < b ? b : a; }
REGOPS_SIMT_MIN_MAX(int)
REGOPS_SIMT_MIN_MAX(unsigned)
REGOPS_SIMT_MIN_MAX(long)
REGOPS_SIMT_MIN_MAX(unsigned long)
REGOPS_SIMT_MIN_MAX(long long)
REGOPS_SIMT_MIN_MAX(unsigned long long)
REGOPS_SIMT_MIN_MAX(float)
REGOPS_SIMT_MIN_MAX(double)
#undef REGOPS_SIMT_MIN_MAX

inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / ::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
template <typename T>
inline T __ldg(const T* pointer) { return *pointer; }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---- atomics: real atomics (blocks may run in parallel), relaxed as on the GPU -----------

// atomicMax and atomicMin: stores value while replaces(old, value) holds for
// the value in memory; returns the value it replaced (or kept).
template <typename T, typename Replaces>
inline T atomic_replace_while(T* address, T value, Replaces replaces) {
  T old = __atomic_load_n(address, __ATOMIC_RELAXED);
  while (replaces(old, value) &&
         !__atomic_compare_exchange_n(address, &old, value, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}

#define REGOPS_SIMT_INTEGER_ATOMICS(T)                                                                 \
  inline T atomicAdd(T* address, T value) { return __atomic_fetch_add(address, value, __ATOMIC_RELAXED); } \
  inline T atomicSub(T* address, T value) { return __atomic_fetch_sub(address, value, __ATOMIC_RELAXED); } \
  inline T atomicAnd(T* address, T value) { return __atomic_fetch_and(address, value, __ATOMIC_RELAXED); } \
  inline T atomicOr(T* address, T value) { return __atomic_fetch_or(address, value, __ATOMIC_RELAXED); }   \
  inline T atomicXor(T* address, T value) { return __atomic_fetch_xor(address, value, __ATOMIC_RELAXED); } \
  inline T atomicExch(T* address, T value) { return __atomic_exchange_n(address, value, __ATOMIC_RELAXED); } \
  inline T atomicCAS(T* address, T compare, T value) {                                                 \
    __atomic_compare_exchange_n(address, &compare, value, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);  \
    return compare;                                                                                    \
  }                                                                                                    \
  inline T atomicMax(T* address, T value) {                                                            \
    return atomic_replace_while(address, value, [](T old, T v) { return old < v; });                  \
  }                                                                                                    \
  inline T atomicMin(T* address, T value) {                                                            \
    return atomic_replace_while(address, value, [](T old, T v) { return v < old; });                  \
  }
REGOPS_SIMT_INTEGER_ATOMICS(int)
REGOPS_SIMT_INTEGER_ATOMICS(unsigned)
REGOPS_SIMT_INTEGER_ATOMICS(unsigned long long)
#undef REGOPS_SIMT_INTEGER_ATOMICS

namespace regops {
namespace simt {

// A floating-point read-modify-write as a compare-and-swap loop on its bits.
template <typename T, typename Bits, typename F>
inline T atomic_update(T* address, F update) {
  static_assert(sizeof(T) == sizeof(Bits), "atomic_update: T and Bits differ in size");
  Bits* bits = reinterpret_cast<Bits*>(address);
  Bits old_bits = __atomic_load_n(bits, __ATOMIC_RELAXED);
  for (;;) {
    T old_value;
    std::memcpy(&old_value, &old_bits, sizeof(T));
    const T new_value = update(old_value);
    Bits new_bits;
    std::memcpy(&new_bits, &new_value, sizeof(T));
    if (__atomic_compare_exchange_n(bits, &old_bits, new_bits, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
      return old_value;
    }
  }
}

}  // namespace simt
}  // namespace regops

inline float atomicAdd(float* address, float value) {
  return regops::simt::atomic_update<float, uint32_t>(address, [=](float old) { return old + value; });
}
inline double atomicAdd(double* address, double value) {
  return regops::simt::atomic_update<double, uint64_t>(address, [=](double old) { return old + value; });
}
inline float atomicExch(float* address, float value) {
  return regops::simt::atomic_update<float, uint32_t>(address, [=](float) { return value; });
}

// ---- the execution layer ------------------------------------------------------------------

namespace regops {
namespace simt {

enum class Collective : int { shfl, shfl_up, shfl_down, shfl_xor, ballot, any, all, syncwarp };

// Runtime entry points (csrc/simt/runtime.cpp).
void sync_threads(const char* file, int line);
uint64_t warp_collective(Collective kind, unsigned mask, uint64_t value, int argument, int width, const char* file,
                         int line);
unsigned active_mask();
[[noreturn]] void fault(const std::string& message);
void check_vector_alignment(const void* pointer, size_t alignment, const char* access);
// Shared memory of the current block: the first thread to reach a declaration
// allocates it (filled with 0xff bytes, so that a read before any write gives
// NaNs), every other thread of the block gets the same bytes.
void* shared_allocation(const void* site, size_t bytes, size_t alignment, const char* name);
void* dynamic_shared_memory(size_t* bytes);

using BlockEntry = void (*)(const void* payload);
void launch_kernel(dim3 grid, dim3 block, size_t dynamic_shared_bytes, BlockEntry entry, const void* payload);
void check_last_launch();

// The schedule seed (REGOPS_CUDA_SIM_SEED at load time): it and the launch's
// number since the last reset draw every block order and fiber order.
void set_schedule_seed(uint64_t seed);

// The configurations launched since the last call, for tests of grid sizing.
struct LaunchRecord {
  dim3 grid, block;
  size_t dynamic_shared_bytes;
};
std::vector<LaunchRecord> take_launch_log();

// A shared array of type A (T[N], T[N][M], ...) whose every index is checked.
template <typename A>
class SharedArray {
 public:
  using Element = std::remove_extent_t<A>;
  static constexpr size_t kExtent = std::extent_v<A>;
  SharedArray(Element* data, const char* name) : data_(data), name_(name) {}

  template <typename Index>
  decltype(auto) operator[](Index index) const {
    const long long i = static_cast<long long>(index);
    if (i < 0 || i >= static_cast<long long>(kExtent)) out_of_bounds(i);
    if constexpr (std::is_array_v<Element>) {
      return SharedArray<Element>(data_[i], name_);
    } else {
      return static_cast<Element&>(data_[i]);
    }
  }

 private:
  [[noreturn]] void out_of_bounds(long long i) const {
    fault("shared memory index " + std::to_string(i) + " out of bounds [0, " + std::to_string(kExtent) + ") of " +
          name_);
  }
  Element* data_;
  const char* name_;
};

// `extern __shared__ T name[]`: the launch's dynamic shared memory, checked
// against the size the launch asked for.
template <typename T>
class DynamicShared {
 public:
  explicit DynamicShared(const char* name) : name_(name) {
    size_t bytes = 0;
    data_ = static_cast<T*>(dynamic_shared_memory(&bytes));
    size_ = static_cast<long long>(bytes / sizeof(T));
  }
  template <typename Index>
  T& operator[](Index index) const {
    const long long i = static_cast<long long>(index);
    if (i < 0 || i >= size_) {
      fault("dynamic shared memory index " + std::to_string(i) + " out of bounds [0, " + std::to_string(size_) +
            ") of " + name_);
    }
    return data_[i];
  }

 private:
  T* data_;
  long long size_;
  const char* name_;
};

template <typename A>
SharedArray<A> shared_array(const void* site, const char* name) {
  static_assert(std::is_trivially_destructible_v<std::remove_all_extents_t<A>>,
                "shared memory holds trivially destructible types only");
  using Element = typename SharedArray<A>::Element;
  return SharedArray<A>(static_cast<Element*>(shared_allocation(site, sizeof(A), alignof(A), name)), name);
}

template <typename T>
uint64_t to_bits(T value) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>,
                "warp shuffles move values of at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// ---- the CUDA runtime as regops/cuda_runtime.cuh names it ----------------------------

struct DeviceProperties {
  char name[64];
  int multiProcessorCount;
  int maxThreadsPerMultiProcessor;
  int maxBlocksPerMultiProcessor;
  int warpSize;
  int maxThreadsPerBlock;
  int maxThreadsDim[3];
  int maxGridSize[3];
  size_t sharedMemPerBlock;
  size_t sharedMemPerBlockOptin;
  size_t sharedMemPerMultiprocessor;
  size_t reservedSharedMemPerBlock;
  int regsPerBlock;
  int major;
  int minor;
};

// An H100 SXM (sm_90): what grid sizing, chunking and tails see.
const DeviceProperties& h100_properties();

}  // namespace simt

namespace cuda {

struct StreamHandle;
using Stream = StreamHandle*;  // the simulation has one stream: launches run when called

// The simulated device is the CPU: its memory is host memory.
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};

inline Stream current_stream() { return nullptr; }

inline const simt::DeviceProperties& device_properties() { return simt::h100_properties(); }

inline bool on_device(const at::Tensor& tensor) { return tensor.is_cpu(); }

int occupancy_blocks_per_sm(int threads_per_block, size_t dynamic_shared_bytes);

// The same model as the launch limits: threads and shared memory per SM.
// Registers and static shared memory are not modelled (the host compiler
// allocates neither), so this is an upper bound of the GPU's answer.
template <typename... Params>
int max_active_blocks_per_sm(void (*)(Params...), int threads_per_block, size_t dynamic_shared_bytes = 0) {
  return occupancy_blocks_per_sm(threads_per_block, dynamic_shared_bytes);
}

// The launch: the arguments convert to the kernel's parameter types once,
// as the GPU copies kernel parameters, and every thread gets its own copy.
template <typename... Params, typename... Args>
inline void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_shared_bytes, Stream,
                   Args&&... args) {
  using Kernel = void (*)(Params...);
  using Arguments = std::tuple<std::decay_t<Params>...>;
  struct Payload {
    Kernel kernel;
    Arguments arguments;
  };
  const Payload payload{kernel, Arguments(std::forward<Args>(args)...)};
  simt::launch_kernel(grid, block, dynamic_shared_bytes, [](const void* opaque) {
    const Payload& p = *static_cast<const Payload*>(opaque);
    std::apply(p.kernel, p.arguments);
  }, &payload);
}

}  // namespace cuda
}  // namespace regops

// ---- barriers and warp collectives ------------------------------------------------------
// The source position (default arguments) goes into the error messages.

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  regops::simt::sync_threads(file, line);
}

inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  regops::simt::warp_collective(regops::simt::Collective::syncwarp, mask, 0, 0, warpSize, file, line);
}

inline unsigned __activemask() { return regops::simt::active_mask(); }

#define REGOPS_SIMT_SHUFFLE(function, kind)                                                                  \
  template <typename T>                                                                                       \
  inline T function(unsigned mask, T var, int argument, int width = warpSize, const char* file = __builtin_FILE(), \
                    int line = __builtin_LINE()) {                                                            \
    return regops::simt::from_bits<T>(regops::simt::warp_collective(                                          \
        regops::simt::Collective::kind, mask, regops::simt::to_bits(var), argument, width, file, line));       \
  }
REGOPS_SIMT_SHUFFLE(__shfl_sync, shfl)
REGOPS_SIMT_SHUFFLE(__shfl_up_sync, shfl_up)
REGOPS_SIMT_SHUFFLE(__shfl_down_sync, shfl_down)
REGOPS_SIMT_SHUFFLE(__shfl_xor_sync, shfl_xor)
#undef REGOPS_SIMT_SHUFFLE

inline unsigned __ballot_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return static_cast<unsigned>(regops::simt::warp_collective(regops::simt::Collective::ballot, mask, predicate != 0,
                                                             0, warpSize, file, line));
}
inline int __any_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return static_cast<int>(
      regops::simt::warp_collective(regops::simt::Collective::any, mask, predicate != 0, 0, warpSize, file, line));
}
inline int __all_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return static_cast<int>(
      regops::simt::warp_collective(regops::simt::Collective::all, mask, predicate != 0, 0, warpSize, file, line));
}

#define REGOPS_KERNEL_LAUNCH_CHECK() ::regops::simt::check_last_launch()
// The simulated kernels take CPU tensors, in their own operator namespace.
#define REGOPS_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(regops_cuda_sim, CPU, m)
