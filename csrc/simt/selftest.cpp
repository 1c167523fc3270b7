// Kernels that test the SIMT layer itself (tests/test_cuda_sim.py): each
// defective kernel carries one bug that the GPU would turn into a hang, a
// fault or a wrong answer, and the simulation must report it or give a
// result that changes with the schedule; the sound kernels pin down the
// semantics of shuffles, votes, atomics and barriers.
//
//   regops_cuda_sim::selftest(kernel, input): runs `kernel` on a float32 input
//   of n elements with blocks of 256 threads (one element per thread).
//   regops_cuda_sim::selftest_launch(grid, block, dynamic_shared_bytes):
//   launches an empty kernel, then checks the launch as the kernel files do.
#include "regops/aten.h"
#include <torch/library.h>

#include <functional>
#include <map>
#include <string>

#include "regops/cuda_utils.cuh"

namespace regops {
namespace {

constexpr int kThreads = 256;
constexpr unsigned kFullMask = 0xffffffffu;

// Per-block sums through shared memory: warp shuffles, one slot per warp,
// then thread 0 adds the slots. With_barrier=false omits the __syncthreads()
// between the slot writes and thread 0's reads.
template <bool kWithBarrier>
__global__ void block_sum_kernel(const float* x, float* out, int64_t n) {
  REGOPS_SHARED_ARRAY(float, warp_sums, [kThreads / 32]);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  float value = i < n ? x[i] : 0.0f;
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(kFullMask, value, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = value;
  if (kWithBarrier) __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
    out[blockIdx.x] = total;
  }
}

// Half of each warp shuffles with a mask that names the whole warp; the other
// half goes on to a barrier.
__global__ void partial_warp_shuffle_kernel(const float* x, float* out, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  float value = i < n ? x[i] : 0.0f;
  if (threadIdx.x % 32 < 16) value += __shfl_down_sync(kFullMask, value, 8);
  __syncthreads();
  if (i < n) out[i] = value;
}

// A barrier that the threads past the end of the input never reach.
__global__ void divergent_barrier_kernel(const float* x, float* out, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  __syncthreads();
  out[i] = x[i];
}

// Two different barriers, one per branch.
__global__ void branch_barriers_kernel(const float* x, float* out, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  if (i < n) out[i] = x[i];
}

// 16-byte loads from x + 1, which is only 4-byte aligned.
__global__ void misaligned_vector_kernel(const float* x, float* out, int64_t n) {
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 4;
  if (i + 5 > n) return;
  const auto v = load_vector<AlignedVector<float, 4>>(x + i + 1);
  store_vector(out + i, v);
}

// Each thread writes its slot and reads its neighbour's, one past the end for the last thread.
__global__ void shared_out_of_bounds_kernel(const float* x, float* out, int64_t n) {
  REGOPS_SHARED_ARRAY(float, slots, [kThreads]);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  slots[threadIdx.x] = i < n ? x[i] : 0.0f;
  __syncthreads();
  if (i < n) out[i] = slots[threadIdx.x + 1];
}

// Every thread writes the same slot, then all read it: the last writer wins.
__global__ void shared_race_kernel(const float* x, float* out, int64_t n) {
  REGOPS_SHARED_ARRAY(float, slot, [1]);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  slot[0] = i < n ? x[i] : 0.0f;
  __syncthreads();
  if (i < n) out[i] = slot[0];
}

// Warp operations with CUDA's semantics; per thread, 8 values into out[8 i ...].
__global__ void warp_ops_kernel(const float* x, float* out, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const float v = i < n ? x[i] : -1.0f;
  const int lane = threadIdx.x % 32;
  float results[8];
  results[0] = __shfl_sync(kFullMask, v, 3);
  results[1] = __shfl_up_sync(kFullMask, v, 1);
  results[2] = __shfl_down_sync(kFullMask, v, 1);
  results[3] = __shfl_xor_sync(kFullMask, v, 5);
  results[4] = __shfl_down_sync(kFullMask, v, 2, 8);
  results[5] = static_cast<float>(__ballot_sync(kFullMask, lane % 3 == 0) & 0xffffu);
  results[6] = static_cast<float>(__any_sync(kFullMask, v > 1000.0f)) + 2.0f * __all_sync(kFullMask, v >= -1.0f);
  __syncwarp();
  results[7] = lane < 8 ? __shfl_xor_sync(0xffu, v, 1, 8) : v;
  if (i < n) {
    for (int k = 0; k < 8; ++k) out[i * 8 + k] = results[k];
  }
}

// The sum of the input through atomicAdd on one global float and a shared int count.
__global__ void atomic_sum_kernel(const float* x, float* out, int64_t n) {
  REGOPS_SHARED_ARRAY(int, count, [1]);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (threadIdx.x == 0) count[0] = 0;
  __syncthreads();
  if (i < n) {
    atomicAdd(out, x[i]);
    atomicAdd(&count[0], 1);
  }
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(out + 1, static_cast<float>(count[0]));
}

__global__ void empty_kernel() {}

using Kernel = void (*)(const float*, float*, int64_t);

struct SelfTest {
  Kernel kernel;
  int64_t outputs_per_element;  // 0: one per block
  int64_t extra_outputs;
};

const std::map<std::string, SelfTest>& selftests() {
  static const std::map<std::string, SelfTest> tests = {
      {"block_sum", {block_sum_kernel<true>, 0, 0}},
      {"block_sum_missing_barrier", {block_sum_kernel<false>, 0, 0}},
      {"partial_warp_shuffle", {partial_warp_shuffle_kernel, 1, 0}},
      {"divergent_barrier", {divergent_barrier_kernel, 1, 0}},
      {"branch_barriers", {branch_barriers_kernel, 1, 0}},
      {"misaligned_vector", {misaligned_vector_kernel, 1, 0}},
      {"shared_out_of_bounds", {shared_out_of_bounds_kernel, 1, 0}},
      {"shared_race", {shared_race_kernel, 1, 0}},
      {"warp_ops", {warp_ops_kernel, 8, 0}},
      {"atomic_sum", {atomic_sum_kernel, 0, 2}},
  };
  return tests;
}

at::Tensor selftest(c10::string_view name, const at::Tensor& input) {
  const auto& tests = selftests();
  const auto found = tests.find(std::string(name));
  TORCH_CHECK(found != tests.end(), "regops_cuda_sim::selftest: no kernel named ", name);
  TORCH_CHECK(input.is_cpu() && input.scalar_type() == at::kFloat && input.dim() == 1 && input.numel() > 0,
              "regops_cuda_sim::selftest: input must be a non-empty 1-D float32 CPU tensor");
  const at::Tensor x = input.contiguous();
  const int64_t n = x.numel();
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  const SelfTest& test = found->second;
  const int64_t outputs = test.extra_outputs + (test.outputs_per_element == 0 ? blocks : n * test.outputs_per_element);
  at::Tensor out = at::zeros({outputs}, x.options());
  cuda::launch(test.kernel, blocks, kThreads, 0, cuda::current_stream(),
               x.const_data_ptr<float>(), out.mutable_data_ptr<float>(), n);
  REGOPS_KERNEL_LAUNCH_CHECK();
  return out;
}

void selftest_launch(at::IntArrayRef grid, at::IntArrayRef block, int64_t dynamic_shared_bytes) {
  TORCH_CHECK(grid.size() == 3 && block.size() == 3, "regops_cuda_sim::selftest_launch: grid and block have 3 sizes");
  auto dimension = [](at::IntArrayRef sizes) {
    for (int64_t size : sizes) TORCH_CHECK(size >= 0 && size <= UINT32_MAX, "selftest_launch: size out of range: ", size);
    return dim3(static_cast<unsigned>(sizes[0]), static_cast<unsigned>(sizes[1]), static_cast<unsigned>(sizes[2]));
  };
  cuda::launch(empty_kernel, dimension(grid), dimension(block), static_cast<size_t>(dynamic_shared_bytes),
               cuda::current_stream());
  REGOPS_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace regops

TORCH_LIBRARY_FRAGMENT(regops_cuda_sim, m) {
  m.def("selftest(str kernel, Tensor input) -> Tensor");
  m.def("selftest_launch(int[] grid, int[] block, int dynamic_shared_bytes) -> ()", &regops::selftest_launch);
}

REGOPS_CUDA_LIBRARY_IMPL(m) { m.impl("selftest", &regops::selftest); }
