// Batch normalization math shared by the CPU and CUDA kernels (the host side
// of their entry points is in regops/batch_norm_host.h).
//
// Forward (torch.nn.functional.batch_norm, optionally plus a residual z and
// followed by ReLU):
//   y = act((x - mean) * invstd * weight + bias [+ z]),  invstd = 1 / sqrt(var + eps)
// computed per element as x * scale + shift with scale = invstd * weight and
// shift = bias - mean * scale folded once per channel.
//
// Backward, with dy masked by the ReLU (recomputed from y: torch's ReLU
// backward passes the gradient where y > 0, and NaN), n the element count per
// channel, sum_dy = sum(dy) and sum_dy_xmu = sum(dy * (x - mean)):
//   training: dx = (dy - sum_dy / n - (x - mean) * invstd^2 * sum_dy_xmu / n) * invstd * weight
//   eval:     dx = dy * invstd * weight   (mean and invstd are constants)
//   dweight = sum_dy_xmu * invstd,  dbias = sum_dy,  dz = masked dy
// folded into dx = dy * dy_scale + (x - mean) * xmu_scale + constant.
#pragma once

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

// With a residual z added before the activation: act(x * scale + shift + z).
template <typename acc_t>
REGOPS_INLINE acc_t batch_norm_normalize(acc_t x, acc_t z, BatchNormAffine<acc_t> affine, bool relu) {
  return batch_norm_activate(x * affine.scale + affine.shift + z, relu);
}

template <typename acc_t>
REGOPS_INLINE acc_t batch_norm_masked_grad(acc_t dy, acc_t x, acc_t z, BatchNormAffine<acc_t> affine, bool relu) {
  return (relu && x * affine.scale + affine.shift + z <= acc_t(0)) ? acc_t(0) : dy;
}

// Two per-channel sums a pass accumulates, added in pairs: the shifted
// statistics (sum(x - s), sum((x - s)^2)) or the backward's gradient sums
// (first: sum_dy = sum(g), second: sum_dy_xmu = sum(g * (x - mean))).
template <typename acc_t>
struct SumPair {
  using value_type = acc_t;
  acc_t first;
  acc_t second;
};

template <typename acc_t>
REGOPS_INLINE SumPair<acc_t> add_pairs(SumPair<acc_t> a, SumPair<acc_t> b) {
  return SumPair<acc_t>{a.first + b.first, a.second + b.second};
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

}  // namespace regops
