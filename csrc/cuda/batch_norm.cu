// Batch normalization on CUDA, both memory layouts without a transposing copy.
//
// How the work is split (csrc/include/regops/batch_norm_launch.h has the
// arithmetic): every kernel runs on a grid (groups, slices) with grid.x a
// channel or a tile of channels, so each thread's channels are fixed for the
// whole kernel and no element needs channel arithmetic:
//   spatial-inner (contiguous NCHW, N rows of S elements per channel):
//     block (channel, slice); its threads form groups of row_threads, one
//     row per group (several short rows per block, one long row cut into
//     segments), walking the row in 16-byte vectors when S is a multiple of
//     the vector and every pointer is aligned, element by element otherwise;
//   channel-inner (channels_last, or S == 1: rows of C channels): block
//     (tile of channels, slice) of tile_threads x row_threads threads; a
//     thread owns one vector of consecutive channels and walks rows.
// Every loop has kUnroll independent loads of each input in flight.
//
// Reductions (statistics; the backward's sum(dy) and sum(dy * (x - mean)))
// write one partial per (channel, slice), merged in a fixed order within the
// block and then by a finalize kernel (a thread per channel), so the result
// does not depend on timing. Statistics are the sums of x - s and (x - s)^2
// with one shift s per channel (its first element), so partials add like
// plain sums, and the variance keeps its digits when |mean| >> std.
//
// The finalize kernels also compute each channel's coefficients once: the
// forward is y = act(x * scale + shift [+ z]) (one FMA, then the ReLU), the
// backward dx = a * g + b * (x - mean) + c, g being dy masked by the
// recomputed ReLU (csrc/include/regops/batch_norm.h).
//
// One pass or two: when every value of a channel (NCHW) or of a channel
// tile (channel-inner) fits in one block's registers, kUnroll vectors a
// thread (rows_fit_one_pass / channel_rows_fit_one_pass), the training
// forward is one kernel: the block loads its channels once, adds them in a
// fixed order, computes the coefficients and normalizes the values it holds.
// Otherwise the statistics are a reduction and a finalize kernel, and the
// normalize a second pass over x. Grid sizes of the two-pass kernels come
// from the occupancy API (blocks resident per SM times the SMs).
//
// Bytes per element: the one-pass forward reads x once and writes y; the
// two-pass forward reads x twice and writes y (plus z once with a residual
// in both); backward reads dy and x twice and writes dx (with a residual,
// the reduction also reads z and writes dz = g, which the second pass reads
// instead of dy). Everything uses int64 indices and runs on the current
// stream.
#include "regops/aten.h"
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "regops/batch_norm_host.h"
#include "regops/batch_norm_launch.h"
#include "regops/cuda_utils.cuh"
#include "regops/welford.h"

namespace regops {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;         // loads in flight per input per thread
constexpr int kSegmentPasses = 4;  // passes of a whole block over one segment of a long row
constexpr int kFinalizeThreads = 128;
// A reduction slice should own at least this many elements per thread, or
// the partials cost more than they save.
constexpr int64_t kMinElementsPerThread = 16;

template <typename scalar_t>
constexpr int vector_size() {
  return sizeof(scalar_t) >= 16 ? 1 : static_cast<int>(16 / sizeof(scalar_t));
}

// The loaded inputs of one vector position: kArrays vectors of kVec elements.
template <typename scalar_t, int kVec, int kArrays>
struct Loaded {
  AlignedVector<scalar_t, kVec> in[kArrays];
};

template <typename scalar_t, int kVec>
__device__ __forceinline__ AlignedVector<scalar_t, kVec> load_elements(const scalar_t* pointer) {
  return load_vector<AlignedVector<scalar_t, kVec>>(pointer);
}

// The vectors at offset of each array, in order: an op's load<kVec>.
template <typename scalar_t, int kVec, typename... Arrays>
__device__ __forceinline__ Loaded<scalar_t, kVec, sizeof...(Arrays)> load_arrays(int64_t offset, Arrays... arrays) {
  Loaded<scalar_t, kVec, sizeof...(Arrays)> l;
  int a = 0;
  ((l.in[a++] = load_elements<scalar_t, kVec>(arrays + offset)), ...);
  return l;
}

// out[e] = value(e) for the kVec elements at out, in one vector store.
template <int kVec, typename scalar_t, typename Value>
__device__ __forceinline__ void store_mapped(scalar_t* out, const Value& value) {
  AlignedVector<scalar_t, kVec> vector;
#pragma unroll
  for (int e = 0; e < kVec; ++e) vector.value[e] = static_cast<scalar_t>(value(e));
  store_vector(out, vector);
}

// Per-channel coefficient rows (C values each) of the elementwise passes.
enum ForwardRow { kScale = 0, kShift = 1, kForwardRows = 2 };
enum BackwardRow { kDyScale = 0, kXmuScale = 1, kConstant = 2, kMaskScale = 3, kMaskShift = 4, kBackwardRows = 5 };

struct NoState {};

// ---- what the passes do per vector (Ops) ------------------------------------------
// An op has Channel (its per-channel values, loaded once per thread), State
// (what a reduction accumulates per channel), channel(c), load<kVec>(offset)
// and process<kVec>(channels, loaded, offset, states).

template <typename scalar_t, typename acc_t, bool kResidual>
struct NormalizeOp {
  static constexpr int kArrays = kResidual ? 2 : 1;
  using Channel = BatchNormAffine<acc_t>;
  using State = NoState;
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ z;
  scalar_t* __restrict__ y;
  const acc_t* __restrict__ coefficients;  // kForwardRows x C
  int64_t channels;
  bool relu;

  __device__ __forceinline__ Channel channel(int64_t c) const {
    return Channel{coefficients[kScale * channels + c], coefficients[kShift * channels + c]};
  }
  template <int kVec>
  __device__ __forceinline__ Loaded<scalar_t, kVec, kArrays> load(int64_t offset) const {
    if constexpr (kResidual) {
      return load_arrays<scalar_t, kVec>(offset, x, z);
    } else {
      return load_arrays<scalar_t, kVec>(offset, x);
    }
  }
  template <int kVec>
  __device__ __forceinline__ void process(const Channel (&ch)[kVec], const Loaded<scalar_t, kVec, kArrays>& l,
                                          int64_t offset, State (&)[kVec]) const {
    store_mapped<kVec>(y + offset, [&](int e) {
      const acc_t xe = static_cast<acc_t>(l.in[0].value[e]);
      if constexpr (kResidual) {
        return batch_norm_normalize(xe, static_cast<acc_t>(l.in[1].value[e]), ch[e], relu);
      } else {
        return batch_norm_normalize(xe, ch[e], relu);
      }
    });
  }
};

template <typename acc_t>
struct GradInputChannel {
  acc_t mean;
  BatchNormAffine<acc_t> mask;
  BatchNormBackwardCoefficients<acc_t> k;
};

// dx = a * g + b * (x - mean) + c, g = dy masked by the ReLU (relu false:
// dy is already masked, e.g. the dz a residual's reduction wrote).
template <typename scalar_t, typename acc_t>
struct GradInputOp {
  static constexpr int kArrays = 2;
  using Channel = GradInputChannel<acc_t>;
  using State = NoState;
  const scalar_t* __restrict__ dy;
  const scalar_t* __restrict__ x;
  scalar_t* __restrict__ dx;
  const acc_t* __restrict__ mean;
  const acc_t* __restrict__ coefficients;  // kBackwardRows x C
  int64_t channels;
  bool relu;

  __device__ __forceinline__ Channel channel(int64_t c) const {
    const acc_t* k = coefficients + c;
    return Channel{mean[c], BatchNormAffine<acc_t>{k[kMaskScale * channels], k[kMaskShift * channels]},
                   BatchNormBackwardCoefficients<acc_t>{k[kDyScale * channels], k[kXmuScale * channels],
                                                        k[kConstant * channels]}};
  }
  template <int kVec>
  __device__ __forceinline__ Loaded<scalar_t, kVec, kArrays> load(int64_t offset) const {
    return load_arrays<scalar_t, kVec>(offset, dy, x);
  }
  template <int kVec>
  __device__ __forceinline__ void process(const Channel (&ch)[kVec], const Loaded<scalar_t, kVec, kArrays>& l,
                                          int64_t offset, State (&)[kVec]) const {
    store_mapped<kVec>(dx + offset, [&](int e) {
      const acc_t xe = static_cast<acc_t>(l.in[1].value[e]);
      const acc_t g = batch_norm_masked_grad(static_cast<acc_t>(l.in[0].value[e]), xe, ch[e].mask, relu);
      return batch_norm_grad_input(g, xe, ch[e].mean, ch[e].k);
    });
  }
};

// Shifted sums (sum(x - s), sum((x - s)^2)) with s = the channel's first
// element (zero when that is not finite).
template <typename scalar_t, typename acc_t>
struct StatisticsOp {
  static constexpr int kArrays = 1;
  struct Channel {
    acc_t shift;
  };
  using State = SumPair<acc_t>;
  const scalar_t* __restrict__ x;
  int64_t shift_stride;  // channel c's first element is x[c * shift_stride]

  __device__ __forceinline__ Channel channel(int64_t c) const {
    return Channel{welford_shift(static_cast<acc_t>(x[c * shift_stride]))};
  }
  template <int kVec>
  __device__ __forceinline__ Loaded<scalar_t, kVec, kArrays> load(int64_t offset) const {
    return load_arrays<scalar_t, kVec>(offset, x);
  }
  template <int kVec>
  __device__ __forceinline__ void process(const Channel (&ch)[kVec], const Loaded<scalar_t, kVec, kArrays>& l,
                                          int64_t, State (&state)[kVec]) const {
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const acc_t d = static_cast<acc_t>(l.in[0].value[e]) - ch[e].shift;
      state[e].first += d;
      state[e].second += d * d;
    }
  }
};

template <typename acc_t>
struct GradientSumsChannel {
  acc_t mean;
  BatchNormAffine<acc_t> mask;
};

// (sum(g), sum(g * (x - mean))), g = dy masked by the ReLU of
// x * scale + shift (+ z); with a residual, dz = g is written too.
template <typename scalar_t, typename acc_t, bool kResidual>
struct GradientSumsOp {
  static constexpr int kArrays = kResidual ? 3 : 2;
  using Channel = GradientSumsChannel<acc_t>;
  using State = SumPair<acc_t>;
  const scalar_t* __restrict__ dy;
  const scalar_t* __restrict__ x;
  const scalar_t* __restrict__ z;
  scalar_t* __restrict__ dz;
  const acc_t* __restrict__ mean;
  const acc_t* __restrict__ coefficients;  // kBackwardRows x C (the mask rows)
  int64_t channels;
  bool relu;

  __device__ __forceinline__ Channel channel(int64_t c) const {
    return Channel{mean[c], BatchNormAffine<acc_t>{coefficients[kMaskScale * channels + c],
                                                   coefficients[kMaskShift * channels + c]}};
  }
  template <int kVec>
  __device__ __forceinline__ Loaded<scalar_t, kVec, kArrays> load(int64_t offset) const {
    if constexpr (kResidual) {
      return load_arrays<scalar_t, kVec>(offset, dy, x, z);
    } else {
      return load_arrays<scalar_t, kVec>(offset, dy, x);
    }
  }
  template <int kVec>
  __device__ __forceinline__ void process(const Channel (&ch)[kVec], const Loaded<scalar_t, kVec, kArrays>& l,
                                          int64_t offset, State (&state)[kVec]) const {
    AlignedVector<scalar_t, kVec> masked;
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      const acc_t xe = static_cast<acc_t>(l.in[1].value[e]);
      const acc_t dye = static_cast<acc_t>(l.in[0].value[e]);
      acc_t g;
      if constexpr (kResidual) {
        g = batch_norm_masked_grad(dye, xe, static_cast<acc_t>(l.in[2].value[e]), ch[e].mask, relu);
        masked.value[e] = static_cast<scalar_t>(g);
      } else {
        g = batch_norm_masked_grad(dye, xe, ch[e].mask, relu);
      }
      state[e].first += g;
      state[e].second += g * (xe - ch[e].mean);
    }
    if constexpr (kResidual) store_vector(dz + offset, masked);
  }
};

template <typename State>
__device__ __forceinline__ State zero_state() {
  return State{};
}

// ---- walkers: which vectors a thread visits ----------------------------------------

// How many of the kUnroll positions v, v + step, ... lie before end
// (comparisons: no division in the loop).
__device__ __forceinline__ int unrolled_count(int64_t v, int64_t step, int64_t end) {
  int count = 0;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) count += v + u * step < end ? 1 : 0;
  return count;
}

// The kUnroll vectors first, first + stride, ... (the `count` < kUnroll of
// them that exist, in a tail): loads first, then the math. Positions are in
// vectors, so every element offset is kVec * (an integer): written as
// row + v * kVec + u * stride in elements, nvcc stores each element of the
// second and later vectors on its own (STG.E x kVec instead of one STG.E.128).
template <int kVec, typename Op>
__device__ __forceinline__ void process_unrolled(const Op& op, const typename Op::Channel (&ch)[kVec],
                                                 typename Op::State (&state)[kVec], int64_t first, int64_t stride,
                                                 int count) {
  using L = decltype(op.template load<kVec>(0));
  L loaded[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (u < count) loaded[u] = op.template load<kVec>((first + u * stride) * kVec);
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (u < count) op.template process<kVec>(ch, loaded[u], (first + u * stride) * kVec, state);
  }
}

// Spatial-inner: the items (row n, segment) first_item, first_item + item_step, ...
// of `channel`, this thread being lane `lane` of its row group.
template <int kVec, typename Op>
__device__ __forceinline__ void walk_rows(const Op& op, const typename Op::Channel (&ch)[kVec],
                                          typename Op::State (&state)[kVec], int64_t channel, int64_t channels,
                                          int64_t vectors, RowLaunch rows, int64_t first_item,
                                          int64_t item_step, int lane) {
  const int64_t step = rows.row_threads;
  for (int64_t item = first_item; item < rows.items; item += item_step) {
    // A division per segment of a long row (kSegmentPasses block passes), none for short rows.
    const int64_t n = rows.segments == 1 ? item : item / rows.segments;
    const int64_t segment = item - n * rows.segments;
    const int64_t begin = segment * rows.segment_vectors;
    const int64_t end = min(vectors, begin + rows.segment_vectors);
    const int64_t row = (n * channels + channel) * vectors;  // in vectors
    for (int64_t v = begin + lane; v < end; v += step * kUnroll) {
      process_unrolled<kVec>(op, ch, state, row + v, step, unrolled_count(v, step, end));
    }
  }
}

// Channel-inner: rows first_row, first_row + row_step, ... at channel offset
// c0 (channels and c0 multiples of kVec).
template <int kVec, typename Op>
__device__ __forceinline__ void walk_channel_rows(const Op& op, const typename Op::Channel (&ch)[kVec],
                                                  typename Op::State (&state)[kVec], int64_t rows, int64_t channels,
                                                  int64_t c0, int64_t first_row, int64_t row_step) {
  const int64_t row_vectors = channels / kVec;
  for (int64_t r = first_row; r < rows; r += row_step * kUnroll) {
    process_unrolled<kVec>(op, ch, state, r * row_vectors + c0 / kVec, row_step * row_vectors,
                           unrolled_count(r, row_step, rows));
  }
}

// ---- kernels ------------------------------------------------------------------------------

// Spatial-inner elementwise pass: grid (C, slices), kThreads threads.
template <int kVec, typename Op>
__global__ void elementwise_rows_kernel(Op op, int64_t channels, int64_t vectors, RowLaunch rows) {
  const int64_t channel = blockIdx.x;
  const int group = static_cast<int>(threadIdx.x / rows.row_threads);
  const int lane = static_cast<int>(threadIdx.x - group * rows.row_threads);
  const typename Op::Channel one = op.channel(channel);
  typename Op::Channel ch[kVec];
  typename Op::State state[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) ch[e] = one;
  walk_rows<kVec>(op, ch, state, channel, channels, vectors, rows,
                  static_cast<int64_t>(blockIdx.y) * rows.groups + group, static_cast<int64_t>(gridDim.y) * rows.groups,
                  lane);
}

// Channel-inner elementwise pass: grid (tiles, slices), block (tile_threads, row_threads).
template <int kVec, typename Op>
__global__ void elementwise_channels_kernel(Op op, int64_t rows, int64_t channels) {
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  if (c0 >= channels) return;
  typename Op::Channel ch[kVec];
  typename Op::State state[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) ch[e] = op.channel(c0 + e);
  walk_channel_rows<kVec>(op, ch, state, rows, channels, c0, static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y,
                          static_cast<int64_t>(gridDim.y) * blockDim.y);
}

template <typename acc_t>
__device__ __forceinline__ SumPair<acc_t> warp_sum(SumPair<acc_t> s) {
  return SumPair<acc_t>{regops::warp_sum(s.first), regops::warp_sum(s.second)};
}

// Spatial-inner reduction: grid (C, splits), kThreads threads; partial
// (channel, blockIdx.y) is the block's sum, added in a fixed order.
template <int kVec, typename Op>
__global__ void reduce_rows_kernel(Op op, SumPair<typename Op::State::value_type>* partial, int64_t channels,
                                   int64_t vectors, RowLaunch rows) {
  using acc_t = typename Op::State::value_type;
  const int64_t channel = blockIdx.x;
  const int group = static_cast<int>(threadIdx.x / rows.row_threads);
  const int lane = static_cast<int>(threadIdx.x - group * rows.row_threads);
  const typename Op::Channel one = op.channel(channel);
  typename Op::Channel ch[kVec];
  SumPair<acc_t> state[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    ch[e] = one;
    state[e] = SumPair<acc_t>{acc_t(0), acc_t(0)};
  }
  walk_rows<kVec>(op, ch, state, channel, channels, vectors, rows,
                  static_cast<int64_t>(blockIdx.y) * rows.groups + group, static_cast<int64_t>(gridDim.y) * rows.groups,
                  lane);
  SumPair<acc_t> total = state[0];
#pragma unroll
  for (int e = 1; e < kVec; ++e) total = add_pairs(total, state[e]);
  REGOPS_SHARED_ARRAY(SumPair<acc_t>, warp_sums, [kThreads / 32]);
  total = warp_sum(total);
  const int warp = threadIdx.x / 32, lane_in_warp = threadIdx.x % 32;
  if (lane_in_warp == 0) warp_sums[warp] = total;
  __syncthreads();
  if (warp == 0) {
    total = lane_in_warp < kThreads / 32 ? warp_sums[lane_in_warp] : SumPair<acc_t>{acc_t(0), acc_t(0)};
    total = warp_sum(total);
    if (lane_in_warp == 0) partial[channel * gridDim.y + blockIdx.y] = total;
  }
}

// Channel-inner reduction: grid (tiles, splits), block (tile_threads,
// row_threads); the row threads of a channel are added in order of y.
template <int kVec, typename Op>
__global__ void reduce_channels_kernel(Op op, SumPair<typename Op::State::value_type>* partial, int64_t rows,
                                       int64_t channels) {
  using acc_t = typename Op::State::value_type;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  SumPair<acc_t> state[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) state[e] = SumPair<acc_t>{acc_t(0), acc_t(0)};
  if (c0 < channels) {
    typename Op::Channel ch[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) ch[e] = op.channel(c0 + e);
    walk_channel_rows<kVec>(op, ch, state, rows, channels, c0,
                            static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y,
                            static_cast<int64_t>(gridDim.y) * blockDim.y);
  }
  REGOPS_SHARED_ARRAY(SumPair<acc_t>, row_sums, [kThreads * kVec]);
  const int slot = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int e = 0; e < kVec; ++e) row_sums[slot * kVec + e] = state[e];
  __syncthreads();
  if (threadIdx.y == 0 && c0 < channels) {
    for (unsigned y = 1; y < blockDim.y; ++y) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) state[e] = add_pairs(state[e], row_sums[(y * blockDim.x + threadIdx.x) * kVec + e]);
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) partial[(c0 + e) * gridDim.y + blockIdx.y] = state[e];
  }
}

// ---- finalize kernels (a thread per channel) ------------------------------------------------

template <typename acc_t>
__device__ __forceinline__ SumPair<acc_t> channel_total(const SumPair<acc_t>* partial, int64_t splits, int64_t c) {
  SumPair<acc_t> total{acc_t(0), acc_t(0)};
  for (int64_t k = 0; k < splits; ++k) total = add_pairs(total, partial[c * splits + k]);
  return total;
}

template <typename acc_t>
struct ChannelStatistics {
  acc_t mean;
  acc_t var;  // biased
};

// A channel's mean and biased variance from its shifted sums.
template <typename acc_t>
__device__ __forceinline__ ChannelStatistics<acc_t> channel_statistics(SumPair<acc_t> total, acc_t shift,
                                                                       int64_t count) {
  const acc_t n = static_cast<acc_t>(count);
  const acc_t mean_offset = total.first / n;
  return ChannelStatistics<acc_t>{shift + mean_offset, clamp_m2(total.second - total.first * mean_offset) / n};
}

template <typename acc_t>
__device__ __forceinline__ acc_t inverse_std(acc_t var, acc_t eps) {
  return acc_t(1) / sqrt(var + eps);
}

// mean, biased var, invstd (when wanted) and the forward coefficients (when
// wanted) from the shifted sums.
template <typename scalar_t, typename acc_t>
__global__ void finalize_statistics_kernel(const SumPair<acc_t>* partial, int64_t splits, const scalar_t* x,
                                           int64_t shift_stride, int64_t count, int64_t channels, acc_t eps,
                                           const acc_t* weight, const acc_t* bias, acc_t* mean, acc_t* var,
                                           acc_t* invstd, acc_t* coefficients) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  const ChannelStatistics<acc_t> st = channel_statistics(
      channel_total(partial, splits, c), welford_shift(static_cast<acc_t>(x[c * shift_stride])), count);
  mean[c] = st.mean;
  var[c] = st.var;
  if (invstd == nullptr) return;
  const acc_t r = inverse_std(st.var, eps);
  invstd[c] = r;
  if (coefficients == nullptr) return;
  const BatchNormAffine<acc_t> affine = batch_norm_affine(st.mean, r, weight != nullptr ? weight[c] : acc_t(1),
                                                          bias != nullptr ? bias[c] : acc_t(0));
  coefficients[kScale * channels + c] = affine.scale;
  coefficients[kShift * channels + c] = affine.shift;
}

// scale and shift (rows `scale_row` and scale_row + 1) from a mean and either
// invstd or (from_var) a variance; the mean and the invstd are copied out
// where wanted (eval: save_mean and save_invstd from the running statistics).
template <typename acc_t>
__global__ void affine_coefficients_kernel(const acc_t* mean, const acc_t* invstd_or_var, bool from_var, acc_t eps,
                                           const acc_t* weight, const acc_t* bias, int64_t channels,
                                           acc_t* mean_out, acc_t* invstd_out, acc_t* coefficients, int scale_row) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  const acc_t r = from_var ? inverse_std(invstd_or_var[c], eps) : invstd_or_var[c];
  if (mean_out != nullptr) mean_out[c] = mean[c];
  if (invstd_out != nullptr) invstd_out[c] = r;
  const BatchNormAffine<acc_t> affine =
      batch_norm_affine(mean[c], r, weight != nullptr ? weight[c] : acc_t(1), bias != nullptr ? bias[c] : acc_t(0));
  coefficients[scale_row * channels + c] = affine.scale;
  coefficients[(scale_row + 1) * channels + c] = affine.shift;
}

// The gradient sums (from the partials, or given), grad_weight and
// grad_bias (when wanted) and the grad_input coefficients (when wanted).
template <typename acc_t>
__global__ void finalize_gradients_kernel(const SumPair<acc_t>* partial, int64_t splits, const acc_t* sum_dy_in,
                                          const acc_t* sum_dy_xmu_in, const acc_t* invstd, const acc_t* weight,
                                          acc_t count, bool training, int64_t channels, acc_t* sum_dy_out,
                                          acc_t* sum_dy_xmu_out, acc_t* grad_weight, acc_t* grad_bias,
                                          acc_t* coefficients) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  SumPair<acc_t> sums = partial != nullptr ? channel_total(partial, splits, c)
                                           : SumPair<acc_t>{sum_dy_in[c], sum_dy_xmu_in[c]};
  if (sum_dy_out != nullptr) {
    sum_dy_out[c] = sums.first;
    sum_dy_xmu_out[c] = sums.second;
  }
  if (grad_weight != nullptr) {
    grad_weight[c] = sums.second * invstd[c];
    grad_bias[c] = sums.first;
  }
  if (coefficients == nullptr) return;
  const BatchNormBackwardCoefficients<acc_t> k = batch_norm_backward_coefficients(
      invstd[c], weight != nullptr ? weight[c] : acc_t(1), training ? sums.first : acc_t(0),
      training ? sums.second : acc_t(0), count, training);
  coefficients[kDyScale * channels + c] = k.dy_scale;
  coefficients[kXmuScale * channels + c] = k.xmu_scale;
  coefficients[kConstant * channels + c] = k.constant;
}

// ---- one-pass forward (a channel's values fit in one block's registers) ---------------------

// Where a one-pass kernel writes a channel's statistics and reads its affine
// parameters.
template <typename acc_t>
struct OnePassOutputs {
  const acc_t* weight;  // nullptr: 1
  const acc_t* bias;    // nullptr: 0
  acc_t* mean;
  acc_t* var;
  acc_t* invstd;
  acc_t eps;
  int64_t count;  // elements per channel
};

// The forward coefficients of one channel from its shifted sums; the
// channel's statistics are written where `write`.
template <typename acc_t>
__device__ __forceinline__ BatchNormAffine<acc_t> one_pass_affine(const OnePassOutputs<acc_t>& out, int64_t c,
                                                                  SumPair<acc_t> total, acc_t shift, bool write) {
  const ChannelStatistics<acc_t> st = channel_statistics(total, shift, out.count);
  const acc_t r = inverse_std(st.var, out.eps);
  if (write) {
    out.mean[c] = st.mean;
    out.var[c] = st.var;
    out.invstd[c] = r;
  }
  return batch_norm_affine(st.mean, r, out.weight != nullptr ? out.weight[c] : acc_t(1),
                           out.bias != nullptr ? out.bias[c] : acc_t(0));
}

// Spatial-inner, grid (C), kThreads threads: group g holds row n = g of the
// channel (rows_fit_one_pass: every row in one group pass), kUnroll vectors
// a thread, loaded once; the block's sum (in a fixed order) gives the
// statistics, and the same registers are normalized and stored.
template <int kVec, typename scalar_t, typename acc_t, bool kResidual>
__global__ void one_pass_rows_kernel(NormalizeOp<scalar_t, acc_t, kResidual> op, OnePassOutputs<acc_t> out,
                                     int64_t channels, int64_t vectors, RowLaunch rows) {
  using Op = NormalizeOp<scalar_t, acc_t, kResidual>;
  const int64_t channel = blockIdx.x;
  const int group = static_cast<int>(threadIdx.x / rows.row_threads);
  const int lane = static_cast<int>(threadIdx.x - group * rows.row_threads);
  const int count = group < rows.items ? unrolled_count(lane, rows.row_threads, vectors) : 0;
  const int64_t first = (group * channels + channel) * vectors + lane;  // in vectors
  Loaded<scalar_t, kVec, Op::kArrays> loaded[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (u < count) loaded[u] = op.template load<kVec>((first + u * rows.row_threads) * kVec);
  }
  const acc_t shift = welford_shift(static_cast<acc_t>(op.x[channel * vectors * kVec]));
  SumPair<acc_t> total{acc_t(0), acc_t(0)};
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (u < count) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const acc_t d = static_cast<acc_t>(loaded[u].in[0].value[e]) - shift;
        total.first += d;
        total.second += d * d;
      }
    }
  }
  REGOPS_SHARED_ARRAY(SumPair<acc_t>, warp_sums, [kThreads / 32]);
  total = warp_sum(total);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = total;
  __syncthreads();
  total = warp_sums[0];
  for (int w = 1; w < kThreads / 32; ++w) total = add_pairs(total, warp_sums[w]);  // the same order in every thread
  BatchNormAffine<acc_t> ch[kVec];
  ch[0] = one_pass_affine(out, channel, total, shift, threadIdx.x == 0);
#pragma unroll
  for (int e = 1; e < kVec; ++e) ch[e] = ch[0];
  NoState state[kVec];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (u < count) op.template process<kVec>(ch, loaded[u], (first + u * rows.row_threads) * kVec, state);
  }
}

// Channel-inner, grid (tiles), block (tile_threads, row_threads): a thread
// owns one vector of channels and rows y, y + row_threads, ...
// (channel_rows_fit_one_pass: all rows in one pass), loaded once; the row
// threads of a channel are added in order of y by the y == 0 thread, which
// shares the coefficients through shared memory.
template <int kVec, typename scalar_t, typename acc_t, bool kResidual>
__global__ void one_pass_channels_kernel(NormalizeOp<scalar_t, acc_t, kResidual> op, OnePassOutputs<acc_t> out,
                                         int64_t rows, int64_t channels) {
  using Op = NormalizeOp<scalar_t, acc_t, kResidual>;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kVec;
  const bool active = c0 < channels;
  const int count = active ? unrolled_count(threadIdx.y, blockDim.y, rows) : 0;
  const int64_t row_vectors = channels / kVec;
  const int64_t first = threadIdx.y * row_vectors + c0 / kVec;  // in vectors
  Loaded<scalar_t, kVec, Op::kArrays> loaded[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (u < count) loaded[u] = op.template load<kVec>((first + u * blockDim.y * row_vectors) * kVec);
  }
  acc_t shift[kVec];
  SumPair<acc_t> state[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) {
    shift[e] = active ? welford_shift(static_cast<acc_t>(op.x[c0 + e])) : acc_t(0);
    state[e] = SumPair<acc_t>{acc_t(0), acc_t(0)};
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (u < count) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        const acc_t d = static_cast<acc_t>(loaded[u].in[0].value[e]) - shift[e];
        state[e].first += d;
        state[e].second += d * d;
      }
    }
  }
  REGOPS_SHARED_ARRAY(SumPair<acc_t>, row_sums, [kThreads * kVec]);
  REGOPS_SHARED_ARRAY(BatchNormAffine<acc_t>, affine, [32 * kVec]);  // tile_threads <= 32
  const int slot = threadIdx.y * blockDim.x + threadIdx.x;
#pragma unroll
  for (int e = 0; e < kVec; ++e) row_sums[slot * kVec + e] = state[e];
  __syncthreads();
  if (threadIdx.y == 0 && active) {
    for (unsigned y = 1; y < blockDim.y; ++y) {
#pragma unroll
      for (int e = 0; e < kVec; ++e) state[e] = add_pairs(state[e], row_sums[(y * blockDim.x + threadIdx.x) * kVec + e]);
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) affine[threadIdx.x * kVec + e] = one_pass_affine(out, c0 + e, state[e], shift[e], true);
  }
  __syncthreads();
  if (!active) return;
  BatchNormAffine<acc_t> ch[kVec];
#pragma unroll
  for (int e = 0; e < kVec; ++e) ch[e] = affine[threadIdx.x * kVec + e];
  NoState none[kVec];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (u < count) op.template process<kVec>(ch, loaded[u], (first + u * blockDim.y * row_vectors) * kVec, none);
  }
}

// ---- host side ----------------------------------------------------------------------------

template <typename acc_t>
const acc_t* optional_pointer(const std::optional<at::Tensor>& tensor) {
  return has_tensor(tensor) ? tensor->const_data_ptr<acc_t>() : nullptr;
}

std::optional<at::Tensor> contiguous_or_none(const std::optional<at::Tensor>& tensor) {
  return has_tensor(tensor) ? std::optional<at::Tensor>(tensor->contiguous()) : std::nullopt;
}

unsigned finalize_blocks(int64_t channels) {
  return static_cast<unsigned>((channels + kFinalizeThreads - 1) / kFinalizeThreads);
}

// How one pass over the prepared input runs: the layout, whether 16-byte
// vectors apply (every pointer aligned and rows a whole number of vectors),
// and the launch shape.
struct Pass {
  const BatchNormGeometry& g;
  bool vectorized;
};

template <typename scalar_t>
Pass make_pass(const BatchNormInput& p, std::initializer_list<const void*> pointers) {
  const BatchNormGeometry& g = p.geometry;
  const int64_t run = g.channels_inner ? g.channels : g.spatial;
  return Pass{g, vector_size<scalar_t>() > 1 && run % vector_size<scalar_t>() == 0 && can_vectorize(pointers)};
}

int64_t target_blocks_for(int resident_per_sm) {
  return static_cast<int64_t>(cuda::device_properties().multiProcessorCount) * std::max(1, resident_per_sm);
}

// Runs the elementwise op over the prepared input.
template <typename scalar_t, typename Op>
void run_elementwise(const Op& op, const Pass& pass) {
  const BatchNormGeometry& g = pass.g;
  const auto stream = cuda::current_stream();
  auto launch = [&](auto vec_tag) {
    constexpr int kVec = decltype(vec_tag)::value;
    if (g.channels_inner) {
      const auto kernel = elementwise_channels_kernel<kVec, Op>;
      const ChannelLaunch cl = channel_launch(g.channels / kVec + (g.channels % kVec != 0), kThreads);
      const int64_t rows = g.rows();
      const int64_t slices = grid_slices(cl.tiles, rows, cl.row_threads,
                                         target_blocks_for(cuda::max_active_blocks_per_sm(kernel, kThreads)));
      TORCH_CHECK(cl.tiles <= kMaxGridBlocks, "regops batch_norm: too many channels for one launch: ", g.channels);
      cuda::launch(kernel, dim3(static_cast<unsigned>(cl.tiles), static_cast<unsigned>(slices)),
                   dim3(static_cast<unsigned>(cl.tile_threads), static_cast<unsigned>(cl.row_threads)), 0, stream,
                   op, rows, g.channels);
    } else {
      const auto kernel = elementwise_rows_kernel<kVec, Op>;
      const int64_t vectors = g.spatial / kVec;
      const RowLaunch rl = row_launch(g.batch, vectors, kThreads, kUnroll, kSegmentPasses);
      const int64_t slices = grid_slices(g.channels, rl.items, rl.groups,
                                         target_blocks_for(cuda::max_active_blocks_per_sm(kernel, kThreads)));
      TORCH_CHECK(g.channels <= kMaxGridBlocks, "regops batch_norm: too many channels for one launch: ", g.channels);
      cuda::launch(kernel, dim3(static_cast<unsigned>(g.channels), static_cast<unsigned>(slices)), kThreads, 0, stream,
                   op, g.channels, vectors, rl);
    }
    REGOPS_KERNEL_LAUNCH_CHECK();
  };
  if (pass.vectorized) {
    launch(std::integral_constant<int, vector_size<scalar_t>()>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
}

// Runs the reduction op over the prepared input; returns the partials
// (C x splits pairs) and the number of splits.
template <typename scalar_t, typename Op>
std::pair<at::Tensor, int64_t> run_reduction(const Op& op, const Pass& pass, const at::TensorOptions& options) {
  using acc_t = typename Op::State::value_type;
  const BatchNormGeometry& g = pass.g;
  const auto stream = cuda::current_stream();
  const int64_t elements = g.batch * g.spatial * g.channels;
  std::pair<at::Tensor, int64_t> result;
  auto launch = [&](auto vec_tag) {
    constexpr int kVec = decltype(vec_tag)::value;
    auto partials = [&](int64_t splits) {
      return at::empty({g.channels * splits * static_cast<int64_t>(sizeof(SumPair<acc_t>))},
                       options.dtype(at::kByte));
    };
    if (g.channels_inner) {
      const auto kernel = reduce_channels_kernel<kVec, Op>;
      const ChannelLaunch cl = channel_launch(g.channels / kVec + (g.channels % kVec != 0), kThreads);
      const int64_t rows = g.rows();
      // Elements per row of a tile: its channels; rows per slice at least
      // enough for kMinElementsPerThread per thread.
      const int64_t tile_channels = std::min<int64_t>(g.channels, cl.tile_threads * kVec);
      const int64_t min_rows = (kThreads * kMinElementsPerThread + tile_channels - 1) / tile_channels;
      const int64_t splits = grid_slices(cl.tiles, rows, cl.row_threads,
                                         target_blocks_for(cuda::max_active_blocks_per_sm(kernel, kThreads)), min_rows);
      TORCH_CHECK(cl.tiles <= kMaxGridBlocks, "regops batch_norm: too many channels for one launch: ", g.channels);
      result = {partials(splits), splits};
      cuda::launch(kernel, dim3(static_cast<unsigned>(cl.tiles), static_cast<unsigned>(splits)),
                   dim3(static_cast<unsigned>(cl.tile_threads), static_cast<unsigned>(cl.row_threads)), 0, stream,
                   op, reinterpret_cast<SumPair<acc_t>*>(result.first.mutable_data_ptr()), rows, g.channels);
    } else {
      const auto kernel = reduce_rows_kernel<kVec, Op>;
      const int64_t vectors = g.spatial / kVec;
      const RowLaunch rl = row_launch(g.batch, vectors, kThreads, kUnroll, kSegmentPasses);
      const int64_t item_elements = std::max<int64_t>(1, elements / std::max<int64_t>(1, g.channels * rl.items));
      const int64_t min_items = (kThreads * kMinElementsPerThread + item_elements - 1) / item_elements;
      const int64_t splits = grid_slices(g.channels, rl.items, rl.groups,
                                         target_blocks_for(cuda::max_active_blocks_per_sm(kernel, kThreads)), min_items);
      TORCH_CHECK(g.channels <= kMaxGridBlocks, "regops batch_norm: too many channels for one launch: ", g.channels);
      result = {partials(splits), splits};
      cuda::launch(kernel, dim3(static_cast<unsigned>(g.channels), static_cast<unsigned>(splits)), kThreads, 0, stream,
                   op, reinterpret_cast<SumPair<acc_t>*>(result.first.mutable_data_ptr()), g.channels, vectors,
                   rl);
    }
    REGOPS_KERNEL_LAUNCH_CHECK();
  };
  if (pass.vectorized) {
    launch(std::integral_constant<int, vector_size<scalar_t>()>{});
  } else {
    launch(std::integral_constant<int, 1>{});
  }
  return result;
}

int64_t shift_stride(const BatchNormGeometry& g) { return g.channels_inner ? 1 : g.spatial; }

// mean, biased var and (invstd != nullptr) invstd and (coefficients
// defined) the forward coefficients of every channel.
template <typename scalar_t>
void compute_statistics(const BatchNormInput& p, at::Tensor& mean, at::Tensor& var, at::Tensor* invstd, double eps,
                        const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                        at::Tensor coefficients) {
  using acc_t = at::opmath_type<scalar_t>;
  const BatchNormGeometry& g = p.geometry;
  if (g.channels == 0) return;
  if (p.input.numel() == 0) {
    mean.zero_();
    var.zero_();
    if (invstd != nullptr) {
      invstd->fill_(1.0 / std::sqrt(eps));
      if (coefficients.defined()) {
        const auto stream = cuda::current_stream();
        cuda::launch(affine_coefficients_kernel<acc_t>, finalize_blocks(g.channels), kFinalizeThreads, 0, stream,
            mean.const_data_ptr<acc_t>(), invstd->const_data_ptr<acc_t>(), false, static_cast<acc_t>(eps),
            optional_pointer<acc_t>(weight), optional_pointer<acc_t>(bias), g.channels, static_cast<acc_t*>(nullptr),
            static_cast<acc_t*>(nullptr), coefficients.mutable_data_ptr<acc_t>(), static_cast<int>(kScale));
        REGOPS_KERNEL_LAUNCH_CHECK();
      }
    }
    return;
  }
  const scalar_t* x = p.input.const_data_ptr<scalar_t>();
  const StatisticsOp<scalar_t, acc_t> op{x, shift_stride(g)};
  auto [partial, splits] = run_reduction<scalar_t>(op, make_pass<scalar_t>(p, {x}), p.input.options());
  cuda::launch(finalize_statistics_kernel<scalar_t, acc_t>, finalize_blocks(g.channels), kFinalizeThreads, 0,
               cuda::current_stream(),
      reinterpret_cast<const SumPair<acc_t>*>(partial.const_data_ptr()), splits, x, shift_stride(g),
      g.count_per_channel(), g.channels, static_cast<acc_t>(eps), optional_pointer<acc_t>(weight),
      optional_pointer<acc_t>(bias), mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>(),
      invstd != nullptr ? invstd->mutable_data_ptr<acc_t>() : nullptr,
      coefficients.defined() ? coefficients.mutable_data_ptr<acc_t>() : nullptr);
  REGOPS_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_normalize(const BatchNormInput& p, const at::Tensor& z, at::Tensor& output, const at::Tensor& coefficients,
                      bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  if (p.input.numel() == 0) return;
  const scalar_t* x = p.input.const_data_ptr<scalar_t>();
  scalar_t* y = output.mutable_data_ptr<scalar_t>();
  const acc_t* k = coefficients.const_data_ptr<acc_t>();
  const int64_t channels = p.geometry.channels;
  if (z.defined()) {
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    run_elementwise<scalar_t>(NormalizeOp<scalar_t, acc_t, true>{x, zp, y, k, channels, relu},
                              make_pass<scalar_t>(p, {x, zp, y}));
  } else {
    run_elementwise<scalar_t>(NormalizeOp<scalar_t, acc_t, false>{x, nullptr, y, k, channels, relu},
                              make_pass<scalar_t>(p, {x, y}));
  }
}

// The training forward as one kernel when every channel's values fit in one
// block's registers (rows_fit_one_pass / channel_rows_fit_one_pass of
// batch_norm_launch.h): x is read once and there are no partials. False
// (nothing launched) when they do not fit: two passes then.
template <typename scalar_t>
bool forward_one_pass(const BatchNormInput& p, const at::Tensor& z, at::Tensor& output, at::Tensor& mean,
                      at::Tensor& var, at::Tensor& invstd, double eps, const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  const BatchNormGeometry& g = p.geometry;
  if (p.input.numel() == 0) return false;
  const scalar_t* x = p.input.const_data_ptr<scalar_t>();
  const scalar_t* zp = z.defined() ? z.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* y = output.mutable_data_ptr<scalar_t>();
  const bool vectorized = z.defined() ? make_pass<scalar_t>(p, {x, zp, y}).vectorized
                                      : make_pass<scalar_t>(p, {x, y}).vectorized;
  const OnePassOutputs<acc_t> out{optional_pointer<acc_t>(weight), optional_pointer<acc_t>(bias),
                                  mean.mutable_data_ptr<acc_t>(), var.mutable_data_ptr<acc_t>(),
                                  invstd.mutable_data_ptr<acc_t>(), static_cast<acc_t>(eps), g.count_per_channel()};
  const auto stream = cuda::current_stream();
  auto run = [&](auto vec_tag, auto residual_tag) {
    constexpr int kVec = decltype(vec_tag)::value;
    constexpr bool kResidual = decltype(residual_tag)::value;
    const NormalizeOp<scalar_t, acc_t, kResidual> op{x, zp, y, nullptr, g.channels, relu};
    if (g.channels_inner) {
      const ChannelLaunch cl = channel_launch(g.channels / kVec + (g.channels % kVec != 0), kThreads);
      if (!channel_rows_fit_one_pass(cl, g.rows(), kUnroll)) return false;
      TORCH_CHECK(cl.tiles <= kMaxGridBlocks, "regops batch_norm: too many channels for one launch: ", g.channels);
      cuda::launch(one_pass_channels_kernel<kVec, scalar_t, acc_t, kResidual>, dim3(static_cast<unsigned>(cl.tiles)),
                   dim3(static_cast<unsigned>(cl.tile_threads), static_cast<unsigned>(cl.row_threads)), 0, stream, op,
                   out, g.rows(), g.channels);
    } else {
      const int64_t vectors = g.spatial / kVec;
      const RowLaunch rl = row_launch(g.batch, vectors, kThreads, kUnroll, kSegmentPasses);
      if (!rows_fit_one_pass(rl, vectors, kUnroll)) return false;
      TORCH_CHECK(g.channels <= kMaxGridBlocks, "regops batch_norm: too many channels for one launch: ", g.channels);
      cuda::launch(one_pass_rows_kernel<kVec, scalar_t, acc_t, kResidual>, dim3(static_cast<unsigned>(g.channels)),
                   kThreads, 0, stream, op, out, g.channels, vectors, rl);
    }
    REGOPS_KERNEL_LAUNCH_CHECK();
    return true;
  };
  auto with_vector = [&](auto residual_tag) {
    return vectorized ? run(std::integral_constant<int, vector_size<scalar_t>()>{}, residual_tag)
                      : run(std::integral_constant<int, 1>{}, residual_tag);
  };
  return z.defined() ? with_vector(std::true_type{}) : with_vector(std::false_type{});
}

at::Tensor coefficient_rows(const at::Tensor& input, int rows) {
  return at::empty({rows, input.size(1)}, accumulate_options(input));
}

// The ReLU mask rows (scale and shift) of backward coefficients.
template <typename acc_t>
void launch_mask_coefficients(const at::Tensor& mean, const at::Tensor& invstd, const std::optional<at::Tensor>& weight,
                              const std::optional<at::Tensor>& bias, at::Tensor& coefficients) {
  const int64_t channels = mean.numel();
  if (channels == 0) return;
  cuda::launch(affine_coefficients_kernel<acc_t>, finalize_blocks(channels), kFinalizeThreads, 0,
               cuda::current_stream(),
      mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(), false, acc_t(0), optional_pointer<acc_t>(weight),
      optional_pointer<acc_t>(bias), channels, static_cast<acc_t*>(nullptr), static_cast<acc_t*>(nullptr),
      coefficients.mutable_data_ptr<acc_t>(), static_cast<int>(kMaskScale));
  REGOPS_KERNEL_LAUNCH_CHECK();
}

// The partials of (sum(g), sum(g * (x - mean))); with a residual z, dz = g too.
template <typename scalar_t>
std::pair<at::Tensor, int64_t> reduce_gradients(const BatchNormInput& p, const at::Tensor& dy, const at::Tensor& mean,
                                                const at::Tensor& coefficients, bool relu, const at::Tensor& z,
                                                at::Tensor& dz) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = p.input.const_data_ptr<scalar_t>();
  const scalar_t* g = dy.const_data_ptr<scalar_t>();
  const acc_t* m = mean.const_data_ptr<acc_t>();
  const acc_t* k = coefficients.const_data_ptr<acc_t>();
  const int64_t channels = p.geometry.channels;
  if (z.defined()) {
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    scalar_t* dzp = dz.mutable_data_ptr<scalar_t>();
    return run_reduction<scalar_t>(GradientSumsOp<scalar_t, acc_t, true>{g, x, zp, dzp, m, k, channels, relu},
                                   make_pass<scalar_t>(p, {x, g, zp, dzp}), p.input.options());
  }
  return run_reduction<scalar_t>(GradientSumsOp<scalar_t, acc_t, false>{g, x, nullptr, nullptr, m, k, channels, relu},
                                 make_pass<scalar_t>(p, {x, g}), p.input.options());
}

template <typename scalar_t>
void launch_grad_input(const BatchNormInput& p, const at::Tensor& dy, at::Tensor& dx, const at::Tensor& mean,
                       const at::Tensor& coefficients, bool relu) {
  using acc_t = at::opmath_type<scalar_t>;
  if (p.input.numel() == 0) return;
  const scalar_t* x = p.input.const_data_ptr<scalar_t>();
  const scalar_t* g = dy.const_data_ptr<scalar_t>();
  scalar_t* out = dx.mutable_data_ptr<scalar_t>();
  run_elementwise<scalar_t>(GradInputOp<scalar_t, acc_t>{g, x, out, mean.const_data_ptr<acc_t>(),
                                                         coefficients.const_data_ptr<acc_t>(), p.geometry.channels, relu},
                            make_pass<scalar_t>(p, {x, g, out}));
}

// The tag of the CUDA kernels of the batch norm ops, which take the arguments
// BatchNormEntries has checked and prepared.
struct CudaBatchNorm {
  using Guard = cuda::DeviceGuard;
};

std::tuple<at::Tensor, at::Tensor> batch_norm_stats(CudaBatchNorm, const BatchNormInput& p) {
  at::Tensor mean = at::empty({p.input.size(1)}, accumulate_options(p.input));
  at::Tensor var = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "regops_batch_norm_stats_cuda", [&] {
    compute_statistics<scalar_t>(p, mean, var, nullptr, 0.0, std::nullopt, std::nullopt, at::Tensor());
  });
  return {mean, var};
}

at::Tensor batch_norm_elementwise(CudaBatchNorm, const BatchNormInput& p, const NormalizationTensors& tensors,
                                  bool relu) {
  at::Tensor output = at::empty_like(p.input);
  if (p.input.numel() == 0) return output;
  const at::Tensor mean_values = tensors.mean.contiguous(), invstd_values = tensors.invstd.contiguous();
  const auto weight_values = contiguous_or_none(tensors.weight), bias_values = contiguous_or_none(tensors.bias);
  at::Tensor coefficients = coefficient_rows(p.input, kForwardRows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "regops_batch_norm_elementwise_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::launch(affine_coefficients_kernel<acc_t>, finalize_blocks(p.geometry.channels), kFinalizeThreads, 0,
                 cuda::current_stream(),
        mean_values.const_data_ptr<acc_t>(), invstd_values.const_data_ptr<acc_t>(), false, acc_t(0),
        optional_pointer<acc_t>(weight_values), optional_pointer<acc_t>(bias_values), p.geometry.channels,
        static_cast<acc_t*>(nullptr), static_cast<acc_t*>(nullptr), coefficients.mutable_data_ptr<acc_t>(),
        static_cast<int>(kScale));
    REGOPS_KERNEL_LAUNCH_CHECK();
    launch_normalize<scalar_t>(p, at::Tensor(), output, coefficients, relu);
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_reduce(CudaBatchNorm, const BatchNormInput& p,
                                                              const at::Tensor& dy, const NormalizationTensors& tensors,
                                                              bool relu) {
  at::Tensor sum_dy = at::empty({p.input.size(1)}, accumulate_options(p.input));
  at::Tensor sum_dy_xmu = at::empty_like(sum_dy);
  if (p.input.size(1) == 0) return {sum_dy, sum_dy_xmu};
  if (p.input.numel() == 0) return {sum_dy.zero_(), sum_dy_xmu.zero_()};
  const at::Tensor mean_values = tensors.mean.contiguous(), invstd_values = tensors.invstd.contiguous();
  const auto weight_values = contiguous_or_none(tensors.weight), bias_values = contiguous_or_none(tensors.bias);
  at::Tensor coefficients = coefficient_rows(p.input, kBackwardRows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "regops_batch_norm_backward_reduce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_mask_coefficients<acc_t>(mean_values, invstd_values, weight_values, bias_values, coefficients);
    at::Tensor none;
    auto [partial, splits] = reduce_gradients<scalar_t>(p, dy, mean_values, coefficients, relu, at::Tensor(), none);
    cuda::launch(finalize_gradients_kernel<acc_t>, finalize_blocks(p.geometry.channels), kFinalizeThreads, 0,
                 cuda::current_stream(),
        reinterpret_cast<const SumPair<acc_t>*>(partial.const_data_ptr()), splits, static_cast<const acc_t*>(nullptr),
        static_cast<const acc_t*>(nullptr), invstd_values.const_data_ptr<acc_t>(),
        optional_pointer<acc_t>(weight_values), acc_t(1), true, p.geometry.channels, sum_dy.mutable_data_ptr<acc_t>(),
        sum_dy_xmu.mutable_data_ptr<acc_t>(), static_cast<acc_t*>(nullptr), static_cast<acc_t*>(nullptr),
        static_cast<acc_t*>(nullptr));
    REGOPS_KERNEL_LAUNCH_CHECK();
  });
  return {sum_dy, sum_dy_xmu};
}

at::Tensor batch_norm_backward_elementwise(CudaBatchNorm, const BatchNormInput& p, const at::Tensor& dy,
                                           const NormalizationTensors& tensors, const at::Tensor& sum_dy,
                                           const at::Tensor& sum_dy_xmu, int64_t count, bool relu) {
  at::Tensor dx = at::empty_like(p.input);
  if (p.input.numel() == 0) return dx;
  const at::Tensor mean_values = tensors.mean.contiguous(), invstd_values = tensors.invstd.contiguous();
  const at::Tensor sum_dy_values = sum_dy.contiguous(), sum_dy_xmu_values = sum_dy_xmu.contiguous();
  const auto weight_values = contiguous_or_none(tensors.weight), bias_values = contiguous_or_none(tensors.bias);
  at::Tensor coefficients = coefficient_rows(p.input, kBackwardRows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "regops_batch_norm_backward_elementwise_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_mask_coefficients<acc_t>(mean_values, invstd_values, weight_values, bias_values, coefficients);
    cuda::launch(finalize_gradients_kernel<acc_t>, finalize_blocks(p.geometry.channels), kFinalizeThreads, 0,
                 cuda::current_stream(),
        static_cast<const SumPair<acc_t>*>(nullptr), int64_t(0), sum_dy_values.const_data_ptr<acc_t>(),
        sum_dy_xmu_values.const_data_ptr<acc_t>(), invstd_values.const_data_ptr<acc_t>(),
        optional_pointer<acc_t>(weight_values), static_cast<acc_t>(count), true, p.geometry.channels,
        static_cast<acc_t*>(nullptr), static_cast<acc_t*>(nullptr), static_cast<acc_t*>(nullptr),
        static_cast<acc_t*>(nullptr), coefficients.mutable_data_ptr<acc_t>());
    REGOPS_KERNEL_LAUNCH_CHECK();
    launch_grad_input<scalar_t>(p, dy, dx, mean_values, coefficients, relu);
  });
  return dx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_forward(
    CudaBatchNorm, const BatchNormInput& p, const at::Tensor& z, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& running_mean,
    const std::optional<at::Tensor>& running_var, bool training, double eps, bool relu) {
  const at::TensorOptions options = accumulate_options(p.input);
  at::Tensor output = at::empty_like(p.input);
  const int64_t channels = p.input.size(1);
  at::Tensor mean = at::empty({channels}, options);
  at::Tensor invstd = at::empty_like(mean);
  at::Tensor batch_var = training ? at::empty_like(mean) : at::empty({0}, options);
  const auto weight_values = contiguous_or_none(weight), bias_values = contiguous_or_none(bias);
  at::Tensor coefficients = coefficient_rows(p.input, kForwardRows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "regops_batch_norm_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (training) {
      if (forward_one_pass<scalar_t>(p, z, output, mean, batch_var, invstd, eps, weight_values, bias_values, relu)) {
        return;
      }
      compute_statistics<scalar_t>(p, mean, batch_var, &invstd, eps, weight_values, bias_values, coefficients);
    } else if (channels > 0) {
      const at::Tensor running_mean_values = running_mean->contiguous();
      const at::Tensor running_var_values = running_var->contiguous();
      cuda::launch(affine_coefficients_kernel<acc_t>, finalize_blocks(channels), kFinalizeThreads, 0,
                   cuda::current_stream(),
          running_mean_values.const_data_ptr<acc_t>(), running_var_values.const_data_ptr<acc_t>(), true,
          static_cast<acc_t>(eps), optional_pointer<acc_t>(weight_values), optional_pointer<acc_t>(bias_values),
          channels, mean.mutable_data_ptr<acc_t>(), invstd.mutable_data_ptr<acc_t>(),
          coefficients.mutable_data_ptr<acc_t>(), static_cast<int>(kScale));
      REGOPS_KERNEL_LAUNCH_CHECK();
    }
    launch_normalize<scalar_t>(p, z, output, coefficients, relu);
  });
  return {output, mean, invstd, batch_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward(
    CudaBatchNorm, const BatchNormInput& p, const at::Tensor& dy, const at::Tensor& z,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, const at::Tensor& save_mean,
    const at::Tensor& save_invstd, bool training, bool relu) {
  at::Tensor grad_residual = z.defined() ? at::empty_like(p.input) : at::empty({0}, p.input.options());
  at::Tensor dx = at::empty_like(p.input);
  const at::TensorOptions options = accumulate_options(p.input);
  const int64_t channels = p.input.size(1);
  at::Tensor grad_weight = at::empty({channels}, options);
  at::Tensor grad_bias = at::empty_like(grad_weight);
  if (channels == 0) return {dx, grad_weight, grad_bias, grad_residual};
  if (p.input.numel() == 0) return {dx, grad_weight.zero_(), grad_bias.zero_(), grad_residual};
  const at::Tensor mean_values = save_mean.contiguous(), invstd_values = save_invstd.contiguous();
  const auto weight_values = contiguous_or_none(weight), bias_values = contiguous_or_none(bias);
  const int64_t count = std::max<int64_t>(1, p.geometry.count_per_channel());
  at::Tensor coefficients = coefficient_rows(p.input, kBackwardRows);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.input.scalar_type(), "regops_batch_norm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    launch_mask_coefficients<acc_t>(mean_values, invstd_values, weight_values, bias_values, coefficients);
    auto [partial, splits] = reduce_gradients<scalar_t>(p, dy, mean_values, coefficients, relu, z, grad_residual);
    cuda::launch(finalize_gradients_kernel<acc_t>, finalize_blocks(channels), kFinalizeThreads, 0,
                 cuda::current_stream(),
        reinterpret_cast<const SumPair<acc_t>*>(partial.const_data_ptr()), splits, static_cast<const acc_t*>(nullptr),
        static_cast<const acc_t*>(nullptr), invstd_values.const_data_ptr<acc_t>(),
        optional_pointer<acc_t>(weight_values), static_cast<acc_t>(count), training, channels,
        static_cast<acc_t*>(nullptr), static_cast<acc_t*>(nullptr), grad_weight.mutable_data_ptr<acc_t>(),
        grad_bias.mutable_data_ptr<acc_t>(), coefficients.mutable_data_ptr<acc_t>());
    REGOPS_KERNEL_LAUNCH_CHECK();
    // With a residual the reduction wrote the masked dy: grad_input needs no mask.
    launch_grad_input<scalar_t>(p, z.defined() ? grad_residual : dy, dx, mean_values, coefficients,
                                relu && !z.defined());
  });
  return {dx, grad_weight, grad_bias, grad_residual};
}

}  // namespace

REGOPS_CUDA_LIBRARY_IMPL(m) {
  register_batch_norm<CudaBatchNorm>(m);
}

}  // namespace regops
