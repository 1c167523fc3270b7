// Welford's running mean and sum of squared deviations (M2), and the merge
// of two such partials (Chan, Golub and LeVeque, "Updating formulae and a
// pairwise algorithm for computing sample variances", 1979). The CPU
// batch-norm statistics reduce vectorized runs as sums shifted by the mean
// so far and combine them with welford_merge; the Triton kernels follow the
// same formulas; the CUDA kernels sum deviations from one shift per channel
// (its first element, welford_shift) and finish with clamp_m2. Subtracting a (running) mean before
// squaring keeps the variance accurate when |mean| >> std, where the
// textbook E[x^2] - E[x]^2 loses every digit.
//
// Infinite values follow torch, whose mean is sum(x) / n and whose variance
// is the mean of (x - mean)^2: a partial holding +inf (or -inf) has that
// mean, one holding both has NaN, and the variance of any of them is NaN.
// Welford's updates alone would give NaN means (inf - inf in the delta).
#pragma once

#include <cstdint>
#include <limits>

#include "regops/macros.h"

namespace regops {

template <typename acc_t>
struct Welford {
  acc_t mean;
  acc_t m2;       // sum over the elements of (x - mean)^2
  int64_t count;  // int64: a channel may hold more than 2^24 elements
};

template <typename acc_t>
REGOPS_INLINE Welford<acc_t> welford_empty() {
  return Welford<acc_t>{acc_t(0), acc_t(0), 0};
}

// False for inf and NaN. Arithmetic rather than std::isfinite so that g++
// and nvcc compile the same expression (no fast-math flags are used).
template <typename acc_t>
REGOPS_INLINE bool welford_is_finite(acc_t value) {
  return value - value == acc_t(0);
}

// A partial whose mean is already non-finite, merged with a value or partial
// of mean `other`: the means add as the sums would (inf + finite = inf,
// inf + -inf = NaN) and the sum of squared deviations is NaN.
template <typename acc_t>
REGOPS_INLINE Welford<acc_t> welford_non_finite(acc_t mean, acc_t other, int64_t count) {
  return Welford<acc_t>{mean + other, std::numeric_limits<acc_t>::quiet_NaN(), count};
}

// The shift of a run of shifted sums: the mean so far or a first element when
// finite, else zero (x - inf would turn every finite element infinite).
template <typename acc_t>
REGOPS_INLINE acc_t welford_shift(acc_t estimate) {
  return welford_is_finite(estimate) ? estimate : acc_t(0);
}

// Adds one value.
template <typename acc_t>
REGOPS_INLINE Welford<acc_t> welford_update(Welford<acc_t> w, acc_t x) {
  if (!welford_is_finite(x) || !welford_is_finite(w.mean)) return welford_non_finite(w.mean, x, w.count + 1);
  w.count += 1;
  const acc_t delta = x - w.mean;
  w.mean += delta / static_cast<acc_t>(w.count);
  w.m2 += delta * (x - w.mean);
  return w;
}

// Combines the partials of two disjoint sets of values. Exact in real
// arithmetic, so any merge order gives the same statistics up to rounding.
template <typename acc_t>
REGOPS_INLINE Welford<acc_t> welford_merge(Welford<acc_t> a, Welford<acc_t> b) {
  if (a.count == 0) return b;
  if (b.count == 0) return a;
  const int64_t count = a.count + b.count;
  if (!welford_is_finite(a.mean) || !welford_is_finite(b.mean)) return welford_non_finite(a.mean, b.mean, count);
  const acc_t b_share = static_cast<acc_t>(b.count) / static_cast<acc_t>(count);
  const acc_t delta = b.mean - a.mean;
  return Welford<acc_t>{a.mean + delta * b_share, a.m2 + b.m2 + delta * delta * static_cast<acc_t>(a.count) * b_share,
                        count};
}

// Biased variance (M2 / n), what batch norm normalizes with.
template <typename acc_t>
REGOPS_INLINE acc_t welford_variance(Welford<acc_t> w) {
  return w.count > 0 ? w.m2 / static_cast<acc_t>(w.count) : acc_t(0);
}

// The sum of squared deviations recovered from shifted sums,
// sum((x - s)^2) - sum(x - s) * mean_offset, can round slightly below zero;
// clamp that to zero but keep a NaN (from a NaN or inf input) so that it
// propagates into the variance as in torch. std::max(0, NaN) would return 0.
template <typename acc_t>
REGOPS_INLINE acc_t clamp_m2(acc_t m2) {
  return m2 < acc_t(0) ? acc_t(0) : m2;
}

}  // namespace regops
