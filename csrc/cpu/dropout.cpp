// Dropout on the CPU. Every mask bit depends only on (seed, offset, element
// index), so the result is the same for any number of threads. at::parallel_for runs on
// ATen's OpenMP thread pool (and honours torch.set_num_threads).
#include "regops/aten.h"
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>

#include "regops/cpu_memory.h"
#include "regops/dropout_cpu.h"
#include "regops/dropout_host.h"

namespace regops {
namespace {

// Blocks (dropout_cpu.h) per parallel task: 16K elements, enough to amortize the fork.
constexpr int64_t kBlocksPerTask = 128;

template <typename scalar_t>
void dropout_forward_kernel(const scalar_t* input, scalar_t* output, uint8_t* mask, int64_t numel,
                            uint64_t seed, uint64_t offset, uint64_t threshold, double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t acc_scale = static_cast<acc_t>(scale);
  const int64_t whole_blocks = numel / kElementsPerBlock;
  // Captures by value, and the per-block factors go through a local array
  // whose address never escapes, so the compiler can prove the loops free of
  // aliasing and vectorize them.
  at::parallel_for(0, whole_blocks, kBlocksPerTask, [=](int64_t begin, int64_t end) {
    uint32_t keep[kElementsPerBlock];
    uint8_t bytes[kMaskBytesPerBlock];
    acc_t factor[kElementsPerBlock];
    for (int64_t block = begin; block < end; ++block) {
      dropout_keep_block(seed, offset + static_cast<uint64_t>(block) * kCountersPerBlock, threshold, keep, bytes);
      for (int e = 0; e < kElementsPerBlock; ++e) factor[e] = static_cast<acc_t>(keep[e]) * acc_scale;
      const int64_t first = block * kElementsPerBlock;
      for (int e = 0; e < kElementsPerBlock; ++e) {
        output[first + e] = static_cast<scalar_t>(static_cast<acc_t>(input[first + e]) * factor[e]);
      }
      if (mask != nullptr) std::memcpy(mask + block * kMaskBytesPerBlock, bytes, kMaskBytesPerBlock);
    }
  });
  // The partial last block, byte by byte.
  for (int64_t byte = whole_blocks * kMaskBytesPerBlock; byte * 8 < numel; ++byte) {
    const uint32_t bits = dropout_keep_byte(seed, offset, byte, numel, threshold);
    if (mask != nullptr) mask[byte] = static_cast<uint8_t>(bits);
    for (int64_t i = byte * 8; i < std::min(numel, byte * 8 + 8); ++i) {
      output[i] = static_cast<scalar_t>(dropout_apply(static_cast<acc_t>(input[i]), (bits >> (i - byte * 8)) & 1u, acc_scale));
    }
  }
}

template <typename scalar_t>
void dropout_backward_kernel(const scalar_t* grad, const uint8_t* mask, scalar_t* grad_input, int64_t numel,
                             double scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t acc_scale = static_cast<acc_t>(scale);
  at::parallel_for(0, (numel + kElementsPerBlock - 1) / kElementsPerBlock, kBlocksPerTask,
                   [=](int64_t begin, int64_t end) {
    acc_t factor[kElementsPerBlock];
    for (int64_t block = begin; block < end; ++block) {
      const int64_t first = block * kElementsPerBlock;
      const int count = static_cast<int>(std::min<int64_t>(kElementsPerBlock, numel - first));
      const uint8_t* bytes = mask + block * kMaskBytesPerBlock;
      for (int e = 0; e < kElementsPerBlock; ++e) {
        factor[e] = static_cast<acc_t>((bytes[e >> 3] >> (e & 7)) & 1) * acc_scale;  // branch-free
      }
      if (count == kElementsPerBlock) {
        for (int e = 0; e < kElementsPerBlock; ++e) {
          grad_input[first + e] = static_cast<scalar_t>(static_cast<acc_t>(grad[first + e]) * factor[e]);
        }
      } else {
        for (int e = 0; e < count; ++e) {
          grad_input[first + e] = static_cast<scalar_t>(static_cast<acc_t>(grad[first + e]) * factor[e]);
        }
      }
    }
  });
}

// Writes dropout(input) into output (dense with the same strides, possibly
// the same tensor), element k in memory taking bit k.
at::Tensor run_forward(const at::Tensor& input, at::Tensor& output, double p, const at::Tensor& seed,
                       int64_t offset, bool store_mask) {
  const int64_t numel = input.numel();
  if (!output.is_same(input)) advise_huge_pages(output);
  at::Tensor mask = at::empty({store_mask ? dropout_mask_bytes(numel) : 0}, input.options().dtype(at::kByte));
  if (store_mask) {  // the kernel writes the bytes that hold elements; zero the padding
    const int64_t element_bytes = (numel + 7) / 8;
    mask.narrow(0, element_bytes, mask.numel() - element_bytes).zero_();
  }
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
  return dropout_forward_out_of_place(input, p, seed, offset, store_mask, run_forward);
}

at::Tensor dropout_forward_inplace_cpu(at::Tensor& input, double p, const at::Tensor& seed, int64_t offset,
                                       bool store_mask) {
  return dropout_forward_in_place(input, p, seed, offset, store_mask, run_forward);
}

at::Tensor dropout_backward_cpu(const at::Tensor& grad, const at::Tensor& mask, double p) {
  check_dropout_input(grad, "grad");
  check_dropout_p(p);
  check_dropout_mask(mask, grad);
  const at::Tensor work = dropout_work_tensor(grad);  // the mask bits follow its memory order
  at::Tensor grad_input = dropout_output_like(work);
  if (grad.numel() == 0) return grad_input;
  advise_huge_pages(grad_input);
  const at::Tensor mask_contiguous = mask.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "regops_dropout_backward_cpu", [&] {
    dropout_backward_kernel<scalar_t>(work.const_data_ptr<scalar_t>(), mask_contiguous.const_data_ptr<uint8_t>(),
                                      grad_input.mutable_data_ptr<scalar_t>(), grad.numel(), dropout_scale(p));
  });
  return grad_input;
}

at::Tensor philox_cpu(const at::Tensor& counter, const at::Tensor& key) {
  check_philox_args(counter, key);
  const at::Tensor c = counter.contiguous(), k = key.contiguous();
  at::Tensor out = at::empty_like(c);
  const int64_t* cp = c.const_data_ptr<int64_t>();
  const int64_t* kp = k.const_data_ptr<int64_t>();
  int64_t* op = out.mutable_data_ptr<int64_t>();
  for (int64_t n = 0; n < c.size(0); ++n) {
    Philox4 ctr{};
    for (int w = 0; w < 4; ++w) ctr.x[w] = static_cast<uint32_t>(cp[4 * n + w]);
    const Philox4 r = philox4x32_10(ctr, static_cast<uint32_t>(kp[2 * n]), static_cast<uint32_t>(kp[2 * n + 1]));
    for (int w = 0; w < 4; ++w) op[4 * n + w] = r.x[w];
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(regops, CPU, m) {
  m.impl("dropout_forward", &dropout_forward_cpu);
  m.impl("dropout_forward_", &dropout_forward_inplace_cpu);
  m.impl("dropout_backward", &dropout_backward_cpu);
  m.impl("philox4x32_10", &philox_cpu);
}

}  // namespace regops
