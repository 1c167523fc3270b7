// Welford's running mean and sum of squared deviations (M2), and the merge
// of two such partials (Chan, Golub and LeVeque, "Updating formulae and a
// pairwise algorithm for computing sample variances", 1979). Every batch-norm
// statistics kernel, CPU and CUDA, combines its partials with welford_merge:
// the CUDA threads add values with welford_update, the CPU kernels first
// reduce vectorized runs as sums shifted by the mean so far; the Triton
// kernels follow the same formulas. Subtracting a (running) mean before
// squaring keeps the variance accurate when |mean| >> std, where the
// textbook E[x^2] - E[x]^2 loses every digit.
#pragma once

#include <cstdint>

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

// Adds one value.
template <typename acc_t>
REGOPS_INLINE Welford<acc_t> welford_update(Welford<acc_t> w, acc_t x) {
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

}  // namespace regops
