// Batch normalization on the CPU, both memory layouts without a transposing
// copy (see BatchNormGeometry in regops/batch_norm_host.h):
//
// - spatial-inner (contiguous NCHW): a channel is N runs of S contiguous
//   elements. Work is split by channel, and the fused forward and backward
//   finish one channel (reduce, then the elementwise pass) before the next:
//   a channel's N * S elements (100 KB at N 32, 28x28, float32) are still in
//   L2 for the second pass, which then costs no memory traffic.
// - channel-inner (channels_last, or S == 1): every row of C channels is
//   contiguous. Rows are split into a fixed number of groups; each group keeps
//   per-channel partials (Welford, or plain sums for the backward) and the
//   innermost loops run along the channels, so they vectorize with no
//   horizontal reduction. Groups are merged in a fixed order, so the result
//   does not depend on the number of threads.
//
// Statistics: each run of elements (a row chunk, or a tile of rows for each
// channel) is reduced in one vectorized pass of shifted sums, sum(x - s) and
// sum((x - s)^2) with s the mean so far (which keeps the squares from
// cancelling); runs are combined with the Welford merge of regops/welford.h.
// The hot functions are compiled for AVX-512 and AVX2 as well and the loader
// picks what the processor has; bfloat16 has AVX512-BF16 paths (rounding 16
// values per instruction) where the processor offers them.
#include "regops/aten.h"
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <immintrin.h>
#include <type_traits>
#include <utility>
#include <vector>

#include "regops/batch_norm_host.h"
#include "regops/bfloat16.h"
#include "regops/cpu_memory.h"
#include "regops/welford.h"


namespace regops {
namespace {

// f(std::true_type{}) or f(std::false_type{}): a runtime flag (the fused
// ReLU) as the template argument of the loop f instantiates.
template <typename F>
REGOPS_ALWAYS_INLINE decltype(auto) with_flag(bool flag, F&& f) {
  return flag ? f(std::true_type{}) : f(std::false_type{});
}

// row_fn(offset, c, length) for the rows [first_row, end_row) of the
// input's working layout: a row's first element, its channel (0 for a row
// of channels) and its length.
template <typename RowFn>
REGOPS_ALWAYS_INLINE void for_rows(const BatchNormGeometry& g, int64_t first_row, int64_t end_row, RowFn&& row_fn) {
  const int64_t length = g.channels_inner ? g.channels : g.spatial;
  for (int64_t row = first_row; row < end_row; ++row) {
    row_fn(row * length, g.channels_inner ? 0 : row % g.channels, length);
  }
}

// Spatial-inner runs longer than this are reduced in pieces, each shifted by
// the mean of the pieces before it.
constexpr int64_t kRunElements = 4096;
// Channel-inner tiles: rows of about this many elements are reduced with one
// shift per channel before their partial is merged and the shift updated.
constexpr int64_t kTileElements = 16384;
// Channel-inner reductions are split into at most this many row groups:
// enough for any thread count here, few enough that merging them is free.
constexpr int64_t kMaxGroups = 64;
// Rows (of either layout) per parallel task of the elementwise passes.
constexpr int64_t kElementsPerTask = 32768;

template <typename scalar_t, typename acc_t>
REGOPS_ALWAYS_INLINE acc_t load(scalar_t value) {
  return static_cast<acc_t>(value);
}

// float -> storage type; bfloat16 through bfloat16_bits_nearest, whose
// branch-free rounding keeps the loops storing it vectorized.
template <typename scalar_t, typename acc_t>
REGOPS_ALWAYS_INLINE scalar_t store(acc_t value) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    return c10::BFloat16(bfloat16_bits_nearest(value), c10::BFloat16::from_bits());
  } else {
    return static_cast<scalar_t>(value);
  }
}

// The float -> bfloat16 rounding above costs more than the memory traffic of
// an elementwise pass; AVX512-BF16 processors round 16 values in one
// instruction (VCVTNEPS2BF16: nearest even like c10, NaN kept quiet; it
// treats float denormals as zero, far below anything batch norm produces).
bool cpu_has_avx512_bf16() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
  }();
  return has;
}

__attribute__((target("avx512f,avx512bf16,avx512vl,avx512bw")))
void store_bfloat16_avx512(const float* in, c10::BFloat16* out, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256bh rounded = _mm512_cvtneps_pbh(_mm512_loadu_ps(in + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), reinterpret_cast<__m256i>(rounded));
  }
  for (; i < n; ++i) out[i] = store<c10::BFloat16, float>(in[i]);
}

// GCC 12's own AVX-512 headers trip its uninitialized-value warnings.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// bfloat16 runs of the spatial-inner forward, written with 512-bit
// intrinsics (GCC's auto-vectorizer stops at 256 bits for generic tuning):
// the statistics pass and the normalize pass of the hard case, bfloat16 NCHW.
__attribute__((target("avx512f,avx512bf16,avx512vl,avx512bw")))
inline __m512 load_bfloat16x16(const c10::BFloat16* in) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Shifted sums of a run as in run_statistics: (sum(x - shift), sum((x - shift)^2)).
__attribute__((target("avx512f,avx512bf16,avx512vl,avx512bw")))
void bfloat16_shifted_sums_avx512(const c10::BFloat16* x, int64_t n, float shift, float* sum_out, float* squares_out) {
  const __m512 s = _mm512_set1_ps(shift);
  __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
  __m512 sq0 = _mm512_setzero_ps(), sq1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m512 d0 = _mm512_sub_ps(load_bfloat16x16(x + i), s);
    const __m512 d1 = _mm512_sub_ps(load_bfloat16x16(x + i + 16), s);
    sum0 = _mm512_add_ps(sum0, d0);
    sum1 = _mm512_add_ps(sum1, d1);
    sq0 = _mm512_fmadd_ps(d0, d0, sq0);
    sq1 = _mm512_fmadd_ps(d1, d1, sq1);
  }
  float sum = _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1));
  float squares = _mm512_reduce_add_ps(_mm512_add_ps(sq0, sq1));
  for (; i < n; ++i) {
    const float d = static_cast<float>(x[i]) - shift;
    sum += d;
    squares += d * d;
  }
  *sum_out = sum;
  *squares_out = squares;
}

__attribute__((target("avx512f,avx512bf16,avx512vl,avx512bw")))
void bfloat16_normalize_avx512(const c10::BFloat16* x, c10::BFloat16* y, int64_t n, float scale, float shift,
                               bool relu) {
  const __m512 a = _mm512_set1_ps(scale), b = _mm512_set1_ps(shift), zero = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m512 v = _mm512_fmadd_ps(load_bfloat16x16(x + i), a, b);
    if (relu) v = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ), v, zero);  // keeps NaN
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
  }
  const BatchNormAffine<float> affine{scale, shift};
  for (; i < n; ++i) y[i] = store<c10::BFloat16, float>(batch_norm_normalize(static_cast<float>(x[i]), affine, relu));
}

#pragma GCC diagnostic pop

// Elements per staging buffer of compute_and_store: 1 KB of float, in L1.
constexpr int64_t kStageElements = 256;

// out[i] = compute(i) for i < n, cast to the storage type: straight in a
// vectorized loop, or for bfloat16 on AVX512-BF16 processors through a float
// staging buffer rounded 16 values per instruction.
template <typename scalar_t, typename acc_t, typename Compute>
REGOPS_ALWAYS_INLINE void compute_and_store(scalar_t* __restrict__ out, int64_t n, bool fast_bfloat16,
                                            Compute compute) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (fast_bfloat16) {
      float staged[kStageElements];
      for (int64_t start = 0; start < n; start += kStageElements) {
        const int64_t count = std::min(kStageElements, n - start);
#pragma omp simd
        for (int64_t i = 0; i < count; ++i) staged[i] = compute(start + i);
        store_bfloat16_avx512(staged, out + start, count);
      }
      return;
    }
  }
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = store<scalar_t, acc_t>(compute(i));
}

// ---- runs of contiguous elements of one channel (spatial-inner) --------------

// Independent accumulators per loop step: enough vector registers in
// flight to hide the latency of the adds.
constexpr int64_t kLanes = 32;

// Welford partial of one run in a single pass: sums of (x - shift) and
// (x - shift)^2 in kLanes independent lanes, with shift an estimate of the
// mean (the channel's mean so far, or the run's first element). Shifting
// keeps the squares small, so sum((x - s)^2) - sum(x - s)^2 / n does not
// cancel catastrophically the way E[x^2] - E[x]^2 does.
template <typename scalar_t, typename acc_t>
REGOPS_ALWAYS_INLINE Welford<acc_t> run_statistics(const scalar_t* __restrict__ x, int64_t n, acc_t shift) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (cpu_has_avx512_bf16()) {
      float sum, squares;
      bfloat16_shifted_sums_avx512(x, n, shift, &sum, &squares);
      const float mean_offset = sum / static_cast<float>(n);
      return Welford<acc_t>{shift + mean_offset, clamp_m2(squares - sum * mean_offset), n};
    }
  }
  acc_t lane_sum[kLanes] = {}, lane_squares[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const acc_t d = load<scalar_t, acc_t>(x[i + j]) - shift;
      lane_sum[j] += d;
      lane_squares[j] += d * d;
    }
  }
  for (int64_t j = 0; i + j < n; ++j) {
    const acc_t d = load<scalar_t, acc_t>(x[i + j]) - shift;
    lane_sum[j] += d;
    lane_squares[j] += d * d;
  }
  acc_t sum = 0, squares = 0;
  for (int64_t j = 0; j < kLanes; ++j) {
    sum += lane_sum[j];
    squares += lane_squares[j];
  }
  const acc_t mean_offset = sum / static_cast<acc_t>(n);
  return Welford<acc_t>{shift + mean_offset, clamp_m2(squares - sum * mean_offset), n};
}

template <typename scalar_t, typename acc_t>
REGOPS_CPU_CLONES Welford<acc_t> channel_statistics(const scalar_t* x, BatchNormGeometry g, int64_t channel) {
  Welford<acc_t> total = welford_empty<acc_t>();
  for (int64_t n = 0; n < g.batch; ++n) {
    const scalar_t* row = x + (n * g.channels + channel) * g.spatial;
    for (int64_t start = 0; start < g.spatial; start += kRunElements) {
      const acc_t shift = welford_shift(total.count > 0 ? total.mean : load<scalar_t, acc_t>(row[start]));
      total = welford_merge(total, run_statistics<scalar_t, acc_t>(row + start, std::min(kRunElements, g.spatial - start), shift));
    }
  }
  return total;
}

template <bool kRelu, typename scalar_t, typename acc_t>
REGOPS_ALWAYS_INLINE void normalize_run(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t n,
                                        BatchNormAffine<acc_t> affine) {
  compute_and_store<scalar_t, acc_t>(y, n, cpu_has_avx512_bf16(), [=](int64_t i) {
    return batch_norm_normalize(load<scalar_t, acc_t>(x[i]), affine, kRelu);
  });
}

// Normalizes the runs [first_row, end_row) of (n, c) rows.
template <typename scalar_t, typename acc_t>
REGOPS_CPU_CLONES void normalize_runs(const scalar_t* x, scalar_t* y, BatchNormGeometry g, int64_t first_row,
                                        int64_t end_row, const BatchNormAffine<acc_t>* affine, bool relu) {
  for (int64_t row = first_row; row < end_row; ++row) {
    const int64_t offset = row * g.spatial;
    const BatchNormAffine<acc_t> channel_affine = affine[row % g.channels];
    with_flag(relu, [&](auto kRelu) {
      normalize_run<decltype(kRelu)::value>(x + offset, y + offset, g.spatial, channel_affine);
    });
  }
}

// Normalizes the N runs of one channel.
template <typename scalar_t, typename acc_t>
REGOPS_CPU_CLONES void normalize_channel(const scalar_t* x, scalar_t* y, BatchNormGeometry g, int64_t channel,
                                           BatchNormAffine<acc_t> affine, bool relu) {
  for (int64_t n = 0; n < g.batch; ++n) {
    const int64_t offset = (n * g.channels + channel) * g.spatial;
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (cpu_has_avx512_bf16()) {
        bfloat16_normalize_avx512(x + offset, y + offset, g.spatial, affine.scale, affine.shift, relu);
        continue;
      }
    }
    with_flag(relu, [&](auto kRelu) {
      normalize_run<decltype(kRelu)::value>(x + offset, y + offset, g.spatial, affine);
    });
  }
}

template <bool kRelu, typename scalar_t, typename acc_t>
REGOPS_ALWAYS_INLINE SumPair<acc_t> run_gradient_sums(const scalar_t* __restrict__ dy,
                                                           const scalar_t* __restrict__ x, int64_t n, acc_t mean,
                                                           BatchNormAffine<acc_t> affine) {
  acc_t sum_dy = 0, sum_dy_xmu = 0;
#pragma omp simd reduction(+ : sum_dy, sum_dy_xmu)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t xi = load<scalar_t, acc_t>(x[i]);
    const acc_t g = batch_norm_masked_grad(load<scalar_t, acc_t>(dy[i]), xi, affine, kRelu);
    sum_dy += g;
    sum_dy_xmu += g * (xi - mean);
  }
  return SumPair<acc_t>{sum_dy, sum_dy_xmu};
}

template <typename scalar_t, typename acc_t>
REGOPS_CPU_CLONES SumPair<acc_t> channel_gradient_sums(const scalar_t* dy, const scalar_t* x,
                                                              BatchNormGeometry g, int64_t channel, acc_t mean,
                                                              BatchNormAffine<acc_t> affine, bool relu) {
  SumPair<acc_t> total{0, 0};
  for (int64_t n = 0; n < g.batch; ++n) {
    const int64_t offset = (n * g.channels + channel) * g.spatial;
    const SumPair<acc_t> run = with_flag(relu, [&](auto kRelu) {
      return run_gradient_sums<decltype(kRelu)::value>(dy + offset, x + offset, g.spatial, mean, affine);
    });
    total = add_pairs(total, run);
  }
  return total;
}

// What the elementwise backward needs of a channel.
template <typename acc_t>
struct BackwardChannel {
  acc_t mean;
  BatchNormAffine<acc_t> affine;  // for the ReLU mask
  BatchNormBackwardCoefficients<acc_t> k;
};

template <bool kRelu, typename scalar_t, typename acc_t>
REGOPS_ALWAYS_INLINE void grad_input_run(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                         scalar_t* __restrict__ dx, int64_t n, BackwardChannel<acc_t> ch) {
  compute_and_store<scalar_t, acc_t>(dx, n, cpu_has_avx512_bf16(), [=](int64_t i) {
    const acc_t xi = load<scalar_t, acc_t>(x[i]);
    const acc_t g = batch_norm_masked_grad(load<scalar_t, acc_t>(dy[i]), xi, ch.affine, kRelu);
    return batch_norm_grad_input(g, xi, ch.mean, ch.k);
  });
}

template <typename scalar_t, typename acc_t>
REGOPS_CPU_CLONES void grad_input_runs(const scalar_t* dy, const scalar_t* x, scalar_t* dx, BatchNormGeometry g,
                                         int64_t first_row, int64_t end_row, const BackwardChannel<acc_t>* channels,
                                         bool relu) {
  for (int64_t row = first_row; row < end_row; ++row) {
    const int64_t offset = row * g.spatial;
    const BackwardChannel<acc_t> ch = channels[row % g.channels];
    with_flag(relu, [&](auto kRelu) {
      grad_input_run<decltype(kRelu)::value>(dy + offset, x + offset, dx + offset, g.spatial, ch);
    });
  }
}

template <typename scalar_t, typename acc_t>
REGOPS_CPU_CLONES void grad_input_channel(const scalar_t* dy, const scalar_t* x, scalar_t* dx, BatchNormGeometry g,
                                            int64_t channel, BackwardChannel<acc_t> ch, bool relu) {
  for (int64_t n = 0; n < g.batch; ++n) {
    const int64_t offset = (n * g.channels + channel) * g.spatial;
    with_flag(relu, [&](auto kRelu) {
      grad_input_run<decltype(kRelu)::value>(dy + offset, x + offset, dx + offset, g.spatial, ch);
    });
  }
}

// ---- rows of C channels (channel-inner) ---------------------------------------

// The row groups of a channel-inner reduction: fixed by the shape alone.
struct RowGroups {
  int64_t count;
  int64_t rows_per_group;
};

inline RowGroups row_groups(const BatchNormGeometry& g) {
  const int64_t rows = g.rows();
  const int64_t tile_rows = std::max<int64_t>(1, kTileElements / std::max<int64_t>(1, g.channels));
  const int64_t groups = std::max<int64_t>(1, std::min(kMaxGroups, (rows + tile_rows - 1) / tile_rows));
  return RowGroups{groups, (rows + groups - 1) / groups};
}

// Per-channel Welford partials (mean, m2; count = the rows) of rows
// [first_row, end_row): tiles of rows reduced in one pass along the channels
// as shifted sums (shift = the group's mean so far, first the first row),
// merged tile by tile. scratch holds 3 * C values.
template <typename scalar_t, typename acc_t>
REGOPS_CPU_CLONES void group_statistics(const scalar_t* x, int64_t channels, int64_t first_row, int64_t end_row,
                                          acc_t* __restrict__ mean, acc_t* __restrict__ m2,
                                          acc_t* __restrict__ scratch) {
  const int64_t tile_rows = std::max<int64_t>(1, kTileElements / channels);
  acc_t* __restrict__ tile_sum = scratch;
  acc_t* __restrict__ tile_squares = scratch + channels;
  acc_t* __restrict__ shift = scratch + 2 * channels;
  int64_t count = 0;
  for (int64_t c = 0; c < channels; ++c) {
    mean[c] = m2[c] = 0;
    shift[c] = welford_shift(load<scalar_t, acc_t>(x[first_row * channels + c]));
  }
  for (int64_t tile = first_row; tile < end_row; tile += tile_rows) {
    const int64_t rows = std::min(tile_rows, end_row - tile);
    for (int64_t c = 0; c < channels; ++c) tile_sum[c] = tile_squares[c] = 0;
    for (int64_t r = tile; r < tile + rows; ++r) {
      const scalar_t* __restrict__ row = x + r * channels;
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) {
        const acc_t d = load<scalar_t, acc_t>(row[c]) - shift[c];
        tile_sum[c] += d;
        tile_squares[c] += d * d;
      }
    }
    const acc_t inverse_rows = acc_t(1) / static_cast<acc_t>(rows);
    for (int64_t c = 0; c < channels; ++c) {
      const acc_t mean_offset = tile_sum[c] * inverse_rows;
      const Welford<acc_t> tile_stats{shift[c] + mean_offset,
                                      clamp_m2(tile_squares[c] - tile_sum[c] * mean_offset), rows};
      const Welford<acc_t> merged = welford_merge(Welford<acc_t>{mean[c], m2[c], count}, tile_stats);
      mean[c] = merged.mean;
      m2[c] = merged.m2;
      shift[c] = welford_shift(merged.mean);
    }
    count += rows;
  }
}

template <bool kRelu, typename scalar_t, typename acc_t>
REGOPS_ALWAYS_INLINE void normalize_row(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t channels,
                                        const acc_t* __restrict__ scale, const acc_t* __restrict__ shift) {
  compute_and_store<scalar_t, acc_t>(y, channels, cpu_has_avx512_bf16(), [=](int64_t c) {
    return batch_norm_normalize(load<scalar_t, acc_t>(x[c]), BatchNormAffine<acc_t>{scale[c], shift[c]}, kRelu);
  });
}

template <typename scalar_t, typename acc_t>
REGOPS_CPU_CLONES void normalize_rows(const scalar_t* x, scalar_t* y, int64_t channels, int64_t first_row,
                                        int64_t end_row, const acc_t* scale, const acc_t* shift, bool relu) {
  for (int64_t r = first_row; r < end_row; ++r) {
    with_flag(relu, [&](auto kRelu) {
      normalize_row<decltype(kRelu)::value>(x + r * channels, y + r * channels, channels, scale, shift);
    });
  }
}

// Per-channel arrays of the channel-inner backward, so its loops read
// contiguous coefficient vectors.
template <typename acc_t>
struct BackwardArrays {
  std::vector<acc_t> mean, scale, shift, dy_scale, xmu_scale, constant;
  explicit BackwardArrays(int64_t channels)
      : mean(channels), scale(channels), shift(channels), dy_scale(channels), xmu_scale(channels), constant(channels) {}
};

template <bool kRelu, typename scalar_t, typename acc_t>
REGOPS_ALWAYS_INLINE void group_gradient_sums_impl(const scalar_t* dy, const scalar_t* x, int64_t channels,
                                                   int64_t first_row, int64_t end_row, const acc_t* __restrict__ mean,
                                                   const acc_t* __restrict__ scale, const acc_t* __restrict__ shift,
                                                   acc_t* __restrict__ sum_dy, acc_t* __restrict__ sum_dy_xmu) {
  for (int64_t r = first_row; r < end_row; ++r) {
    const scalar_t* __restrict__ dy_row = dy + r * channels;
    const scalar_t* __restrict__ x_row = x + r * channels;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      const acc_t xi = load<scalar_t, acc_t>(x_row[c]);
      const acc_t g =
          batch_norm_masked_grad(load<scalar_t, acc_t>(dy_row[c]), xi, BatchNormAffine<acc_t>{scale[c], shift[c]}, kRelu);
      sum_dy[c] += g;
      sum_dy_xmu[c] += g * (xi - mean[c]);
    }
  }
}

template <typename scalar_t, typename acc_t>
REGOPS_CPU_CLONES void group_gradient_sums(const scalar_t* dy, const scalar_t* x, int64_t channels,
                                             int64_t first_row, int64_t end_row, const acc_t* mean, const acc_t* scale,
                                             const acc_t* shift, acc_t* sum_dy, acc_t* sum_dy_xmu, bool relu) {
  for (int64_t c = 0; c < channels; ++c) sum_dy[c] = sum_dy_xmu[c] = 0;
  with_flag(relu, [&](auto kRelu) {
    group_gradient_sums_impl<decltype(kRelu)::value>(dy, x, channels, first_row, end_row, mean, scale, shift, sum_dy, sum_dy_xmu);
  });
}

template <bool kRelu, typename scalar_t, typename acc_t>
REGOPS_ALWAYS_INLINE void grad_input_row(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                         scalar_t* __restrict__ dx, int64_t channels, const BackwardArrays<acc_t>& a) {
  const acc_t* __restrict__ mean = a.mean.data();
  const acc_t* __restrict__ scale = a.scale.data();
  const acc_t* __restrict__ shift = a.shift.data();
  const acc_t* __restrict__ dy_scale = a.dy_scale.data();
  const acc_t* __restrict__ xmu_scale = a.xmu_scale.data();
  const acc_t* __restrict__ constant = a.constant.data();
  compute_and_store<scalar_t, acc_t>(dx, channels, cpu_has_avx512_bf16(), [=](int64_t c) {
    const acc_t xi = load<scalar_t, acc_t>(x[c]);
    const acc_t g =
        batch_norm_masked_grad(load<scalar_t, acc_t>(dy[c]), xi, BatchNormAffine<acc_t>{scale[c], shift[c]}, kRelu);
    return batch_norm_grad_input(g, xi, mean[c],
                                 BatchNormBackwardCoefficients<acc_t>{dy_scale[c], xmu_scale[c], constant[c]});
  });
}

template <typename scalar_t, typename acc_t>
REGOPS_CPU_CLONES void grad_input_rows(const scalar_t* dy, const scalar_t* x, scalar_t* dx, int64_t channels,
                                         int64_t first_row, int64_t end_row, const BackwardArrays<acc_t>& arrays,
                                         bool relu) {
  for (int64_t r = first_row; r < end_row; ++r) {
    const int64_t offset = r * channels;
    with_flag(relu, [&](auto kRelu) {
      grad_input_row<decltype(kRelu)::value>(dy + offset, x + offset, dx + offset, channels, arrays);
    });
  }
}

// ---- with a residual: act(x * scale + shift + z) ----------------------------------
// Both layouts as rows in memory order: a spatial-inner row is S elements of
// channel row % C, a channel-inner row is the C channels. The forward adds z
// before the activation; the backward's first pass writes the masked dy
// (which is grad_residual) and the passes after it run on that, unmasked.

template <bool kRelu, typename scalar_t, typename acc_t>
REGOPS_ALWAYS_INLINE void normalize_residual_row(const scalar_t* __restrict__ x, const scalar_t* __restrict__ z,
                                                 scalar_t* __restrict__ y, int64_t n, const acc_t* __restrict__ scale,
                                                 const acc_t* __restrict__ shift, bool per_element) {
  if (per_element) {
    compute_and_store<scalar_t, acc_t>(y, n, cpu_has_avx512_bf16(), [=](int64_t c) {
      return batch_norm_normalize(load<scalar_t, acc_t>(x[c]), load<scalar_t, acc_t>(z[c]),
                                  BatchNormAffine<acc_t>{scale[c], shift[c]}, kRelu);
    });
  } else {
    const BatchNormAffine<acc_t> affine{scale[0], shift[0]};
    compute_and_store<scalar_t, acc_t>(y, n, cpu_has_avx512_bf16(), [=](int64_t i) {
      return batch_norm_normalize(load<scalar_t, acc_t>(x[i]), load<scalar_t, acc_t>(z[i]), affine, kRelu);
    });
  }
}

template <typename scalar_t, typename acc_t>
REGOPS_CPU_CLONES void normalize_residual_rows(const scalar_t* x, const scalar_t* z, scalar_t* y, BatchNormGeometry g,
                                                 int64_t first_row, int64_t end_row, const acc_t* scale,
                                                 const acc_t* shift, bool relu) {
  for_rows(g, first_row, end_row, [&](int64_t offset, int64_t c, int64_t length) {
    with_flag(relu, [&](auto kRelu) {
      normalize_residual_row<decltype(kRelu)::value>(x + offset, z + offset, y + offset, length, scale + c, shift + c,
                                                     g.channels_inner);
    });
  });
}

template <bool kRelu, typename scalar_t, typename acc_t>
REGOPS_ALWAYS_INLINE void masked_grad_row(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                          const scalar_t* __restrict__ z, scalar_t* __restrict__ dz, int64_t n,
                                          const acc_t* __restrict__ scale, const acc_t* __restrict__ shift,
                                          bool per_element) {
  if (per_element) {
    compute_and_store<scalar_t, acc_t>(dz, n, cpu_has_avx512_bf16(), [=](int64_t c) {
      return batch_norm_masked_grad(load<scalar_t, acc_t>(dy[c]), load<scalar_t, acc_t>(x[c]),
                                    load<scalar_t, acc_t>(z[c]), BatchNormAffine<acc_t>{scale[c], shift[c]}, kRelu);
    });
  } else {
    const BatchNormAffine<acc_t> affine{scale[0], shift[0]};
    compute_and_store<scalar_t, acc_t>(dz, n, cpu_has_avx512_bf16(), [=](int64_t i) {
      return batch_norm_masked_grad(load<scalar_t, acc_t>(dy[i]), load<scalar_t, acc_t>(x[i]),
                                    load<scalar_t, acc_t>(z[i]), affine, kRelu);
    });
  }
}

template <typename scalar_t, typename acc_t>
REGOPS_CPU_CLONES void masked_grad_rows(const scalar_t* dy, const scalar_t* x, const scalar_t* z, scalar_t* dz,
                                          BatchNormGeometry g, int64_t first_row, int64_t end_row, const acc_t* scale,
                                          const acc_t* shift, bool relu) {
  for_rows(g, first_row, end_row, [&](int64_t offset, int64_t c, int64_t length) {
    with_flag(relu, [&](auto kRelu) {
      masked_grad_row<decltype(kRelu)::value>(dy + offset, x + offset, z + offset, dz + offset, length, scale + c,
                                              shift + c, g.channels_inner);
    });
  });
}

// ---- whole passes ------------------------------------------------------------------

int64_t rows_per_task(const BatchNormGeometry& g) {
  const int64_t row_length = g.channels_inner ? g.channels : g.spatial;
  return std::max<int64_t>(1, kElementsPerTask / std::max<int64_t>(1, row_length));
}

// Per-channel Welford statistics of x (either layout).
template <typename scalar_t, typename acc_t>
std::vector<Welford<acc_t>> statistics(const scalar_t* x, const BatchNormGeometry& g) {
  std::vector<Welford<acc_t>> result(g.channels, welford_empty<acc_t>());
  if (!g.channels_inner) {
    at::parallel_for(0, g.channels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) result[c] = channel_statistics<scalar_t, acc_t>(x, g, c);
    });
    return result;
  }
  const RowGroups groups = row_groups(g);
  const int64_t rows = g.rows(), channels = g.channels;
  std::vector<acc_t> partial(groups.count * 2 * channels);
  at::parallel_for(0, groups.count, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(3 * channels);
    for (int64_t group = begin; group < end; ++group) {
      const int64_t first = group * groups.rows_per_group, last = std::min(rows, first + groups.rows_per_group);
      acc_t* out = partial.data() + group * 2 * channels;
      if (first < last) group_statistics<scalar_t, acc_t>(x, channels, first, last, out, out + channels, scratch.data());
    }
  });
  for (int64_t group = 0; group < groups.count; ++group) {
    const int64_t first = group * groups.rows_per_group, last = std::min(rows, first + groups.rows_per_group);
    if (first >= last) continue;
    const acc_t* in = partial.data() + group * 2 * channels;
    for (int64_t c = 0; c < channels; ++c) {
      result[c] = welford_merge(result[c], Welford<acc_t>{in[c], in[channels + c], last - first});
    }
  }
  return result;
}

// The per-channel scales and shifts as two arrays, for the channel-inner loops.
template <typename acc_t>
std::pair<std::vector<acc_t>, std::vector<acc_t>> affine_columns(const std::vector<BatchNormAffine<acc_t>>& affine) {
  std::pair<std::vector<acc_t>, std::vector<acc_t>> columns;
  columns.first.reserve(affine.size());
  columns.second.reserve(affine.size());
  for (const BatchNormAffine<acc_t>& channel : affine) {
    columns.first.push_back(channel.scale);
    columns.second.push_back(channel.shift);
  }
  return columns;
}

template <typename scalar_t, typename acc_t>
void normalize(const scalar_t* x, scalar_t* y, const BatchNormGeometry& g, const std::vector<BatchNormAffine<acc_t>>& affine,
               bool relu) {
  if (!g.channels_inner) {
    at::parallel_for(0, g.rows(), rows_per_task(g), [&](int64_t begin, int64_t end) {
      normalize_runs<scalar_t, acc_t>(x, y, g, begin, end, affine.data(), relu);
    });
    return;
  }
  const auto columns = affine_columns(affine);
  const std::vector<acc_t>& scale = columns.first;
  const std::vector<acc_t>& shift = columns.second;
  at::parallel_for(0, g.rows(), rows_per_task(g), [&](int64_t begin, int64_t end) {
    normalize_rows<scalar_t, acc_t>(x, y, g.channels, begin, end, scale.data(), shift.data(), relu);
  });
}

// act(x * scale + shift + z) in either layout.
template <typename scalar_t, typename acc_t>
void normalize_residual(const scalar_t* x, const scalar_t* z, scalar_t* y, const BatchNormGeometry& g,
                        const std::vector<BatchNormAffine<acc_t>>& affine, bool relu) {
  const auto columns = affine_columns(affine);
  const std::vector<acc_t>& scale = columns.first;
  const std::vector<acc_t>& shift = columns.second;
  at::parallel_for(0, g.rows(), rows_per_task(g), [&](int64_t begin, int64_t end) {
    normalize_residual_rows<scalar_t, acc_t>(x, z, y, g, begin, end, scale.data(), shift.data(), relu);
  });
}

// dz = dy where act(x * scale + shift + z) let the value through, in either layout.
template <typename scalar_t, typename acc_t>
void masked_grad(const scalar_t* dy, const scalar_t* x, const scalar_t* z, scalar_t* dz, const BatchNormGeometry& g,
                 const std::vector<BatchNormAffine<acc_t>>& affine, bool relu) {
  const auto columns = affine_columns(affine);
  const std::vector<acc_t>& scale = columns.first;
  const std::vector<acc_t>& shift = columns.second;
  at::parallel_for(0, g.rows(), rows_per_task(g), [&](int64_t begin, int64_t end) {
    masked_grad_rows<scalar_t, acc_t>(dy, x, z, dz, g, begin, end, scale.data(), shift.data(), relu);
  });
}

// Per-channel (sum_dy, sum_dy_xmu), channel-inner layout.
template <typename scalar_t, typename acc_t>
std::vector<SumPair<acc_t>> gradient_sums_rows(const scalar_t* dy, const scalar_t* x, const BatchNormGeometry& g,
                                                    const std::vector<acc_t>& mean,
                                                    const std::vector<BatchNormAffine<acc_t>>& affine, bool relu) {
  const int64_t channels = g.channels, rows = g.rows();
  const auto columns = affine_columns(affine);
  const std::vector<acc_t>& scale = columns.first;
  const std::vector<acc_t>& shift = columns.second;
  const RowGroups groups = row_groups(g);
  std::vector<acc_t> partial(groups.count * 2 * channels, acc_t(0));
  at::parallel_for(0, groups.count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t group = begin; group < end; ++group) {
      const int64_t first = group * groups.rows_per_group, last = std::min(rows, first + groups.rows_per_group);
      acc_t* out = partial.data() + group * 2 * channels;
      if (first < last) {
        group_gradient_sums<scalar_t, acc_t>(dy, x, channels, first, last, mean.data(), scale.data(), shift.data(), out,
                                             out + channels, relu);
      }
    }
  });
  std::vector<SumPair<acc_t>> result(channels, SumPair<acc_t>{0, 0});
  for (int64_t group = 0; group < groups.count; ++group) {
    const acc_t* in = partial.data() + group * 2 * channels;
    for (int64_t c = 0; c < channels; ++c) {
      result[c].first += in[c];
      result[c].second += in[channels + c];
    }
  }
  return result;
}

template <typename scalar_t, typename acc_t>
void grad_input(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const BatchNormGeometry& g,
                const std::vector<BackwardChannel<acc_t>>& channels, bool relu) {
  if (!g.channels_inner) {
    at::parallel_for(0, g.rows(), rows_per_task(g), [&](int64_t begin, int64_t end) {
      grad_input_runs<scalar_t, acc_t>(dy, x, dx, g, begin, end, channels.data(), relu);
    });
    return;
  }
  BackwardArrays<acc_t> arrays(g.channels);
  for (int64_t c = 0; c < g.channels; ++c) {
    arrays.mean[c] = channels[c].mean;
    arrays.scale[c] = channels[c].affine.scale;
    arrays.shift[c] = channels[c].affine.shift;
    arrays.dy_scale[c] = channels[c].k.dy_scale;
    arrays.xmu_scale[c] = channels[c].k.xmu_scale;
    arrays.constant[c] = channels[c].k.constant;
  }
  at::parallel_for(0, g.rows(), rows_per_task(g), [&](int64_t begin, int64_t end) {
    grad_input_rows<scalar_t, acc_t>(dy, x, dx, g.channels, begin, end, arrays, relu);
  });
}

// ---- host glue --------------------------------------------------------------------

// An output (or grad_input) in the working layout, huge-page backed.
at::Tensor empty_output(const at::Tensor& like) {
  at::Tensor out = at::empty_like(like);
  advise_huge_pages(out);
  return out;
}

template <typename acc_t>
std::vector<acc_t> channel_values(const std::optional<at::Tensor>& tensor, int64_t channels, acc_t fill) {
  std::vector<acc_t> values(channels, fill);
  if (has_tensor(tensor)) {
    const at::Tensor contiguous = tensor->contiguous();
    std::copy_n(contiguous.const_data_ptr<acc_t>(), channels, values.begin());
  }
  return values;
}

template <typename acc_t>
std::vector<acc_t> channel_values(const at::Tensor& tensor, int64_t channels) {
  return channel_values<acc_t>(std::optional<at::Tensor>(tensor), channels, acc_t(0));
}

template <typename acc_t>
at::Tensor to_tensor(const std::vector<acc_t>& values, const at::TensorOptions& options) {
  at::Tensor out = at::empty({static_cast<int64_t>(values.size())}, options);
  std::copy(values.begin(), values.end(), out.mutable_data_ptr<acc_t>());
  return out;
}

template <typename acc_t>
std::vector<BatchNormAffine<acc_t>> affines(const std::vector<acc_t>& mean, const std::vector<acc_t>& invstd,
                                            const std::vector<acc_t>& weight, const std::vector<acc_t>& bias) {
  std::vector<BatchNormAffine<acc_t>> result(mean.size());
  for (size_t c = 0; c < mean.size(); ++c) result[c] = batch_norm_affine(mean[c], invstd[c], weight[c], bias[c]);
  return result;
}

// The tag of the CPU kernels of the batch norm ops, which take the arguments
// BatchNormEntries has checked and prepared.
struct CpuBatchNorm {
  struct Guard {
    explicit Guard(const at::Device&) {}
  };
};

std::tuple<at::Tensor, at::Tensor> batch_norm_stats(CpuBatchNorm, const BatchNormInput& p) {
  at::Tensor mean, var;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "regops_batch_norm_stats_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto stats = statistics<scalar_t, acc_t>(p.input.const_data_ptr<scalar_t>(), p.geometry);
    std::vector<acc_t> m(stats.size()), v(stats.size());
    for (size_t c = 0; c < stats.size(); ++c) {
      m[c] = stats[c].mean;
      v[c] = welford_variance(stats[c]);
    }
    mean = to_tensor(m, accumulate_options(p.input));
    var = to_tensor(v, accumulate_options(p.input));
  });
  return {mean, var};
}

at::Tensor batch_norm_elementwise(CpuBatchNorm, const BatchNormInput& p, const NormalizationTensors& tensors,
                                  bool relu) {
  at::Tensor output = empty_output(p.input);
  if (p.input.numel() == 0) return output;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "regops_batch_norm_elementwise_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t channels = p.geometry.channels;
    const auto affine = affines(channel_values<acc_t>(tensors.mean, channels),
                                channel_values<acc_t>(tensors.invstd, channels),
                                channel_values<acc_t>(tensors.weight, channels, acc_t(1)),
                                channel_values<acc_t>(tensors.bias, channels, acc_t(0)));
    normalize<scalar_t, acc_t>(p.input.const_data_ptr<scalar_t>(), output.mutable_data_ptr<scalar_t>(), p.geometry,
                               affine, relu);
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_reduce(CpuBatchNorm, const BatchNormInput& p,
                                                              const at::Tensor& dy, const NormalizationTensors& tensors,
                                                              bool relu) {
  at::Tensor sum_dy, sum_dy_xmu;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "regops_batch_norm_backward_reduce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BatchNormGeometry& g = p.geometry;
    const auto mean_values = channel_values<acc_t>(tensors.mean, g.channels);
    const auto affine = affines(mean_values, channel_values<acc_t>(tensors.invstd, g.channels),
                                channel_values<acc_t>(tensors.weight, g.channels, acc_t(1)),
                                channel_values<acc_t>(tensors.bias, g.channels, acc_t(0)));
    const scalar_t* x = p.input.const_data_ptr<scalar_t>();
    const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
    std::vector<SumPair<acc_t>> sums(g.channels, SumPair<acc_t>{0, 0});  // (sum_dy, sum_dy_xmu) per channel
    if (p.input.numel() > 0) {
      if (g.channels_inner) {
        sums = gradient_sums_rows<scalar_t, acc_t>(dy_data, x, g, mean_values, affine, relu);
      } else {
        at::parallel_for(0, g.channels, 1, [&](int64_t begin, int64_t end) {
          for (int64_t c = begin; c < end; ++c) {
            sums[c] = channel_gradient_sums<scalar_t, acc_t>(dy_data, x, g, c, mean_values[c], affine[c], relu);
          }
        });
      }
    }
    std::vector<acc_t> sum_dy_values(g.channels), sum_dy_xmu_values(g.channels);
    for (int64_t c = 0; c < g.channels; ++c) {
      sum_dy_values[c] = sums[c].first;
      sum_dy_xmu_values[c] = sums[c].second;
    }
    sum_dy = to_tensor(sum_dy_values, accumulate_options(p.input));
    sum_dy_xmu = to_tensor(sum_dy_xmu_values, accumulate_options(p.input));
  });
  return {sum_dy, sum_dy_xmu};
}

at::Tensor batch_norm_backward_elementwise(CpuBatchNorm, const BatchNormInput& p, const at::Tensor& dy,
                                           const NormalizationTensors& tensors, const at::Tensor& sum_dy,
                                           const at::Tensor& sum_dy_xmu, int64_t count, bool relu) {
  at::Tensor grad_input_tensor = empty_output(p.input);
  if (p.input.numel() == 0) return grad_input_tensor;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "regops_batch_norm_backward_elementwise_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BatchNormGeometry& g = p.geometry;
    const auto mean_values = channel_values<acc_t>(tensors.mean, g.channels);
    const auto invstd_values = channel_values<acc_t>(tensors.invstd, g.channels);
    const auto weight_values = channel_values<acc_t>(tensors.weight, g.channels, acc_t(1));
    const auto affine = affines(mean_values, invstd_values, weight_values,
                                channel_values<acc_t>(tensors.bias, g.channels, acc_t(0)));
    const auto a = channel_values<acc_t>(sum_dy, g.channels);
    const auto b = channel_values<acc_t>(sum_dy_xmu, g.channels);
    std::vector<BackwardChannel<acc_t>> channels(g.channels);
    for (int64_t c = 0; c < g.channels; ++c) {
      channels[c] = BackwardChannel<acc_t>{
          mean_values[c], affine[c],
          batch_norm_backward_coefficients(invstd_values[c], weight_values[c], a[c], b[c], static_cast<acc_t>(count), true)};
    }
    grad_input<scalar_t, acc_t>(dy.const_data_ptr<scalar_t>(), p.input.const_data_ptr<scalar_t>(),
                                grad_input_tensor.mutable_data_ptr<scalar_t>(), g, channels, relu);
  });
  return grad_input_tensor;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_forward(
    CpuBatchNorm, const BatchNormInput& p, const at::Tensor& z, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double eps, bool relu) {
  const BatchNormGeometry& g = p.geometry;
  at::Tensor output = empty_output(p.input);
  const at::TensorOptions options = accumulate_options(p.input);
  at::Tensor save_mean, save_invstd, batch_var = at::empty({0}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "regops_batch_norm_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t channels = g.channels;
    const auto weight_values = channel_values<acc_t>(weight, channels, acc_t(1));
    const auto bias_values = channel_values<acc_t>(bias, channels, acc_t(0));
    const scalar_t* x = p.input.const_data_ptr<scalar_t>();
    scalar_t* y = output.mutable_data_ptr<scalar_t>();
    std::vector<acc_t> mean(channels), invstd(channels);
    if (!training) {
      mean = channel_values<acc_t>(*running_mean, channels);
      const auto var = channel_values<acc_t>(*running_var, channels);
      for (int64_t c = 0; c < channels; ++c) invstd[c] = acc_t(1) / std::sqrt(var[c] + static_cast<acc_t>(eps));
      if (p.input.numel() > 0 && z.defined()) {
        normalize_residual<scalar_t, acc_t>(x, z.const_data_ptr<scalar_t>(), y, g,
                                            affines(mean, invstd, weight_values, bias_values), relu);
      } else if (p.input.numel() > 0) {
        normalize<scalar_t, acc_t>(x, y, g, affines(mean, invstd, weight_values, bias_values), relu);
      }
    } else {
      std::vector<acc_t> var(channels, acc_t(0));
      if (z.defined()) {
        const auto stats = statistics<scalar_t, acc_t>(x, g);
        for (int64_t c = 0; c < channels; ++c) {
          mean[c] = stats[c].mean;
          var[c] = welford_variance(stats[c]);
          invstd[c] = acc_t(1) / std::sqrt(var[c] + static_cast<acc_t>(eps));
        }
        if (p.input.numel() > 0) {
          normalize_residual<scalar_t, acc_t>(x, z.const_data_ptr<scalar_t>(), y, g,
                                              affines(mean, invstd, weight_values, bias_values), relu);
        }
      } else if (g.channels_inner) {
        const auto stats = statistics<scalar_t, acc_t>(x, g);
        for (int64_t c = 0; c < channels; ++c) {
          mean[c] = stats[c].mean;
          var[c] = welford_variance(stats[c]);
          invstd[c] = acc_t(1) / std::sqrt(var[c] + static_cast<acc_t>(eps));
        }
        if (p.input.numel() > 0) normalize<scalar_t, acc_t>(x, y, g, affines(mean, invstd, weight_values, bias_values), relu);
      } else {
        // Statistics and normalization of one channel back to back: its
        // elements are still in L2 for the second pass.
        at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
          for (int64_t c = begin; c < end; ++c) {
            const Welford<acc_t> stats = channel_statistics<scalar_t, acc_t>(x, g, c);
            mean[c] = stats.mean;
            var[c] = welford_variance(stats);
            invstd[c] = acc_t(1) / std::sqrt(var[c] + static_cast<acc_t>(eps));
            const BatchNormAffine<acc_t> affine = batch_norm_affine(mean[c], invstd[c], weight_values[c], bias_values[c]);
            normalize_channel<scalar_t, acc_t>(x, y, g, c, affine, relu);
          }
        });
      }
      batch_var = to_tensor(var, options);
    }
    save_mean = to_tensor(mean, options);
    save_invstd = to_tensor(invstd, options);
  });
  return {output, save_mean, save_invstd, batch_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    CpuBatchNorm, const BatchNormInput& p, const at::Tensor& dy, const at::Tensor& z,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, bool relu) {
  const BatchNormGeometry& g = p.geometry;
  at::Tensor dx = empty_output(p.input);
  const at::TensorOptions options = accumulate_options(p.input);
  at::Tensor grad_weight, grad_bias;
  at::Tensor grad_residual = z.defined() ? empty_output(p.input) : at::empty({0}, p.input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "regops_batch_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t channels = g.channels;
    const auto mean = channel_values<acc_t>(save_mean, channels);
    const auto invstd = channel_values<acc_t>(save_invstd, channels);
    const auto weight_values = channel_values<acc_t>(weight, channels, acc_t(1));
    const auto affine = affines(mean, invstd, weight_values, channel_values<acc_t>(bias, channels, acc_t(0)));
    const scalar_t* x = p.input.const_data_ptr<scalar_t>();
    const scalar_t* dy_data = dy.const_data_ptr<scalar_t>();
    if (z.defined()) {
      // The masked dy is grad_residual, and what the passes below run on.
      if (p.input.numel() > 0) {
        masked_grad<scalar_t, acc_t>(dy_data, x, z.const_data_ptr<scalar_t>(),
                                     grad_residual.mutable_data_ptr<scalar_t>(), g, affine, relu);
      }
      dy_data = grad_residual.const_data_ptr<scalar_t>();
      relu = false;
    }
    scalar_t* dx_data = dx.mutable_data_ptr<scalar_t>();
    const acc_t count = static_cast<acc_t>(std::max<int64_t>(1, g.count_per_channel()));
    std::vector<SumPair<acc_t>> sums(channels, SumPair<acc_t>{0, 0});  // (sum_dy, sum_dy_xmu) per channel
    auto channel_for = [&](int64_t c) {
      return BackwardChannel<acc_t>{mean[c], affine[c],
                                    batch_norm_backward_coefficients(invstd[c], weight_values[c], sums[c].first,
                                                                     sums[c].second, count, training)};
    };
    if (p.input.numel() > 0 && g.channels_inner) {
      sums = gradient_sums_rows<scalar_t, acc_t>(dy_data, x, g, mean, affine, relu);
      std::vector<BackwardChannel<acc_t>> per_channel(channels);
      for (int64_t c = 0; c < channels; ++c) per_channel[c] = channel_for(c);
      grad_input<scalar_t, acc_t>(dy_data, x, dx_data, g, per_channel, relu);
    } else if (p.input.numel() > 0) {
      // Sums and grad_input of one channel back to back, as in the forward.
      at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
        for (int64_t c = begin; c < end; ++c) {
          sums[c] = channel_gradient_sums<scalar_t, acc_t>(dy_data, x, g, c, mean[c], affine[c], relu);
          grad_input_channel<scalar_t, acc_t>(dy_data, x, dx_data, g, c, channel_for(c), relu);
        }
      });
    }
    std::vector<acc_t> gw(channels), gb(channels);
    for (int64_t c = 0; c < channels; ++c) {
      gw[c] = sums[c].second * invstd[c];
      gb[c] = sums[c].first;
    }
    grad_weight = to_tensor(gw, options);
    grad_bias = to_tensor(gb, options);
  });
  return {dx, grad_weight, grad_bias, grad_residual};
}

}  // namespace

TORCH_LIBRARY_IMPL(regops, CPU, m) {
  register_batch_norm<CpuBatchNorm>(m);
}

}  // namespace regops
