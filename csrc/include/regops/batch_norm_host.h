// Host side of the batch norm entry points shared by the CPU and CUDA
// implementations: the working layout and geometry of the input, the
// argument checks and the entry points themselves (BatchNormEntries), so
// both backends see inputs the same way and reject the same inputs with the
// same words. Plain ATen, compiled by g++ and nvcc alike.
#pragma once

#include <torch/library.h>

#include "regops/aten.h"

#include <optional>
#include <tuple>

#include "regops/batch_norm.h"

namespace regops {

// Input seen as (N, C, S), S the product of the spatial sizes. Kernels handle
// two memory layouts without a transposing copy: spatial-inner (contiguous
// NCHW: rows of S elements, one channel each) and channel-inner
// (channels_last / channels_last_3d, or S == 1: rows of C channels).
struct BatchNormGeometry {
  int64_t batch;
  int64_t channels;
  int64_t spatial;
  bool channels_inner;
  int64_t count_per_channel() const { return batch * spatial; }
  int64_t rows() const { return channels_inner ? batch * spatial : batch * channels; }
};

// The memory format the kernels work in: the input's own when it is one of
// the two dense layouts, else contiguous (the input is then copied).
inline at::MemoryFormat batch_norm_memory_format(const at::Tensor& input) {
  if (input.is_contiguous()) return at::MemoryFormat::Contiguous;
  if (input.dim() == 4 && input.is_contiguous(at::MemoryFormat::ChannelsLast)) return at::MemoryFormat::ChannelsLast;
  if (input.dim() == 5 && input.is_contiguous(at::MemoryFormat::ChannelsLast3d)) {
    return at::MemoryFormat::ChannelsLast3d;
  }
  return at::MemoryFormat::Contiguous;
}

// S: the product of the sizes after (N, C).
inline int64_t batch_norm_spatial_size(const at::Tensor& input) {
  int64_t spatial = 1;
  for (int64_t d = 2; d < input.dim(); ++d) spatial *= input.size(d);
  return spatial;
}

inline BatchNormGeometry batch_norm_geometry(const at::Tensor& input, at::MemoryFormat format) {
  const int64_t spatial = batch_norm_spatial_size(input);
  return BatchNormGeometry{input.size(0), input.size(1), spatial,
                           format != at::MemoryFormat::Contiguous || spatial == 1};
}

// The input in the layout the kernels run on (grad_out is brought into the
// same `format`), and its geometry.
struct BatchNormInput {
  at::Tensor input;
  at::MemoryFormat format;
  BatchNormGeometry geometry;
};

inline BatchNormInput prepare_batch_norm_input(const at::Tensor& input) {
  const at::MemoryFormat format = batch_norm_memory_format(input);
  at::Tensor work = input.contiguous(format);
  return BatchNormInput{work, format, batch_norm_geometry(work, format)};
}

// Statistics and parameters are float32, or float64 for float64 inputs.
inline at::ScalarType batch_norm_accumulate_type(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

inline at::TensorOptions accumulate_options(const at::Tensor& input) {
  return input.options().dtype(batch_norm_accumulate_type(input.scalar_type()));
}

inline void check_batch_norm_input(const at::Tensor& input, const char* op) {
  TORCH_CHECK(input.dim() >= 2, "regops ", op, ": input must have at least 2 dimensions (N, C, ...), got shape ",
              input.sizes());
  const auto dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "regops ", op, ": input must be float32, float16, bfloat16 or float64, got ", dtype);
}

// A per-channel tensor (mean, invstd, weight, ...): C elements of the
// accumulate type, on the input's device.
inline void check_channel_tensor(const at::Tensor& tensor, const at::Tensor& input, const char* name, const char* op) {
  TORCH_CHECK(tensor.dim() == 1 && tensor.numel() == input.size(1), "regops ", op, ": ", name,
              " must be a 1-D tensor of ", input.size(1), " elements (one per channel), got shape ", tensor.sizes());
  TORCH_CHECK(tensor.scalar_type() == batch_norm_accumulate_type(input.scalar_type()), "regops ", op, ": ", name,
              " must be ", batch_norm_accumulate_type(input.scalar_type()), " for a ", input.scalar_type(),
              " input, got ", tensor.scalar_type());
  TORCH_CHECK(tensor.device() == input.device(), "regops ", op, ": ", name, " is on ", tensor.device(),
              " but input is on ", input.device());
}

inline void check_optional_channel_tensor(const std::optional<at::Tensor>& tensor, const at::Tensor& input,
                                          const char* name, const char* op) {
  if (tensor.has_value() && tensor->defined()) check_channel_tensor(*tensor, input, name, op);
}

inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& input, const char* op) {
  TORCH_CHECK(grad_output.sizes() == input.sizes(), "regops ", op, ": grad_out must have the input's shape ",
              input.sizes(), ", got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), "regops ", op, ": grad_out must be ",
              input.scalar_type(), " like input, got ", grad_output.scalar_type());
  TORCH_CHECK(grad_output.device() == input.device(), "regops ", op, ": grad_out is on ", grad_output.device(),
              " but input is on ", input.device());
}

inline bool has_tensor(const std::optional<at::Tensor>& tensor) { return tensor.has_value() && tensor->defined(); }

// The residual added before the activation: the input's shape, dtype and
// device, any strides (it is brought into the input's working layout).
inline void check_residual(const std::optional<at::Tensor>& residual, const at::Tensor& input, const char* op) {
  if (!has_tensor(residual)) return;
  TORCH_CHECK(residual->sizes() == input.sizes(), "regops ", op, ": residual must have the input's shape ",
              input.sizes(), ", got ", residual->sizes());
  TORCH_CHECK(residual->scalar_type() == input.scalar_type(), "regops ", op, ": residual must be ",
              input.scalar_type(), " like input, got ", residual->scalar_type());
  TORCH_CHECK(residual->device() == input.device(), "regops ", op, ": residual is on ", residual->device(),
              " but input is on ", input.device());
}

// The residual in the input's working layout, or an undefined tensor.
inline at::Tensor prepare_residual(const std::optional<at::Tensor>& residual, const BatchNormInput& p) {
  return has_tensor(residual) ? residual->contiguous(p.format) : at::Tensor();
}

// ---- the argument checks of each entry point -----------------------------------

// The per-channel tensors the elementwise passes normalize with.
inline void check_normalization_tensors(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                                        const std::optional<at::Tensor>& weight,
                                        const std::optional<at::Tensor>& bias, const char* op) {
  check_channel_tensor(mean, input, "mean", op);
  check_channel_tensor(invstd, input, "invstd", op);
  check_optional_channel_tensor(weight, input, "weight", op);
  check_optional_channel_tensor(bias, input, "bias", op);
}

// Those tensors, as the kernels of the elementwise passes take them.
struct NormalizationTensors {
  const at::Tensor& mean;
  const at::Tensor& invstd;
  const std::optional<at::Tensor>& weight;
  const std::optional<at::Tensor>& bias;
};

inline void check_elementwise_arguments(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                                        const std::optional<at::Tensor>& weight,
                                        const std::optional<at::Tensor>& bias, const char* op) {
  check_batch_norm_input(input, op);
  check_normalization_tensors(input, mean, invstd, weight, bias, op);
}

inline void check_backward_reduce_arguments(const at::Tensor& grad_out, const at::Tensor& input,
                                            const at::Tensor& mean, const at::Tensor& invstd,
                                            const std::optional<at::Tensor>& weight,
                                            const std::optional<at::Tensor>& bias, const char* op) {
  check_batch_norm_input(input, op);
  check_grad_output(grad_out, input, op);
  check_normalization_tensors(input, mean, invstd, weight, bias, op);
}

inline void check_backward_elementwise_arguments(const at::Tensor& grad_out, const at::Tensor& input,
                                                 const at::Tensor& mean, const at::Tensor& invstd,
                                                 const std::optional<at::Tensor>& weight,
                                                 const std::optional<at::Tensor>& bias, const at::Tensor& sum_dy,
                                                 const at::Tensor& sum_dy_xmu, int64_t count, const char* op) {
  check_backward_reduce_arguments(grad_out, input, mean, invstd, weight, bias, op);
  check_channel_tensor(sum_dy, input, "sum_dy", op);
  check_channel_tensor(sum_dy_xmu, input, "sum_dy_xmu", op);
  TORCH_CHECK(count > 0, "regops ", op, ": count must be positive, got ", count);
}

// Also torch's rules for the mode: eval normalizes with the running
// statistics, so it needs them; training needs more than one value per channel.
inline void check_forward_arguments(const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                    const std::optional<at::Tensor>& bias,
                                    const std::optional<at::Tensor>& running_mean,
                                    const std::optional<at::Tensor>& running_var, bool training,
                                    const std::optional<at::Tensor>& residual, const char* op) {
  check_batch_norm_input(input, op);
  check_optional_channel_tensor(weight, input, "weight", op);
  check_optional_channel_tensor(bias, input, "bias", op);
  check_optional_channel_tensor(running_mean, input, "running_mean", op);
  check_optional_channel_tensor(running_var, input, "running_var", op);
  TORCH_CHECK(has_tensor(running_mean) == has_tensor(running_var), "regops ", op,
              ": running_mean and running_var must either both be None or neither be None");
  TORCH_CHECK(training || (has_tensor(running_mean) && has_tensor(running_var)), "regops ", op,
              ": running_mean and running_var must be given in eval mode (training=False)");
  TORCH_CHECK(!training || input.size(0) * batch_norm_spatial_size(input) != 1, "regops ", op,
              ": expected more than 1 value per channel when training, got input size ", input.sizes());
  check_residual(residual, input, op);
}

inline void check_backward_arguments(const at::Tensor& grad_out, const at::Tensor& input,
                                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                     const at::Tensor& save_mean, const at::Tensor& save_invstd,
                                     const std::optional<at::Tensor>& residual, const char* op) {
  check_batch_norm_input(input, op);
  check_grad_output(grad_out, input, op);
  check_optional_channel_tensor(weight, input, "weight", op);
  check_optional_channel_tensor(bias, input, "bias", op);
  check_channel_tensor(save_mean, input, "save_mean", op);
  check_channel_tensor(save_invstd, input, "save_invstd", op);
  check_residual(residual, input, op);
}

// ---- the entry points, written once for every backend -----------------------------

// The registered functions of the batch norm ops. Each checks its arguments,
// makes the input's device current (Backend::Guard: cuda::DeviceGuard, or
// nothing on the CPU), brings the input, grad_out and residual into the
// working layout and calls the backend's kernels, the function of the op's
// name that takes a Backend first (found by argument-dependent lookup), with
// the op's arguments: the input as a BatchNormInput, grad_out as dy, the
// residual as z (undefined without one) and the elementwise passes'
// per-channel tensors as NormalizationTensors.
template <typename Backend>
struct BatchNormEntries {
  static std::tuple<at::Tensor, at::Tensor> stats(const at::Tensor& input) {
    check_batch_norm_input(input, "batch_norm_stats");
    const typename Backend::Guard guard(input.device());
    return batch_norm_stats(Backend{}, prepare_batch_norm_input(input));
  }

  static at::Tensor elementwise(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                                const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                bool relu) {
    check_elementwise_arguments(input, mean, invstd, weight, bias, "batch_norm_elementwise");
    const typename Backend::Guard guard(input.device());
    return batch_norm_elementwise(Backend{}, prepare_batch_norm_input(input), {mean, invstd, weight, bias}, relu);
  }

  static std::tuple<at::Tensor, at::Tensor> backward_reduce(const at::Tensor& grad_out, const at::Tensor& input,
                                                            const at::Tensor& mean, const at::Tensor& invstd,
                                                            const std::optional<at::Tensor>& weight,
                                                            const std::optional<at::Tensor>& bias, bool relu) {
    check_backward_reduce_arguments(grad_out, input, mean, invstd, weight, bias, "batch_norm_backward_reduce");
    const typename Backend::Guard guard(input.device());
    const BatchNormInput p = prepare_batch_norm_input(input);
    return batch_norm_backward_reduce(Backend{}, p, grad_out.contiguous(p.format), {mean, invstd, weight, bias},
                                      relu);
  }

  static at::Tensor backward_elementwise(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                                         const at::Tensor& invstd, const std::optional<at::Tensor>& weight,
                                         const std::optional<at::Tensor>& bias, const at::Tensor& sum_dy,
                                         const at::Tensor& sum_dy_xmu, int64_t count, bool relu) {
    check_backward_elementwise_arguments(grad_out, input, mean, invstd, weight, bias, sum_dy, sum_dy_xmu, count,
                                         "batch_norm_backward_elementwise");
    const typename Backend::Guard guard(input.device());
    const BatchNormInput p = prepare_batch_norm_input(input);
    return batch_norm_backward_elementwise(Backend{}, p, grad_out.contiguous(p.format), {mean, invstd, weight, bias},
                                           sum_dy, sum_dy_xmu, count, relu);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
      const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
      const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, bool training,
      double eps, bool relu, const std::optional<at::Tensor>& residual) {
    check_forward_arguments(input, weight, bias, running_mean, running_var, training, residual, "batch_norm_forward");
    const typename Backend::Guard guard(input.device());
    const BatchNormInput p = prepare_batch_norm_input(input);
    return batch_norm_forward(Backend{}, p, prepare_residual(residual, p), weight, bias, running_mean, running_var,
                              training, eps, relu);
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
      const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& bias, const at::Tensor& save_mean, const at::Tensor& save_invstd,
      bool training, bool relu, const std::optional<at::Tensor>& residual) {
    check_backward_arguments(grad_out, input, weight, bias, save_mean, save_invstd, residual, "batch_norm_backward");
    const typename Backend::Guard guard(input.device());
    const BatchNormInput p = prepare_batch_norm_input(input);
    const at::Tensor dy = grad_out.contiguous(p.format);
    return batch_norm_backward(Backend{}, p, dy, prepare_residual(residual, p), weight, bias, save_mean, save_invstd,
                               training, relu);
  }
};

// The batch norm ops' registrations with Backend's kernels, for the
// backend's TORCH_LIBRARY_IMPL block.
template <typename Backend>
void register_batch_norm(torch::Library& m) {
  using Entries = BatchNormEntries<Backend>;
  m.impl("batch_norm_forward", &Entries::forward);
  m.impl("batch_norm_backward", &Entries::backward);
  m.impl("batch_norm_stats", &Entries::stats);
  m.impl("batch_norm_elementwise", &Entries::elementwise);
  m.impl("batch_norm_backward_reduce", &Entries::backward_reduce);
  m.impl("batch_norm_backward_elementwise", &Entries::backward_elementwise);
}

}  // namespace regops
