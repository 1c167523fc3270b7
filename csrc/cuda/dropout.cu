// Dropout on CUDA. One thread handles one mask byte per loop step: eight
// consecutive elements, two Philox calls, one byte store (a warp writes 32
// consecutive bytes, so the mask needs neither atomics nor a ballot). Elements
// move as 16-byte vectors when both pointers are 16-byte aligned (one vector
// for 16-bit types, two for float32, four for float64); the tail and
// unaligned views go element by element, all eight loads issued before the
// first store so that they are in flight together.
// Traffic per element: read x, write y, plus 1/8 byte of mask.
#include "regops/aten.h"
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "regops/cuda_utils.cuh"
#include "regops/dropout_host.h"

namespace regops {
namespace {

constexpr int kThreads = 256;
constexpr int kElementsPerByte = 8;

// The seed lives in device memory (drawn there by torch's CUDA generator
// without a host sync) or is passed by value when it came from the host.
struct SeedArg {
  const int64_t* device_pointer;
  uint64_t value;
  __device__ __forceinline__ uint64_t get() const {
    return device_pointer != nullptr ? static_cast<uint64_t>(*device_pointer) : value;
  }
};

// Writes out[first + e] = in[first + e] * (bit e of bits ? scale : 0) for the
// (up to) eight elements of one mask byte. in and out may be the same
// memory (in place): every element is read before any is written.
template <typename scalar_t>
__device__ __forceinline__ void apply_mask_byte(const scalar_t* in, scalar_t* out, int64_t first, int64_t numel,
                                                uint32_t bits, at::opmath_type<scalar_t> scale, bool vectorized) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kVectorElements = 16 / sizeof(scalar_t);
  constexpr int kVectors = kElementsPerByte / kVectorElements;
  static_assert(kVectors * kVectorElements == kElementsPerByte, "a mask byte's elements are whole 16-byte vectors");
  using Vec = AlignedVector<scalar_t, kVectorElements>;
  if (vectorized && first + kElementsPerByte <= numel) {
    Vec values[kVectors];
#pragma unroll
    for (int v = 0; v < kVectors; ++v) values[v] = load_vector<Vec>(in + first + v * kVectorElements);
#pragma unroll
    for (int v = 0; v < kVectors; ++v) {
#pragma unroll
      for (int e = 0; e < kVectorElements; ++e) {
        const uint32_t keep = (bits >> (v * kVectorElements + e)) & 1u;
        values[v].value[e] = static_cast<scalar_t>(dropout_apply(static_cast<acc_t>(values[v].value[e]), keep, scale));
      }
    }
#pragma unroll
    for (int v = 0; v < kVectors; ++v) store_vector(out + first + v * kVectorElements, values[v]);
    return;
  }
  const int64_t count = min(static_cast<int64_t>(kElementsPerByte), numel - first);
  acc_t values[kElementsPerByte];
#pragma unroll
  for (int e = 0; e < kElementsPerByte; ++e) {
    if (e < count) values[e] = static_cast<acc_t>(in[first + e]);
  }
#pragma unroll
  for (int e = 0; e < kElementsPerByte; ++e) {
    if (e < count) out[first + e] = static_cast<scalar_t>(dropout_apply(values[e], (bits >> e) & 1u, scale));
  }
}

template <typename scalar_t>
__global__ void dropout_forward_kernel(const scalar_t* input, scalar_t* output,  // may alias (in place)
                                       uint8_t* __restrict__ mask, int64_t numel, int64_t mask_bytes,
                                       SeedArg seed_arg, uint64_t offset, uint64_t threshold,
                                       at::opmath_type<scalar_t> scale, bool vectorized) {
  const uint64_t seed = seed_arg.get();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t byte = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; byte < mask_bytes;
       byte += stride) {
    const int64_t first = byte * kElementsPerByte;
    const uint32_t bits = first < numel ? dropout_keep_byte(seed, offset, byte, numel, threshold) : 0u;
    if (mask != nullptr) mask[byte] = static_cast<uint8_t>(bits);  // padding bytes get zero
    if (first < numel) apply_mask_byte(input, output, first, numel, bits, scale, vectorized);
  }
}

template <typename scalar_t>
__global__ void dropout_backward_kernel(const scalar_t* __restrict__ grad, const uint8_t* __restrict__ mask,
                                        scalar_t* __restrict__ grad_input, int64_t numel,
                                        at::opmath_type<scalar_t> scale, bool vectorized) {
  const int64_t element_bytes = (numel + kElementsPerByte - 1) / kElementsPerByte;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t byte = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; byte < element_bytes;
       byte += stride) {
    apply_mask_byte(grad, grad_input, byte * kElementsPerByte, numel, mask[byte], scale, vectorized);
  }
}

__global__ void philox_kernel(const int64_t* counter, const int64_t* key, int64_t* out, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  Philox4 ctr{};
  for (int w = 0; w < 4; ++w) ctr.x[w] = static_cast<uint32_t>(counter[4 * i + w]);
  const Philox4 r = philox4x32_10(ctr, static_cast<uint32_t>(key[2 * i]), static_cast<uint32_t>(key[2 * i + 1]));
  for (int w = 0; w < 4; ++w) out[4 * i + w] = r.x[w];
}

SeedArg make_seed_arg(const at::Tensor& seed) {
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong,
              "regops dropout: seed must be a one-element int64 tensor");
  if (cuda::on_device(seed)) return SeedArg{seed.const_data_ptr<int64_t>(), 0};
  return SeedArg{nullptr, read_seed(seed)};
}

at::Tensor run_forward(const at::Tensor& input, at::Tensor& output, double p, const at::Tensor& seed,
                       int64_t offset, bool store_mask) {
  const int64_t numel = input.numel();
  const int64_t mask_bytes = dropout_mask_bytes(numel);
  at::Tensor mask = at::empty({store_mask ? mask_bytes : 0}, input.options().dtype(at::kByte));
  if (numel == 0) return mask;
  TORCH_CHECK(!cuda::on_device(seed) || seed.device() == input.device(), "regops dropout: seed is on ", seed.device(),
              " but input is on ", input.device());
  const SeedArg seed_arg = make_seed_arg(seed);
  const auto stream = cuda::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "regops_dropout_forward_cuda", [&] {
    const scalar_t* in = input.const_data_ptr<scalar_t>();
    scalar_t* out = output.mutable_data_ptr<scalar_t>();
    const auto kernel = dropout_forward_kernel<scalar_t>;
    cuda::launch(kernel, grid_size_for(kernel, mask_bytes, kThreads), kThreads, 0, stream,
        in, out, store_mask ? mask.mutable_data_ptr<uint8_t>() : nullptr, numel, mask_bytes, seed_arg,
        static_cast<uint64_t>(offset), dropout_threshold(p),
        static_cast<at::opmath_type<scalar_t>>(dropout_scale(p)), can_vectorize({in, out}));
    REGOPS_KERNEL_LAUNCH_CHECK();
  });
  return mask;
}

std::tuple<at::Tensor, at::Tensor> dropout_forward_cuda(const at::Tensor& input, double p, const at::Tensor& seed,
                                                        int64_t offset, bool store_mask) {
  const cuda::DeviceGuard guard(input.device());
  return dropout_forward_out_of_place(input, p, seed, offset, store_mask, run_forward);
}

at::Tensor dropout_forward_inplace_cuda(at::Tensor& input, double p, const at::Tensor& seed, int64_t offset,
                                        bool store_mask) {
  const cuda::DeviceGuard guard(input.device());
  return dropout_forward_in_place(input, p, seed, offset, store_mask, run_forward);
}

at::Tensor dropout_backward_cuda(const at::Tensor& grad, const at::Tensor& mask, double p) {
  check_dropout_input(grad, "grad");
  check_dropout_p(p);
  check_dropout_mask(mask, grad);
  const cuda::DeviceGuard guard(grad.device());
  const at::Tensor work = dropout_work_tensor(grad);  // the mask bits follow its memory order
  at::Tensor grad_input = dropout_output_like(work);
  const int64_t numel = grad.numel();
  if (numel == 0) return grad_input;
  const at::Tensor mask_contiguous = mask.contiguous();
  const auto stream = cuda::current_stream();
  const int64_t mask_bytes = (numel + kElementsPerByte - 1) / kElementsPerByte;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "regops_dropout_backward_cuda", [&] {
    const scalar_t* in = work.const_data_ptr<scalar_t>();
    scalar_t* out = grad_input.mutable_data_ptr<scalar_t>();
    const auto kernel = dropout_backward_kernel<scalar_t>;
    cuda::launch(kernel, grid_size_for(kernel, mask_bytes, kThreads), kThreads, 0, stream,
        in, mask_contiguous.const_data_ptr<uint8_t>(), out, numel,
        static_cast<at::opmath_type<scalar_t>>(dropout_scale(p)), can_vectorize({in, out}));
    REGOPS_KERNEL_LAUNCH_CHECK();
  });
  return grad_input;
}

at::Tensor philox_cuda(const at::Tensor& counter, const at::Tensor& key) {
  check_philox_args(counter, key);
  const cuda::DeviceGuard guard(counter.device());
  const at::Tensor c = counter.contiguous(), k = key.contiguous();
  at::Tensor out = at::empty_like(c);
  const int64_t n = c.size(0);
  if (n == 0) return out;
  cuda::launch(philox_kernel, (n + kThreads - 1) / kThreads, kThreads, 0, cuda::current_stream(),
      c.const_data_ptr<int64_t>(), k.const_data_ptr<int64_t>(), out.mutable_data_ptr<int64_t>(), n);
  REGOPS_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

REGOPS_CUDA_LIBRARY_IMPL(m) {
  m.impl("dropout_forward", &dropout_forward_cuda);
  m.impl("dropout_forward_", &dropout_forward_inplace_cuda);
  m.impl("dropout_backward", &dropout_backward_cuda);
  m.impl("philox4x32_10", &philox_cuda);
}

}  // namespace regops
