// The element updates of the penalized SGD and AdamW optimizers, written once
// for the CPU kernel (g++) and the CUDA kernel (nvcc). The math is float32
// (Real = float) for float32, float16 and bfloat16 parameters, which are
// loaded from their storage dtype by the callers and rounded once on store;
// the CPU kernel runs float64 parameters with Real = double, as torch
// computes them.
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

// fabs, copysign and sqrt of the math type.
REGOPS_INLINE float abs_of(float x) { return fabsf(x); }
REGOPS_INLINE double abs_of(double x) { return fabs(x); }
REGOPS_INLINE float copysign_of(float x, float sign) { return copysignf(x, sign); }
REGOPS_INLINE double copysign_of(double x, double sign) { return copysign(x, sign); }
REGOPS_INLINE float sqrt_of(float x) { return sqrtf(x); }
REGOPS_INLINE double sqrt_of(double x) { return sqrt(x); }

// a * b rounded on its own, never fused with a following addition into a
// multiply-add: nvcc contracts a * b + c into an FMA by default, which
// rounds once where the reference (and the CPU kernel, compiled without
// contraction) rounds twice, so that stochastic rounding of the result would
// draw different bits on a GPU. __fmul_rn and __dmul_rn are never contracted.
template <typename Real>
REGOPS_INLINE Real mul_rn(Real a, Real b) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(Real) == sizeof(float)) {
    return __fmul_rn(a, b);
  } else {
    return __dmul_rn(a, b);
  }
#else
  return a * b;
#endif
}

// The proximal operator of lr * l1 * |p|: soft-thresholding. Exact zeros for
// |p| <= threshold; copysign keeps it branch-free; a NaN stays NaN.
template <typename Real>
REGOPS_INLINE Real soft_threshold(Real p, Real threshold) {
  const Real shrunk = abs_of(p) - threshold;
  return copysign_of(shrunk < Real(0) ? Real(0) : shrunk, p);
}

// torch.lerp(start, end, weight) as ATen computes it (aten/src/ATen/native/Lerp.h:
// start + weight * (end - start) for |weight| < 0.5, else
// end - (end - start) * (1 - weight)), so exp_avg matches torch's
// exp_avg.lerp_(grad, 1 - beta1). The choice depends only on the weight, so
// it is made once per call (LerpWeight) and the element formula is
// base + factor * (end - start) with base selected from loaded values;
// weight - 1 == -(1 - weight) exactly.
template <typename Real = float>
struct LerpWeightT {
  Real factor;      // weight, or weight - 1
  bool from_start;  // |weight| < 0.5
};
using LerpWeight = LerpWeightT<>;

template <typename Real>
REGOPS_INLINE LerpWeightT<Real> lerp_weight(Real weight) {
  const bool from_start = abs_of(weight) < Real(0.5);
  return {from_start ? weight : weight - Real(1), from_start};
}

template <typename Real>
REGOPS_INLINE Real lerp_like_torch(Real start, Real end, LerpWeightT<Real> w) {
  return (w.from_start ? start : end) + mul_rn(w.factor, end - start);
}

// Options are folded into arithmetic (maximize into the sign of
// grad_factor, a disabled proximal step into a threshold of 0, which returns
// p bit for bit) or are compile-time constants in the CPU loops (momentum,
// first_step, nesterov, amsgrad, the lerp formula): a select on a
// loop-invariant bool, or a branch around floating-point code, keeps GCC
// from vectorizing those loops.

// Gradient penalties and options shared by both optimizers; per call
// (per param group), the same for every element.
template <typename Real = float>
struct GradientTransformT {
  Real grad_factor;     // 1 / grad_scale * clip coefficient (1 without either), negated for maximize
  Real coupled_l2;      // SGD weight_decay, AdamW l2
  Real l1_subgradient;  // l1 in subgradient mode, else 0
};
using GradientTransform = GradientTransformT<>;

// The gradient transform of a call: grad_factor (1 / grad_scale times the
// clip coefficient, 1 without either) negated for maximize; the L1
// subgradient is off (0) in proximal mode, where the soft-threshold applies
// instead.
template <typename Real = float>
REGOPS_INLINE GradientTransformT<Real> gradient_transform(double coupled_l2, double l1, bool proximal, bool maximize,
                                                          float grad_factor) {
  GradientTransformT<Real> t;
  t.grad_factor = maximize ? -Real(grad_factor) : Real(grad_factor);
  t.coupled_l2 = static_cast<Real>(coupled_l2);
  t.l1_subgradient = proximal ? Real(0) : static_cast<Real>(l1);
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

REGOPS_INLINE double keep_if(double value, bool keep) {
  uint64_t bits;
  memcpy(&bits, &value, sizeof(bits));
  bits &= keep ? ~uint64_t{0} : uint64_t{0};
  memcpy(&value, &bits, sizeof(value));
  return value;
}

// kCoupledL2, kL1Subgradient and kL1Proximal say whether the loop computes
// the coupled L2 term, the L1 subgradient and the soft-threshold at all. The
// CUDA kernels keep all three (a zero coefficient is masked away at a cost
// that does not matter there); the CPU loops are compiled for each
// combination that can occur, so a term that is off costs no instructions
// (on one core the bfloat16 loops are compute-bound).
template <bool kCoupledL2 = true, bool kL1Subgradient = true, typename Real>
REGOPS_INLINE Real transformed_gradient(Real g, Real p, const GradientTransformT<Real>& t) {
  g *= t.grad_factor;
  // A zero coefficient drops its term, as torch skips weight_decay == 0: with
  // 0 * p an inf parameter would turn the gradient (and the momentum buffer)
  // into NaN where torch keeps the parameter at inf. The term is masked with
  // bits rather than skipped with a branch, which keeps the loops vectorized.
  if (kCoupledL2) g += keep_if(mul_rn(t.coupled_l2, p), t.coupled_l2 != Real(0));
  // l1 * sign(p) as copysign(l1, p) where p is nonzero, else +0: the same
  // bits as the product with torch.sign (0 for +-0; a NaN p gives 0 here, it
  // poisons p anyway) in three vector instructions instead of eight, which
  // the compute-bound bfloat16 loops notice.
  if (kL1Subgradient) {
    g += keep_if(copysign_of(t.l1_subgradient, p), (abs_of(p) > Real(0)) & (t.l1_subgradient != Real(0)));
  }
  return g;
}

template <typename Real = float>
struct SGDCoefficientsT {
  GradientTransformT<Real> gradient;
  Real lr;
  Real momentum;
  bool has_momentum;   // momentum != 0: there is a momentum buffer
  Real one_minus_dampening;
  Real l1_threshold;   // lr * l1 in proximal mode, else 0 (soft-thresholding by 0 returns p exactly)
  bool nesterov;
  bool first_step;     // the momentum buffer takes the gradient as is (torch's buf = grad.clone())
};
using SGDCoefficients = SGDCoefficientsT<>;

// One element of SGD. buffer is ignored when momentum == 0.
template <bool kCoupledL2 = true, bool kL1Subgradient = true, bool kL1Proximal = true, typename Real>
REGOPS_INLINE void sgd_update(Real& p, Real grad, Real& buffer, const SGDCoefficientsT<Real>& c) {
  Real g = transformed_gradient<kCoupledL2, kL1Subgradient>(grad, p, c.gradient);
  if (c.has_momentum) {
    buffer = c.first_step ? g : mul_rn(buffer, c.momentum) + mul_rn(c.one_minus_dampening, g);
    g = c.nesterov ? g + mul_rn(c.momentum, buffer) : buffer;
  }
  p = p - mul_rn(c.lr, g);
  if (kL1Proximal) p = soft_threshold(p, c.l1_threshold);
}

template <typename Real = float>
struct AdamWCoefficientsT {
  GradientTransformT<Real> gradient;
  Real lr;
  LerpWeightT<Real> exp_avg_weight;  // of 1 - beta1; 1 - beta1 and 1 - beta2 rounded once from double, as torch passes them
  Real beta2;
  Real one_minus_beta2;
  Real eps;
  Real decay_factor;           // 1 - lr * weight_decay (decoupled decay)
  Real step_size;              // lr / (1 - beta1^step)
  Real bias_correction2_sqrt;  // sqrt(1 - beta2^step)
  Real l1_threshold;           // lr * l1 in proximal mode, else 0
  bool amsgrad;
};
using AdamWCoefficients = AdamWCoefficientsT<>;

// The coefficients of one tensor at step `step` (after this step's
// increment), computed in double as torch computes them on the host; on the
// CPU once per tensor and call, in the CUDA kernel by each thread (the step
// count and lr may live on the device). grad_factor is 1 / grad_scale times
// the clip coefficient.
template <typename Real = float>
REGOPS_INLINE AdamWCoefficientsT<Real> adamw_coefficients(double lr, double beta1, double beta2, double eps,
                                                          double weight_decay, double l2, double l1, bool proximal,
                                                          bool amsgrad, bool maximize, double step,
                                                          float grad_factor) {
  AdamWCoefficientsT<Real> c;
  c.gradient = gradient_transform<Real>(l2, l1, proximal, maximize, grad_factor);
  c.lr = static_cast<Real>(lr);
  c.exp_avg_weight = lerp_weight(static_cast<Real>(1.0 - beta1));
  c.beta2 = static_cast<Real>(beta2);
  c.one_minus_beta2 = static_cast<Real>(1.0 - beta2);
  c.eps = static_cast<Real>(eps);
  c.decay_factor = static_cast<Real>(1.0 - lr * weight_decay);
  c.step_size = static_cast<Real>(lr / (1.0 - pow(beta1, step)));
  c.bias_correction2_sqrt = static_cast<Real>(sqrt(1.0 - pow(beta2, step)));
  c.l1_threshold = proximal ? static_cast<Real>(lr * l1) : Real(0);
  c.amsgrad = amsgrad;
  return c;
}

// One element of AdamW. max_exp_avg_sq is ignored unless amsgrad.
template <bool kCoupledL2 = true, bool kL1Subgradient = true, bool kL1Proximal = true, typename Real>
REGOPS_INLINE void adamw_update(Real& p, Real grad, Real& exp_avg, Real& exp_avg_sq, Real& max_exp_avg_sq,
                                const AdamWCoefficientsT<Real>& c) {
  const Real g = transformed_gradient<kCoupledL2, kL1Subgradient>(grad, p, c.gradient);
  p = p * c.decay_factor;
  exp_avg = lerp_like_torch(exp_avg, g, c.exp_avg_weight);
  exp_avg_sq = mul_rn(exp_avg_sq, c.beta2) + mul_rn(mul_rn(c.one_minus_beta2, g), g);  // torch's mul_(beta2).addcmul_(g, g, 1 - beta2)
  Real second = exp_avg_sq;
  if (c.amsgrad) {  // constant in the CPU loops, which are compiled with and without amsgrad
    max_exp_avg_sq = max_exp_avg_sq > exp_avg_sq ? max_exp_avg_sq : exp_avg_sq;
    second = max_exp_avg_sq;
  }
  const Real denom = sqrt_of(second) / c.bias_correction2_sqrt + c.eps;
  p = p - mul_rn(c.step_size, exp_avg / denom);
  if (kL1Proximal) p = soft_threshold(p, c.l1_threshold);
}

}  // namespace regops
