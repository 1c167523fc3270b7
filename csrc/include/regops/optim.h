// The element updates of the penalized SGD and AdamW optimizers, written once
// for the CPU kernel (g++) and the CUDA kernel (nvcc). All math is float32;
// parameters and states are loaded from their storage dtype by the callers
// and rounded once on store.
//
// The rules follow torch.optim.SGD / torch.optim.AdamW with foreach=False,
// fused=False (torch/optim/sgd.py _single_tensor_sgd, adam.py
// _single_tensor_adam), plus the regops penalties. With p the parameter
// *before* this step and g the gradient:
//   g = g * grad_factor              (1 / grad_scale of GradScaler, times the clip coefficient)
//   g = -g                           if maximize
//   g = g + l2 * p + l1 * sign(p)    coupled L2 (SGD's weight_decay, AdamW's l2) and the L1 subgradient
//   ... momentum / moments and the update of p ...
//   p = sign(p) * max(|p| - lr * l1, 0)   proximal L1, after the update (instead of the subgradient)
// AdamW's weight_decay is decoupled: p = p * (1 - lr * weight_decay) before
// the Adam update, as in torch.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "regops/macros.h"

namespace regops {

// The proximal operator of lr * l1 * |p|: soft-thresholding. Exact zeros for
// |p| <= threshold; copysign keeps it branch-free; a NaN stays NaN.
REGOPS_INLINE float soft_threshold(float p, float threshold) {
  const float shrunk = fabsf(p) - threshold;
  return copysignf(shrunk < 0.0f ? 0.0f : shrunk, p);
}

// torch.lerp(start, end, weight) as ATen computes it (aten/src/ATen/native/Lerp.h:
// start + weight * (end - start) for |weight| < 0.5, else
// end - (end - start) * (1 - weight)), so exp_avg matches torch's
// exp_avg.lerp_(grad, 1 - beta1). The choice depends only on the weight, so
// it is made once per call (LerpWeight) and the element formula is
// base + factor * (end - start) with base selected from loaded values;
// weight - 1 == -(1 - weight) exactly.
struct LerpWeight {
  float factor;     // weight, or weight - 1
  bool from_start;  // |weight| < 0.5
};

REGOPS_INLINE LerpWeight lerp_weight(float weight) {
  const bool from_start = fabsf(weight) < 0.5f;
  return {from_start ? weight : weight - 1.0f, from_start};
}

REGOPS_INLINE float lerp_like_torch(float start, float end, LerpWeight w) {
  return (w.from_start ? start : end) + w.factor * (end - start);
}

// Options are folded into arithmetic (maximize into the sign of
// grad_factor, a disabled proximal step into a threshold of 0, which returns
// p bit for bit) or are compile-time constants in the CPU loops (momentum,
// first_step, nesterov, amsgrad, the lerp formula): a select on a
// loop-invariant bool, or a branch around floating-point code, keeps GCC
// from vectorizing those loops.

// Gradient penalties and options shared by both optimizers; per call
// (per param group), the same for every element.
struct GradientTransform {
  float grad_factor;  // 1 / grad_scale * clip coefficient (1 without either), negated for maximize
  float coupled_l2;   // SGD weight_decay, AdamW l2
  float l1_subgradient;  // l1 in subgradient mode, else 0
};

// The gradient transform of a call: grad_factor (1 / grad_scale times the
// clip coefficient, 1 without either) negated for maximize; the L1
// subgradient is off (0) in proximal mode, where the soft-threshold applies
// instead.
REGOPS_INLINE GradientTransform gradient_transform(double coupled_l2, double l1, bool proximal, bool maximize,
                                                   float grad_factor) {
  GradientTransform t;
  t.grad_factor = maximize ? -grad_factor : grad_factor;
  t.coupled_l2 = static_cast<float>(coupled_l2);
  t.l1_subgradient = proximal ? 0.0f : static_cast<float>(l1);
  return t;
}

// value where keep is true, else +0 (also for a NaN or inf value), without
// a branch or a floating-point select: an AND of the bits.
REGOPS_INLINE float keep_if(float value, bool keep) {
  uint32_t bits;
  memcpy(&bits, &value, sizeof(bits));
  bits &= keep ? 0xffffffffu : 0u;
  memcpy(&value, &bits, sizeof(value));
  return value;
}

// kCoupledL2, kL1Subgradient and kL1Proximal say whether the loop computes
// the coupled L2 term, the L1 subgradient and the soft-threshold at all. The
// CUDA kernels keep all three (a zero coefficient is masked away at a cost
// that does not matter there); the CPU loops are compiled for each
// combination that can occur, so a term that is off costs no instructions
// (on one core the bfloat16 loops are compute-bound).
template <bool kCoupledL2 = true, bool kL1Subgradient = true>
REGOPS_INLINE float transformed_gradient(float g, float p, const GradientTransform& t) {
  g *= t.grad_factor;
  // A zero coefficient drops its term, as torch skips weight_decay == 0: with
  // 0 * p an inf parameter would turn the gradient (and the momentum buffer)
  // into NaN where torch keeps the parameter at inf. The term is masked with
  // bits rather than skipped with a branch, which keeps the loops vectorized.
  if (kCoupledL2) g += keep_if(t.coupled_l2 * p, t.coupled_l2 != 0.0f);
  // l1 * sign(p) as copysign(l1, p) where p is nonzero, else +0: the same
  // bits as the product with torch.sign (0 for +-0; a NaN p gives 0 here, it
  // poisons p anyway) in three vector instructions instead of eight, which
  // the compute-bound bfloat16 loops notice.
  if (kL1Subgradient) g += keep_if(copysignf(t.l1_subgradient, p), (fabsf(p) > 0.0f) & (t.l1_subgradient != 0.0f));
  return g;
}

struct SGDCoefficients {
  GradientTransform gradient;
  float lr;
  float momentum;
  bool has_momentum;   // momentum != 0: there is a momentum buffer
  float one_minus_dampening;
  float l1_threshold;  // lr * l1 in proximal mode, else 0 (soft-thresholding by 0 returns p exactly)
  bool nesterov;
  bool first_step;     // the momentum buffer takes the gradient as is (torch's buf = grad.clone())
};

// One element of SGD. buffer is ignored when momentum == 0.
template <bool kCoupledL2 = true, bool kL1Subgradient = true, bool kL1Proximal = true>
REGOPS_INLINE void sgd_update(float& p, float grad, float& buffer, const SGDCoefficients& c) {
  float g = transformed_gradient<kCoupledL2, kL1Subgradient>(grad, p, c.gradient);
  if (c.has_momentum) {
    buffer = c.first_step ? g : buffer * c.momentum + c.one_minus_dampening * g;
    g = c.nesterov ? g + c.momentum * buffer : buffer;
  }
  p = p - c.lr * g;
  if (kL1Proximal) p = soft_threshold(p, c.l1_threshold);
}

struct AdamWCoefficients {
  GradientTransform gradient;
  float lr;
  LerpWeight exp_avg_weight;  // of 1 - beta1; 1 - beta1 and 1 - beta2 rounded once from double, as torch passes them
  float beta2;
  float one_minus_beta2;
  float eps;
  float decay_factor;           // 1 - lr * weight_decay (decoupled decay)
  float step_size;              // lr / (1 - beta1^step)
  float bias_correction2_sqrt;  // sqrt(1 - beta2^step)
  float l1_threshold;           // lr * l1 in proximal mode, else 0
  bool amsgrad;
};

// The coefficients of one tensor at step `step` (after this step's
// increment), computed in double as torch computes them on the host; on the
// CPU once per tensor and call, in the CUDA kernel by each thread (the step
// count and lr may live on the device). grad_factor is 1 / grad_scale times
// the clip coefficient.
REGOPS_INLINE AdamWCoefficients adamw_coefficients(double lr, double beta1, double beta2, double eps,
                                                   double weight_decay, double l2, double l1, bool proximal,
                                                   bool amsgrad, bool maximize, double step, float grad_factor) {
  AdamWCoefficients c;
  c.gradient = gradient_transform(l2, l1, proximal, maximize, grad_factor);
  c.lr = static_cast<float>(lr);
  c.exp_avg_weight = lerp_weight(static_cast<float>(1.0 - beta1));
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  c.eps = static_cast<float>(eps);
  c.decay_factor = static_cast<float>(1.0 - lr * weight_decay);
  c.step_size = static_cast<float>(lr / (1.0 - pow(beta1, step)));
  c.bias_correction2_sqrt = static_cast<float>(sqrt(1.0 - pow(beta2, step)));
  c.l1_threshold = proximal ? static_cast<float>(lr * l1) : 0.0f;
  c.amsgrad = amsgrad;
  return c;
}

// One element of AdamW. max_exp_avg_sq is ignored unless amsgrad.
template <bool kCoupledL2 = true, bool kL1Subgradient = true, bool kL1Proximal = true>
REGOPS_INLINE void adamw_update(float& p, float grad, float& exp_avg, float& exp_avg_sq, float& max_exp_avg_sq,
                                const AdamWCoefficients& c) {
  const float g = transformed_gradient<kCoupledL2, kL1Subgradient>(grad, p, c.gradient);
  p = p * c.decay_factor;
  exp_avg = lerp_like_torch(exp_avg, g, c.exp_avg_weight);
  exp_avg_sq = exp_avg_sq * c.beta2 + c.one_minus_beta2 * g * g;  // torch's mul_(beta2).addcmul_(g, g, 1 - beta2)
  float second = exp_avg_sq;
  if (c.amsgrad) {  // constant in the CPU loops, which are compiled with and without amsgrad
    max_exp_avg_sq = max_exp_avg_sq > exp_avg_sq ? max_exp_avg_sq : exp_avg_sq;
    second = max_exp_avg_sq;
  }
  const float denom = sqrtf(second) / c.bias_correction2_sqrt + c.eps;
  p = p - c.step_size * (exp_avg / denom);
  if (kL1Proximal) p = soft_threshold(p, c.l1_threshold);
}

}  // namespace regops
