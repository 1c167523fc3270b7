// Host-side pieces of dropout shared by the CPU and CUDA launchers: argument
// checks, the work tensor and its output, the forward's out-of-place and
// in-place shells.
#pragma once

#include "regops/aten.h"

#include <cstdint>

#include "regops/dropout.h"

namespace regops {

inline void check_dropout_p(double p) {
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "regops dropout: p must be in [0, 1], got ", p);
}

inline uint64_t read_seed(const at::Tensor& seed) {
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong,
              "regops dropout: seed must be a one-element int64 tensor, got ", seed.scalar_type(),
              " with ", seed.numel(), " elements");
  return static_cast<uint64_t>(seed.item<int64_t>());
}

inline void check_dropout_input(const at::Tensor& input, const char* name) {
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "regops dropout: ", name, " must be a floating-point tensor, got ", input.scalar_type());
}

inline void check_dropout_mask(const at::Tensor& mask, const at::Tensor& grad) {
  TORCH_CHECK(mask.scalar_type() == at::kByte, "regops dropout: mask must be a uint8 tensor, got ",
              mask.scalar_type());
  TORCH_CHECK(mask.dim() == 1 && mask.numel() == dropout_mask_bytes(grad.numel()),
              "regops dropout: mask must be a flat uint8 tensor of ", dropout_mask_bytes(grad.numel()),
              " bytes for ", grad.numel(), " elements, got shape ", mask.sizes());
  TORCH_CHECK(mask.device() == grad.device(), "regops dropout: mask is on ", mask.device(),
              " but grad is on ", grad.device());
}

// The tensor the flat kernels run on. A dense tensor (contiguous,
// channels_last, any permutation of dims) is used as it is: its numel
// elements are consecutive in memory, so the kernels walk them in memory
// order from data_ptr, and the random rule numbers them in that order. Any
// other tensor is copied to contiguous (row-major order).
inline at::Tensor dropout_work_tensor(const at::Tensor& tensor) {
  return tensor.is_non_overlapping_and_dense() ? tensor : tensor.contiguous();
}

// An output in the layout of a work tensor: empty_like keeps a dense
// tensor's strides, so element k in memory of one is element k of the other.
inline at::Tensor dropout_output_like(const at::Tensor& work) { return at::empty_like(work); }

// The host side of the forward ops, shared by the CPU and CUDA files: checks,
// the work tensor, the output in its layout, then the backend's
// run_forward(input, output, p, seed, offset, store_mask) -> mask.
template <typename RunForward>
std::tuple<at::Tensor, at::Tensor> dropout_forward_out_of_place(const at::Tensor& input, double p,
                                                                const at::Tensor& seed, int64_t offset,
                                                                bool store_mask, RunForward run_forward) {
  check_dropout_input(input, "input");
  check_dropout_p(p);
  const at::Tensor work = dropout_work_tensor(input);
  at::Tensor output = dropout_output_like(work);
  at::Tensor mask = run_forward(work, output, p, seed, offset, store_mask);
  return {output, mask};
}

// In place: a non-dense input is computed in a contiguous copy and written
// back.
template <typename RunForward>
at::Tensor dropout_forward_in_place(at::Tensor& input, double p, const at::Tensor& seed, int64_t offset,
                                    bool store_mask, RunForward run_forward) {
  check_dropout_input(input, "input");
  check_dropout_p(p);
  at::Tensor work = dropout_work_tensor(input);
  at::Tensor mask = run_forward(work, work, p, seed, offset, store_mask);
  if (!work.is_same(input)) input.copy_(work);
  return mask;
}

inline void check_philox_args(const at::Tensor& counter, const at::Tensor& key) {
  TORCH_CHECK(counter.scalar_type() == at::kLong && key.scalar_type() == at::kLong,
              "regops philox4x32_10: counter and key must be int64 tensors");
  TORCH_CHECK(counter.dim() == 2 && counter.size(1) == 4, "regops philox4x32_10: counter must have shape (N, 4), got ",
              counter.sizes());
  TORCH_CHECK(key.dim() == 2 && key.size(1) == 2 && key.size(0) == counter.size(0),
              "regops philox4x32_10: key must have shape (N, 2) with N = ", counter.size(0), ", got ", key.sizes());
  TORCH_CHECK(counter.device() == key.device(), "regops philox4x32_10: counter and key must be on one device");
}

}  // namespace regops
