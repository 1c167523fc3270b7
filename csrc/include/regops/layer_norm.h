// Layer normalization (Ba, Kiros and Hinton, "Layer Normalization", 2016;
// torch.nn.functional.layer_norm) and RMSNorm (Zhang and Sennrich, "Root Mean
// Square Layer Normalization", 2019; torch.nn.functional.rms_norm) of one
// row h of `hidden` values, in the accumulate dtype (float32; float64 for
// float64 inputs). Shared by the CPU and CUDA kernels.
//
//   LayerNorm: mean = sum(h) / n, var = sum((h - mean)^2) / n (biased),
//              rstd = 1 / sqrt(var + eps), xhat = (h - mean) * rstd
//   RMSNorm:   rstd = 1 / sqrt(sum(h^2) / n + eps), xhat = h * rstd
//   y = xhat * weight + bias
//
// Backward, with g = weight * dy (dy when there is no weight):
//   dh = rstd * (g - mean(g) - xhat * mean(g * xhat))   (RMSNorm: no mean(g) term)
//   dweight = sum over rows of dy * xhat, dbias = sum over rows of dy.
#pragma once

#include <cmath>

#include "regops/macros.h"

namespace regops {

// 1 / sqrt(second_moment + eps), rounded as torch's kernels round it (a
// division, not the approximate reciprocal square root).
template <typename acc_t>
REGOPS_INLINE acc_t layer_norm_rstd(acc_t second_moment, acc_t eps) {
#if defined(__CUDA_ARCH__)
  return acc_t(1) / sqrt(second_moment + eps);
#else
  return acc_t(1) / std::sqrt(second_moment + eps);
#endif
}

template <typename acc_t>
REGOPS_INLINE acc_t layer_norm_grad_h(acc_t g, acc_t xhat, acc_t rstd, acc_t mean_g, acc_t mean_g_xhat) {
  return rstd * (g - mean_g - xhat * mean_g_xhat);
}

}  // namespace regops
