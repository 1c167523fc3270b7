// Batch normalization math shared by the CPU and CUDA kernels, and the host
// side checks of every batch-norm entry point.
//
// Forward (torch.nn.functional.batch_norm, optionally followed by ReLU):
//   y = act((x - mean) * invstd * weight + bias),  invstd = 1 / sqrt(var + eps)
// computed per element as x * scale + shift with scale = invstd * weight and
// shift = bias - mean * scale folded once per channel.
//
// Backward, with dy masked by the ReLU (recomputed from y: torch's ReLU
// backward passes the gradient where y > 0, and NaN), n the element count per
// channel, sum_dy = sum(dy) and sum_dy_xmu = sum(dy * (x - mean)):
//   training: dx = (dy - sum_dy / n - (x - mean) * invstd^2 * sum_dy_xmu / n) * invstd * weight
//   eval:     dx = dy * invstd * weight   (mean and invstd are constants)
//   dweight = sum_dy_xmu * invstd,  dbias = sum_dy
// folded into dx = dy * dy_scale + (x - mean) * xmu_scale + constant.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "regops/macros.h"

namespace regops {

template <typename acc_t>
struct BatchNormAffine {
  acc_t scale;
  acc_t shift;
};

template <typename acc_t>
REGOPS_INLINE BatchNormAffine<acc_t> batch_norm_affine(acc_t mean, acc_t invstd, acc_t weight, acc_t bias) {
  const acc_t scale = invstd * weight;
  return BatchNormAffine<acc_t>{scale, bias - mean * scale};
}

// ReLU that keeps NaN, as torch.relu does.
template <typename acc_t>
REGOPS_INLINE acc_t batch_norm_activate(acc_t y, bool relu) {
  return (relu && y < acc_t(0)) ? acc_t(0) : y;
}

template <typename acc_t>
REGOPS_INLINE acc_t batch_norm_normalize(acc_t x, BatchNormAffine<acc_t> affine, bool relu) {
  return batch_norm_activate(x * affine.scale + affine.shift, relu);
}

// dy where the fused ReLU let the forward value through (y > 0 or NaN).
template <typename acc_t>
REGOPS_INLINE acc_t batch_norm_masked_grad(acc_t dy, acc_t x, BatchNormAffine<acc_t> affine, bool relu) {
  return (relu && x * affine.scale + affine.shift <= acc_t(0)) ? acc_t(0) : dy;
}

template <typename acc_t>
struct BatchNormBackwardCoefficients {
  acc_t dy_scale;
  acc_t xmu_scale;
  acc_t constant;
};

template <typename acc_t>
REGOPS_INLINE BatchNormBackwardCoefficients<acc_t> batch_norm_backward_coefficients(
    acc_t invstd, acc_t weight, acc_t sum_dy, acc_t sum_dy_xmu, acc_t count, bool training) {
  const acc_t dy_scale = invstd * weight;
  if (!training) return BatchNormBackwardCoefficients<acc_t>{dy_scale, acc_t(0), acc_t(0)};
  const acc_t inverse_count = acc_t(1) / count;
  return BatchNormBackwardCoefficients<acc_t>{dy_scale, -dy_scale * invstd * invstd * sum_dy_xmu * inverse_count,
                                              -dy_scale * sum_dy * inverse_count};
}

template <typename acc_t>
REGOPS_INLINE acc_t batch_norm_grad_input(acc_t masked_dy, acc_t x, acc_t mean,
                                          BatchNormBackwardCoefficients<acc_t> k) {
  // A zero xmu_scale (always in eval) skips its term rather than adding
  // (x - mean) * 0: torch's eval backward is dy * invstd * weight, so a NaN or
  // inf input element (or a NaN running mean) must not turn its gradient NaN.
  const acc_t xmu_term = k.xmu_scale != acc_t(0) ? (x - mean) * k.xmu_scale : acc_t(0);
  return masked_dy * k.dy_scale + xmu_term + k.constant;
}

// ---- host side ---------------------------------------------------------------

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

inline BatchNormGeometry batch_norm_geometry(const at::Tensor& input, at::MemoryFormat format) {
  int64_t spatial = 1;
  for (int64_t d = 2; d < input.dim(); ++d) spatial *= input.size(d);
  return BatchNormGeometry{input.size(0), input.size(1), spatial,
                           format != at::MemoryFormat::Contiguous || spatial == 1};
}

// Statistics and parameters are float32, or float64 for float64 inputs.
inline at::ScalarType batch_norm_accumulate_type(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
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

// The argument checks of each batch norm entry point, shared by the CPU and
// CUDA implementations so both reject the same inputs with the same words.
inline void check_elementwise_arguments(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                                        const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const char* op) {
  check_batch_norm_input(input, op);
  check_channel_tensor(mean, input, "mean", op);
  check_channel_tensor(invstd, input, "invstd", op);
  check_optional_channel_tensor(weight, input, "weight", op);
  check_optional_channel_tensor(bias, input, "bias", op);
}

inline void check_backward_reduce_arguments(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean,
                                            const at::Tensor& invstd, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                            const char* op) {
  check_batch_norm_input(input, op);
  check_grad_output(grad_out, input, op);
  check_channel_tensor(mean, input, "mean", op);
  check_channel_tensor(invstd, input, "invstd", op);
  check_optional_channel_tensor(weight, input, "weight", op);
  check_optional_channel_tensor(bias, input, "bias", op);
}

inline void check_forward_arguments(const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, const char* op) {
  check_batch_norm_input(input, op);
  check_optional_channel_tensor(weight, input, "weight", op);
  check_optional_channel_tensor(bias, input, "bias", op);
  check_optional_channel_tensor(running_mean, input, "running_mean", op);
  check_optional_channel_tensor(running_var, input, "running_var", op);
}

inline void check_backward_arguments(const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias, const at::Tensor& save_mean, const at::Tensor& save_invstd,
                                     const char* op) {
  check_batch_norm_input(input, op);
  check_grad_output(grad_out, input, op);
  check_optional_channel_tensor(weight, input, "weight", op);
  check_optional_channel_tensor(bias, input, "bias", op);
  check_channel_tensor(save_mean, input, "save_mean", op);
  check_channel_tensor(save_invstd, input, "save_invstd", op);
}

// A per-channel tensor that may be absent, as contiguous data or a constant.
inline at::Tensor channel_tensor_or(const std::optional<at::Tensor>& tensor, const at::Tensor& input, double fill) {
  if (tensor.has_value() && tensor->defined()) return tensor->contiguous();
  return at::full({input.size(1)}, fill, input.options().dtype(batch_norm_accumulate_type(input.scalar_type())));
}

inline bool has_tensor(const std::optional<at::Tensor>& tensor) { return tensor.has_value() && tensor->defined(); }

}  // namespace regops
