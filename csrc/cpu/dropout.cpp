// Dropout on the CPU. Work is split by mask byte (eight elements, two Philox
// calls), and every byte's bits depend only on (seed, offset, byte index), so
// the result is the same for any number of threads. at::parallel_for runs on
// ATen's OpenMP thread pool (and honours torch.set_num_threads).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "regops/dropout.h"
#include "regops/philox.h"

namespace regops {
namespace {

// Mask bytes per parallel task: 4096 elements, enough to amortize the fork.
constexpr int64_t kBytesPerTask = 512;

template <typename scalar_t>
void dropout_forward_kernel(const scalar_t* input, scalar_t* output, uint8_t* mask, int64_t numel,
                            uint64_t seed, uint64_t offset, uint64_t threshold, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t acc_scale = static_cast<acc_t>(scale);
  const int64_t element_bytes = (numel + 7) / 8;
  at::parallel_for(0, element_bytes, kBytesPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t byte = begin; byte < end; ++byte) {
      const uint32_t bits = dropout_keep_byte(seed, offset, byte, numel, threshold);
      if (mask != nullptr) mask[byte] = static_cast<uint8_t>(bits);
      const int64_t first = byte * 8;
      const int count = static_cast<int>(std::min<int64_t>(8, numel - first));
      for (int e = 0; e < count; ++e) {
        const acc_t value = static_cast<acc_t>(input[first + e]);
        output[first + e] = static_cast<scalar_t>(dropout_apply(value, (bits >> e) & 1u, acc_scale));
      }
    }
  });
}

template <typename scalar_t>
void dropout_backward_kernel(const scalar_t* grad, const uint8_t* mask, scalar_t* grad_input, int64_t numel,
                             double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t acc_scale = static_cast<acc_t>(scale);
  const int64_t element_bytes = (numel + 7) / 8;
  at::parallel_for(0, element_bytes, kBytesPerTask * 4, [&](int64_t begin, int64_t end) {
    for (int64_t byte = begin; byte < end; ++byte) {
      const uint32_t bits = mask[byte];
      const int64_t first = byte * 8;
      const int count = static_cast<int>(std::min<int64_t>(8, numel - first));
      for (int e = 0; e < count; ++e) {
        const acc_t value = static_cast<acc_t>(grad[first + e]);
        grad_input[first + e] = static_cast<scalar_t>(dropout_apply(value, (bits >> e) & 1u, acc_scale));
      }
    }
  });
}

// Writes dropout(input) into output (both contiguous, possibly the same).
at::Tensor run_forward(const at::Tensor& input, at::Tensor& output, double p, const at::Tensor& seed,
                       int64_t offset, bool store_mask) {
  const int64_t numel = input.numel();
  at::Tensor mask = at::empty({store_mask ? dropout_mask_bytes(numel) : 0}, input.options().dtype(at::kByte));
  if (store_mask) mask.zero_();  // padding bytes; the kernel overwrites the rest
  if (numel == 0) return mask;
  const uint64_t seed_value = read_seed(seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "regops_dropout_forward_cpu", [&] {
    dropout_forward_kernel<scalar_t>(input.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(),
                                     store_mask ? mask.mutable_data_ptr<uint8_t>() : nullptr, numel, seed_value,
                                     static_cast<uint64_t>(offset), dropout_threshold(p), dropout_scale(p));
  });
  return mask;
}

std::tuple<at::Tensor, at::Tensor> dropout_forward_cpu(const at::Tensor& input, double p, const at::Tensor& seed,
                                                       int64_t offset, bool store_mask) {
  check_dropout_input(input, "input");
  check_dropout_p(p);
  const at::Tensor contiguous = input.contiguous();
  at::Tensor output = at::empty_like(contiguous, at::MemoryFormat::Contiguous);
  at::Tensor mask = run_forward(contiguous, output, p, seed, offset, store_mask);
  return {output, mask};
}

at::Tensor dropout_forward_inplace_cpu(at::Tensor& input, double p, const at::Tensor& seed, int64_t offset,
                                       bool store_mask) {
  check_dropout_input(input, "input");
  check_dropout_p(p);
  at::Tensor work = input.contiguous();
  at::Tensor mask = run_forward(work, work, p, seed, offset, store_mask);
  if (!work.is_same(input)) input.copy_(work);
  return mask;
}

at::Tensor dropout_backward_cpu(const at::Tensor& grad, const at::Tensor& mask, double p) {
  check_dropout_input(grad, "grad");
  check_dropout_p(p);
  check_dropout_mask(mask, grad);
  const at::Tensor contiguous = grad.contiguous();
  at::Tensor grad_input = at::empty_like(contiguous, at::MemoryFormat::Contiguous);
  if (grad.numel() == 0) return grad_input;
  const at::Tensor mask_contiguous = mask.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "regops_dropout_backward_cpu", [&] {
    dropout_backward_kernel<scalar_t>(contiguous.const_data_ptr<scalar_t>(), mask_contiguous.const_data_ptr<uint8_t>(),
                                      grad_input.mutable_data_ptr<scalar_t>(), grad.numel(), dropout_scale(p));
  });
  return grad_input;
}

}  // namespace

TORCH_LIBRARY_IMPL(regops, CPU, m) {
  m.impl("dropout_forward", &dropout_forward_cpu);
  m.impl("dropout_forward_", &dropout_forward_inplace_cpu);
  m.impl("dropout_backward", &dropout_backward_cpu);
}

}  // namespace regops
