// Host side of the layer norm entry points shared by the CPU and CUDA
// implementations: argument checks with the same words on both, the dtype of
// the residual stream h, and the output allocation.
#pragma once

#include "regops/aten.h"

#include <optional>

#include "regops/dropout_host.h"

namespace regops {

// A dtype as a value, for dispatching the residual stream's dtype.
template <typename T>
struct TypeTag {
  using type = T;
};

// Statistics, weight and bias are float32, or float64 for float64 inputs.
inline at::ScalarType layer_norm_accumulate_type(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// The dtype of h = dropout(input) + residual: float32 with residual_in_fp32
// (float64 stays float64), else the residual's, else the input's.
inline at::ScalarType layer_norm_h_type(const at::Tensor& input, const std::optional<at::Tensor>& residual,
                                        bool residual_in_fp32) {
  if (residual_in_fp32) return layer_norm_accumulate_type(input.scalar_type());
  return residual.has_value() ? residual->scalar_type() : input.scalar_type();
}

inline void check_layer_norm_input(const at::Tensor& input, const char* name) {
  TORCH_CHECK(input.dim() == 2, "regops layer_norm: ", name, " must be 2-dimensional (rows, hidden), got shape ",
              input.sizes());
  const auto dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kDouble,
              "regops layer_norm: ", name, " must be float32, float16, bfloat16 or float64, got ", dtype);
  TORCH_CHECK(input.size(1) > 0, "regops layer_norm: ", name, " must have a positive hidden size, got shape ",
              input.sizes());
}

inline void check_row_tensor(const at::Tensor& tensor, const at::Tensor& input, const char* name, at::ScalarType dtype,
                             int64_t length) {
  TORCH_CHECK(tensor.device() == input.device(), "regops layer_norm: ", name, " is on ", tensor.device(),
              " but input is on ", input.device());
  TORCH_CHECK(tensor.scalar_type() == dtype, "regops layer_norm: ", name, " must be ", dtype, ", got ",
              tensor.scalar_type());
  TORCH_CHECK(tensor.dim() == 1 && tensor.size(0) == length, "regops layer_norm: ", name, " must have shape (",
              length, "), got ", tensor.sizes());
}

inline void check_same_shape(const at::Tensor& tensor, const at::Tensor& input, const char* name) {
  TORCH_CHECK(tensor.device() == input.device(), "regops layer_norm: ", name, " is on ", tensor.device(),
              " but input is on ", input.device());
  TORCH_CHECK(tensor.sizes() == input.sizes(), "regops layer_norm: ", name, " must have input's shape ",
              input.sizes(), ", got ", tensor.sizes());
}

inline void check_seed_tensor(const std::optional<at::Tensor>& seed, const at::Tensor& input) {
  if (!seed.has_value()) return;
  TORCH_CHECK(seed->numel() == 1 && seed->scalar_type() == at::kLong,
              "regops layer_norm: seed must be a one-element int64 tensor, got ", seed->scalar_type(), " with ",
              seed->numel(), " elements");
  TORCH_CHECK(seed->device() == input.device() || seed->device().is_cpu(), "regops layer_norm: seed is on ",
              seed->device(), " but input is on ", input.device());
}

inline void check_layer_norm_forward(const at::Tensor& input, const std::optional<at::Tensor>& residual,
                                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                     double p, const std::optional<at::Tensor>& seed, int64_t offset, double eps) {
  check_layer_norm_input(input, "input");
  const at::ScalarType acc = layer_norm_accumulate_type(input.scalar_type());
  if (residual.has_value()) {
    check_same_shape(*residual, input, "residual");
    TORCH_CHECK(residual->scalar_type() == input.scalar_type() || residual->scalar_type() == acc,
                "regops layer_norm: residual must be ", input.scalar_type(), " or ", acc, ", got ",
                residual->scalar_type());
  }
  if (weight.has_value()) check_row_tensor(*weight, input, "weight", acc, input.size(1));
  if (bias.has_value()) check_row_tensor(*bias, input, "bias", acc, input.size(1));
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "regops layer_norm: p must be in [0, 1], got ", p);
  TORCH_CHECK(offset >= 0, "regops layer_norm: offset must be non-negative, got ", offset);
  TORCH_CHECK(eps >= 0.0, "regops layer_norm: eps must be non-negative, got ", eps);
  check_seed_tensor(seed, input);
}

inline void check_layer_norm_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_h,
                                      const at::Tensor& h, const std::optional<at::Tensor>& weight,
                                      const at::Tensor& mean, const at::Tensor& rstd,
                                      const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& seed,
                                      double p, int64_t offset, bool rms) {
  check_layer_norm_input(grad_out, "grad_out");
  check_layer_norm_input(h, "h");
  check_same_shape(h, grad_out, "h");
  const at::ScalarType acc = layer_norm_accumulate_type(grad_out.scalar_type());
  TORCH_CHECK(h.scalar_type() == grad_out.scalar_type() || h.scalar_type() == acc, "regops layer_norm: h must be ",
              grad_out.scalar_type(), " or ", acc, ", got ", h.scalar_type());
  if (grad_h.has_value()) {
    check_same_shape(*grad_h, grad_out, "grad_h");
    TORCH_CHECK(grad_h->scalar_type() == h.scalar_type(), "regops layer_norm: grad_h must be ", h.scalar_type(),
                " like h, got ", grad_h->scalar_type());
  }
  if (weight.has_value()) check_row_tensor(*weight, grad_out, "weight", acc, grad_out.size(1));
  check_row_tensor(mean, grad_out, "mean", acc, rms ? 0 : grad_out.size(0));
  check_row_tensor(rstd, grad_out, "rstd", acc, grad_out.size(0));
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kByte && mask->dim() == 1 &&
                    mask->numel() == dropout_mask_bytes(grad_out.numel()),
                "regops layer_norm: mask must be a flat uint8 tensor of ", dropout_mask_bytes(grad_out.numel()),
                " bytes for ", grad_out.numel(), " elements, got ", mask->scalar_type(), " of shape ", mask->sizes());
    TORCH_CHECK(mask->device() == grad_out.device(), "regops layer_norm: mask is on ", mask->device(),
                " but grad_out is on ", grad_out.device());
  }
  TORCH_CHECK(p >= 0.0 && p <= 1.0, "regops layer_norm: p must be in [0, 1], got ", p);
  TORCH_CHECK(offset >= 0, "regops layer_norm: offset must be non-negative, got ", offset);
  check_seed_tensor(seed, grad_out);
}

// The forward's outputs, allocated once for both backends.
struct LayerNormOutputs {
  at::Tensor output, h, mean, rstd, mask;
};

inline LayerNormOutputs allocate_layer_norm_outputs(const at::Tensor& input, at::ScalarType h_type, bool rms,
                                                    bool store_mask, bool store_h) {
  const int64_t rows = input.size(0);
  const auto acc = input.options().dtype(layer_norm_accumulate_type(input.scalar_type()));
  LayerNormOutputs out;
  out.output = at::empty_like(input, at::MemoryFormat::Contiguous);
  out.h = store_h ? at::empty(input.sizes(), input.options().dtype(h_type)) : at::empty({0}, input.options().dtype(h_type));
  out.mean = at::empty({rms ? 0 : rows}, acc);
  out.rstd = at::empty({rows}, acc);
  out.mask = at::empty({store_mask ? dropout_mask_bytes(input.numel()) : 0}, input.options().dtype(at::kByte));
  return out;
}

}  // namespace regops
