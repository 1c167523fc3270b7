// Batch normalization on CUDA, both memory layouts without a transposing copy.
//
// Per-channel reductions (statistics; the backward's sum(dy) and
// sum(dy * (x - mean))) run in two steps: a partial kernel where each block
// reduces one slice of a channel into one partial, then a finalize kernel
// (a thread per channel) that merges a channel's partials in a fixed order.
// Splitting every channel over several blocks keeps all SMs busy when C is
// small; the grid is one-dimensional, channel-major (batch_norm_launch.h),
// so any number of channels fits one launch. The partial kernel comes in two
// shapes:
//   spatial-inner (contiguous NCHW): a block reduces one slice of one
//     channel, its threads walking consecutive elements of the channel's N
//     runs of S (coalesced);
//   channel-inner (channels_last, or S == 1): a block is 32 channels x 8 rows,
//     a warp reading 32 consecutive channels of one row (coalesced), the 8
//     row-threads of each channel merged through shared memory.
// Elementwise passes (normalize; grad_input) walk memory in order, 16 bytes
// per load and store where aligned, the channel of element i being
// (i / stride_c) % C in both layouts. Traffic: forward reads x twice (stats,
// normalize) and writes y; backward reads dy and x twice and writes dx.
// Everything uses int64 indices and runs on the current stream.
#include <ATen/ATen.h>
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
constexpr int kChannelTile = 32;  // channels per block of the channel-inner reduction (one warp)
constexpr int kRowThreads = 8;    // rows in flight per block of the channel-inner reduction
constexpr int kFinalizeThreads = 128;
// A reduction block should own at least this many elements per thread, or
// the partials cost more than they save.
constexpr int64_t kMinElementsPerThread = 16;

// ---- per-channel values -----------------------------------------------------------

template <typename acc_t>
struct ChannelParams {
  const acc_t* mean;
  const acc_t* invstd;
  const acc_t* weight;  // may be null: 1
  const acc_t* bias;    // may be null: 0

  __device__ __forceinline__ BatchNormAffine<acc_t> affine(int64_t c) const {
    return batch_norm_affine(mean[c], invstd[c], weight != nullptr ? weight[c] : acc_t(1),
                             bias != nullptr ? bias[c] : acc_t(0));
  }
};

// ---- reducers: what the partial kernels accumulate -----------------------------------

template <typename scalar_t, typename acc_t>
struct StatisticsReducer {
  using State = Welford<acc_t>;
  struct Context {};
  const scalar_t* x;

  __device__ __forceinline__ State identity() const { return welford_empty<acc_t>(); }
  __device__ __forceinline__ Context context(int64_t) const { return Context{}; }
  __device__ __forceinline__ void add(State& state, int64_t offset, const Context&) const {
    state = welford_update(state, static_cast<acc_t>(x[offset]));
  }
  __device__ __forceinline__ static State merge(State a, State b) { return welford_merge(a, b); }
  __device__ __forceinline__ static State shuffle_down(State s, int delta) {
    return State{__shfl_down_sync(0xffffffffu, s.mean, delta), __shfl_down_sync(0xffffffffu, s.m2, delta),
                 __shfl_down_sync(0xffffffffu, s.count, delta)};
  }
};

template <typename acc_t>
struct SumPair {
  acc_t sum_dy;
  acc_t sum_dy_xmu;
};

template <typename scalar_t, typename acc_t>
struct GradientSumsReducer {
  using State = SumPair<acc_t>;
  struct Context {
    acc_t mean;
    BatchNormAffine<acc_t> affine;
  };
  const scalar_t* dy;
  const scalar_t* x;
  ChannelParams<acc_t> params;
  bool relu;
  const scalar_t* residual;  // may be null; else the mask includes it and
  scalar_t* grad_residual;   // receives the masked dy

  __device__ __forceinline__ State identity() const { return State{acc_t(0), acc_t(0)}; }
  __device__ __forceinline__ Context context(int64_t c) const { return Context{params.mean[c], params.affine(c)}; }
  __device__ __forceinline__ void add(State& state, int64_t offset, const Context& ctx) const {
    const acc_t xi = static_cast<acc_t>(x[offset]);
    acc_t g;
    if (residual != nullptr) {
      g = batch_norm_masked_grad(static_cast<acc_t>(dy[offset]), xi, static_cast<acc_t>(residual[offset]), ctx.affine,
                                 relu);
      grad_residual[offset] = static_cast<scalar_t>(g);
    } else {
      g = batch_norm_masked_grad(static_cast<acc_t>(dy[offset]), xi, ctx.affine, relu);
    }
    state.sum_dy += g;
    state.sum_dy_xmu += g * (xi - ctx.mean);
  }
  __device__ __forceinline__ static State merge(State a, State b) {
    return State{a.sum_dy + b.sum_dy, a.sum_dy_xmu + b.sum_dy_xmu};
  }
  __device__ __forceinline__ static State shuffle_down(State s, int delta) {
    return State{__shfl_down_sync(0xffffffffu, s.sum_dy, delta), __shfl_down_sync(0xffffffffu, s.sum_dy_xmu, delta)};
  }
};

// ---- partial kernels ------------------------------------------------------------------

template <typename Reducer>
__device__ __forceinline__ typename Reducer::State warp_reduce(typename Reducer::State s) {
#pragma unroll
  for (int delta = 16; delta > 0; delta /= 2) s = Reducer::merge(s, Reducer::shuffle_down(s, delta));
  return s;
}

// Block (kThreads) channel * splits + k reduces elements
// [k * per_block, (k + 1) * per_block) of the channel's N * S.
template <typename Reducer>
__global__ void reduce_spatial_inner_kernel(Reducer reducer, typename Reducer::State* partial, int64_t batch,
                                            int64_t channels, int64_t spatial, int64_t splits, int64_t per_block) {
  using State = typename Reducer::State;
  const int64_t channel = blockIdx.x / splits;
  const int64_t split = blockIdx.x - channel * splits;
  const int64_t count = batch * spatial;
  const int64_t begin = split * per_block;
  const int64_t end = min(count, begin + per_block);
  const auto ctx = reducer.context(channel);
  State state = reducer.identity();
  // (n, s) of this thread's element, advanced without a division per step
  // when runs are longer than the block (one division per run crossed otherwise).
  int64_t r = begin + threadIdx.x;
  int64_t n = r / spatial;
  int64_t s = r - n * spatial;
  for (; r < end; r += blockDim.x) {
    reducer.add(state, (n * channels + channel) * spatial + s, ctx);
    s += blockDim.x;
    if (s >= spatial) {
      n += s / spatial;
      s %= spatial;
    }
  }
  REGOPS_SHARED_ARRAY(State, warp_states, [kThreads / 32]);
  state = warp_reduce<Reducer>(state);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_states[warp] = state;
  __syncthreads();
  if (warp == 0) {
    state = lane < static_cast<int>(blockDim.x / 32) ? warp_states[lane] : reducer.identity();
    state = warp_reduce<Reducer>(state);
    if (lane == 0) partial[channel * splits + split] = state;
  }
}

// Block (kChannelTile x kRowThreads) tile * splits + k covers channels
// tile * 32 + [0, 32) and rows k * 8 + threadIdx.y, stepping by splits * 8.
template <typename Reducer>
__global__ void reduce_channel_inner_kernel(Reducer reducer, typename Reducer::State* partial, int64_t rows,
                                            int64_t channels, int64_t splits) {
  using State = typename Reducer::State;
  const int64_t tile = blockIdx.x / splits;
  const int64_t split = blockIdx.x - tile * splits;
  const int64_t channel = tile * kChannelTile + threadIdx.x;
  State state = reducer.identity();
  if (channel < channels) {
    const auto ctx = reducer.context(channel);
    const int64_t step = splits * kRowThreads;
    for (int64_t r = split * kRowThreads + threadIdx.y; r < rows; r += step) {
      reducer.add(state, r * channels + channel, ctx);
    }
  }
  REGOPS_SHARED_ARRAY(State, row_states, [kRowThreads][kChannelTile]);
  row_states[threadIdx.y][threadIdx.x] = state;
  __syncthreads();
  if (threadIdx.y == 0 && channel < channels) {
    for (int k = 1; k < kRowThreads; ++k) state = Reducer::merge(state, row_states[k][threadIdx.x]);
    partial[channel * splits + split] = state;
  }
}

// ---- finalize kernels (a thread per channel) -------------------------------------------

template <typename acc_t>
__global__ void finalize_statistics_kernel(const Welford<acc_t>* partial, int64_t splits, int64_t channels,
                                           acc_t* mean, acc_t* var, acc_t* invstd, acc_t eps) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  Welford<acc_t> total = welford_empty<acc_t>();
  for (int64_t k = 0; k < splits; ++k) total = welford_merge(total, partial[c * splits + k]);
  const acc_t variance = welford_variance(total);
  mean[c] = total.mean;
  var[c] = variance;
  if (invstd != nullptr) invstd[c] = acc_t(1) / sqrt(variance + eps);
}

template <typename acc_t>
__global__ void finalize_sums_kernel(const SumPair<acc_t>* partial, int64_t splits, int64_t channels, acc_t* sum_dy,
                                     acc_t* sum_dy_xmu) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= channels) return;
  SumPair<acc_t> total{acc_t(0), acc_t(0)};
  for (int64_t k = 0; k < splits; ++k) {
    total.sum_dy += partial[c * splits + k].sum_dy;
    total.sum_dy_xmu += partial[c * splits + k].sum_dy_xmu;
  }
  sum_dy[c] = total.sum_dy;
  sum_dy_xmu[c] = total.sum_dy_xmu;
}

// ---- elementwise kernels ----------------------------------------------------------------

template <typename scalar_t>
constexpr int vector_size() {
  return sizeof(scalar_t) >= 16 ? 1 : static_cast<int>(16 / sizeof(scalar_t));
}

struct ElementwiseShape {
  int64_t numel;
  int64_t channels;
  int64_t stride_c;  // elements between consecutive channels: S (NCHW) or 1 (channel-inner)
  __device__ __forceinline__ int64_t channel(int64_t i) const { return (i / stride_c) % channels; }
};

// Elements first + [0, kVec): f(element index, input values in acc_t...).
template <typename scalar_t, typename acc_t, int kVec, typename F, typename... Inputs>
__device__ __forceinline__ AlignedVector<scalar_t, kVec> map_vector(int64_t first, const F& f,
                                                                    AlignedVector<Inputs, kVec>... in) {
  AlignedVector<scalar_t, kVec> out;
#pragma unroll
  for (int e = 0; e < kVec; ++e) out.value[e] = static_cast<scalar_t>(f(first + e, static_cast<acc_t>(in.value[e])...));
  return out;
}

// out[i] = f(i, inputs[i]...) for i in [0, numel), in acc_t: a grid-stride
// loop over vectors of 16 bytes, each read and written with one load per
// input and one store where every pointer is aligned (`vectorized`), else
// element by element, as is the tail of numel.
template <typename scalar_t, typename acc_t, typename F, typename... Inputs>
__device__ __forceinline__ void map_elements(scalar_t* __restrict__ out, int64_t numel, bool vectorized, const F& f,
                                             const Inputs* __restrict__... inputs) {
  constexpr int kVec = vector_size<scalar_t>();
  using Vec = AlignedVector<scalar_t, kVec>;
  const int64_t vectors = (numel + kVec - 1) / kVec;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < vectors; v += step) {
    const int64_t first = v * kVec;
    if (vectorized && first + kVec <= numel) {
      const Vec result = map_vector<scalar_t, acc_t, kVec>(
          first, f, load_vector<AlignedVector<Inputs, kVec>>(inputs + first)...);
      store_vector(out + first, result);
    } else {
      for (int64_t i = first; i < min(numel, first + kVec); ++i) {
        out[i] = static_cast<scalar_t>(f(i, static_cast<acc_t>(inputs[i])...));
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void normalize_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, ChannelParams<acc_t> params,
                                 ElementwiseShape shape, bool relu, bool vectorized) {
  map_elements<scalar_t, acc_t>(
      y, shape.numel, vectorized,
      [=](int64_t i, acc_t xi) { return batch_norm_normalize(xi, params.affine(shape.channel(i)), relu); }, x);
}

template <typename scalar_t, typename acc_t>
__global__ void normalize_residual_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ z,
                                          scalar_t* __restrict__ y, ChannelParams<acc_t> params,
                                          ElementwiseShape shape, bool relu, bool vectorized) {
  map_elements<scalar_t, acc_t>(
      y, shape.numel, vectorized,
      [=](int64_t i, acc_t xi, acc_t zi) {
        return batch_norm_normalize(xi, zi, params.affine(shape.channel(i)), relu);
      },
      x, z);
}

template <typename acc_t>
struct BackwardParams {
  ChannelParams<acc_t> channel;
  const acc_t* sum_dy;
  const acc_t* sum_dy_xmu;
  acc_t count;
  bool training;
  bool relu;

  __device__ __forceinline__ acc_t grad_input(acc_t dy, acc_t x, int64_t c) const {
    const acc_t weight = channel.weight != nullptr ? channel.weight[c] : acc_t(1);
    const BatchNormBackwardCoefficients<acc_t> k = batch_norm_backward_coefficients(
        channel.invstd[c], weight, training ? sum_dy[c] : acc_t(0), training ? sum_dy_xmu[c] : acc_t(0), count,
        training);
    const acc_t g = batch_norm_masked_grad(dy, x, channel.affine(c), relu);
    return batch_norm_grad_input(g, x, channel.mean[c], k);
  }
};

template <typename scalar_t, typename acc_t>
__global__ void grad_input_kernel(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                                  scalar_t* __restrict__ dx, BackwardParams<acc_t> params, ElementwiseShape shape,
                                  bool vectorized) {
  map_elements<scalar_t, acc_t>(
      dx, shape.numel, vectorized,
      [=](int64_t i, acc_t dyi, acc_t xi) { return params.grad_input(dyi, xi, shape.channel(i)); }, dy, x);
}

// ---- host side ----------------------------------------------------------------------------

ElementwiseShape elementwise_shape(const BatchNormInput& p) {
  const BatchNormGeometry& g = p.geometry;
  return ElementwiseShape{p.input.numel(), std::max<int64_t>(1, g.channels), g.channels_inner ? 1 : std::max<int64_t>(1, g.spatial)};
}

template <typename acc_t>
const acc_t* optional_pointer(const std::optional<at::Tensor>& tensor) {
  return has_tensor(tensor) ? tensor->const_data_ptr<acc_t>() : nullptr;
}

// Runs the partial kernel of `reducer` over the prepared input and returns
// the partials (C x splits states) and the number of splits. The device is
// full when every SM holds as many blocks as this kernel's occupancy allows.
template <typename Reducer>
std::pair<at::Tensor, int64_t> reduce_partials(const Reducer& reducer, const BatchNormInput& p) {
  using State = typename Reducer::State;
  const BatchNormGeometry& g = p.geometry;
  const auto stream = cuda::current_stream();
  const int64_t sms = cuda::device_properties().multiProcessorCount;
  auto partials = [&](int64_t splits) {
    return at::empty({g.channels * splits * static_cast<int64_t>(sizeof(State))}, p.input.options().dtype(at::kByte));
  };
  if (g.channels_inner) {
    const auto kernel = reduce_channel_inner_kernel<Reducer>;
    const dim3 block(kChannelTile, kRowThreads);
    const int64_t target_blocks = sms * cuda::max_active_blocks_per_sm(kernel, kChannelTile * kRowThreads);
    const ReductionLaunch config = reduction_launch((g.channels + kChannelTile - 1) / kChannelTile, g.rows(),
                                                    kRowThreads * kMinElementsPerThread, target_blocks);
    TORCH_CHECK(config.blocks <= kMaxGridBlocks, "regops batch_norm: too many channels for one launch: ", g.channels);
    at::Tensor partial = partials(config.splits);
    cuda::launch(kernel, dim3(static_cast<unsigned>(config.blocks)), block, 0, stream,
        reducer, reinterpret_cast<State*>(partial.mutable_data_ptr()), g.rows(), g.channels, config.splits);
    REGOPS_KERNEL_LAUNCH_CHECK();
    return {partial, config.splits};
  }
  const auto kernel = reduce_spatial_inner_kernel<Reducer>;
  const int64_t target_blocks = sms * cuda::max_active_blocks_per_sm(kernel, kThreads);
  const ReductionLaunch config =
      reduction_launch(g.channels, g.count_per_channel(), kThreads * kMinElementsPerThread, target_blocks);
  TORCH_CHECK(config.blocks <= kMaxGridBlocks, "regops batch_norm: too many channels for one launch: ", g.channels);
  at::Tensor partial = partials(config.splits);
  cuda::launch(kernel, dim3(static_cast<unsigned>(config.blocks)), kThreads, 0, stream,
      reducer, reinterpret_cast<State*>(partial.mutable_data_ptr()), g.batch, g.channels, g.spatial, config.splits,
      config.items_per_block);
  REGOPS_KERNEL_LAUNCH_CHECK();
  return {partial, config.splits};
}

// mean, biased var and (with eps >= 0) invstd of every channel.
template <typename scalar_t>
void compute_statistics(const BatchNormInput& p, at::Tensor& mean, at::Tensor& var, at::Tensor* invstd, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = p.geometry.channels;
  if (channels == 0) return;
  if (p.input.numel() == 0) {
    mean.zero_();
    var.zero_();
    if (invstd != nullptr) invstd->fill_(1.0 / std::sqrt(eps));
    return;
  }
  auto [partial, splits] = reduce_partials(StatisticsReducer<scalar_t, acc_t>{p.input.const_data_ptr<scalar_t>()}, p);
  const auto stream = cuda::current_stream();
  cuda::launch(finalize_statistics_kernel<acc_t>, (channels + kFinalizeThreads - 1) / kFinalizeThreads,
               kFinalizeThreads, 0, stream,
      reinterpret_cast<const Welford<acc_t>*>(partial.const_data_ptr()), splits, channels, mean.mutable_data_ptr<acc_t>(),
      var.mutable_data_ptr<acc_t>(), invstd != nullptr ? invstd->mutable_data_ptr<acc_t>() : nullptr,
      static_cast<acc_t>(eps));
  REGOPS_KERNEL_LAUNCH_CHECK();
}

// With a defined residual the mask includes it and grad_residual receives
// the masked dy.
template <typename scalar_t>
void compute_gradient_sums(const BatchNormInput& p, const at::Tensor& dy,
                           const ChannelParams<at::opmath_type<scalar_t>>& params, bool relu, at::Tensor& sum_dy,
                           at::Tensor& sum_dy_xmu, const at::Tensor& residual = at::Tensor(),
                           at::Tensor grad_residual = at::Tensor()) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = p.geometry.channels;
  if (channels == 0) return;
  if (p.input.numel() == 0) {
    sum_dy.zero_();
    sum_dy_xmu.zero_();
    return;
  }
  auto [partial, splits] = reduce_partials(
      GradientSumsReducer<scalar_t, acc_t>{
          dy.const_data_ptr<scalar_t>(), p.input.const_data_ptr<scalar_t>(), params, relu,
          residual.defined() ? residual.const_data_ptr<scalar_t>() : nullptr,
          residual.defined() ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr}, p);
  const auto stream = cuda::current_stream();
  cuda::launch(finalize_sums_kernel<acc_t>, (channels + kFinalizeThreads - 1) / kFinalizeThreads, kFinalizeThreads, 0,
               stream,
      reinterpret_cast<const SumPair<acc_t>*>(partial.const_data_ptr()), splits, channels,
      sum_dy.mutable_data_ptr<acc_t>(), sum_dy_xmu.mutable_data_ptr<acc_t>());
  REGOPS_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_normalize(const BatchNormInput& p, at::Tensor& output,
                      const ChannelParams<at::opmath_type<scalar_t>>& params, bool relu,
                      const at::Tensor& residual = at::Tensor()) {
  const int64_t numel = p.input.numel();
  if (numel == 0) return;
  const scalar_t* x = p.input.const_data_ptr<scalar_t>();
  scalar_t* y = output.mutable_data_ptr<scalar_t>();
  const int64_t vectors = (numel + vector_size<scalar_t>() - 1) / vector_size<scalar_t>();
  if (residual.defined()) {
    const scalar_t* z = residual.const_data_ptr<scalar_t>();
    const auto kernel = normalize_residual_kernel<scalar_t, at::opmath_type<scalar_t>>;
    cuda::launch(kernel, grid_size_for(kernel, vectors, kThreads), kThreads, 0, cuda::current_stream(),
        x, z, y, params, elementwise_shape(p), relu, can_vectorize({x, z, y}));
    REGOPS_KERNEL_LAUNCH_CHECK();
    return;
  }
  const auto kernel = normalize_kernel<scalar_t, at::opmath_type<scalar_t>>;
  cuda::launch(kernel, grid_size_for(kernel, vectors, kThreads), kThreads, 0, cuda::current_stream(),
      x, y, params, elementwise_shape(p), relu, can_vectorize({x, y}));
  REGOPS_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_grad_input(const BatchNormInput& p, const at::Tensor& dy, at::Tensor& dx,
                       const BackwardParams<at::opmath_type<scalar_t>>& params) {
  const int64_t numel = p.input.numel();
  if (numel == 0) return;
  const scalar_t* x = p.input.const_data_ptr<scalar_t>();
  const scalar_t* g = dy.const_data_ptr<scalar_t>();
  scalar_t* out = dx.mutable_data_ptr<scalar_t>();
  const auto kernel = grad_input_kernel<scalar_t, at::opmath_type<scalar_t>>;
  const int64_t vectors = (numel + vector_size<scalar_t>() - 1) / vector_size<scalar_t>();
  cuda::launch(kernel, grid_size_for(kernel, vectors, kThreads), kThreads, 0, cuda::current_stream(),
      g, x, out, params, elementwise_shape(p), can_vectorize({x, g, out}));
  REGOPS_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
ChannelParams<acc_t> channel_params(const at::Tensor& mean, const at::Tensor& invstd,
                                    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  return ChannelParams<acc_t>{mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(), optional_pointer<acc_t>(weight),
                              optional_pointer<acc_t>(bias)};
}

std::optional<at::Tensor> contiguous_or_none(const std::optional<at::Tensor>& tensor) {
  return has_tensor(tensor) ? std::optional<at::Tensor>(tensor->contiguous()) : std::nullopt;
}

std::tuple<at::Tensor, at::Tensor> batch_norm_stats_cuda(const at::Tensor& input) {
  check_batch_norm_input(input, "batch_norm_stats");
  const cuda::DeviceGuard guard(input.device());
  const BatchNormInput p = prepare_batch_norm_input(input);
  at::Tensor mean = at::empty({input.size(1)}, accumulate_options(input));
  at::Tensor var = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "regops_batch_norm_stats_cuda", [&] {
    compute_statistics<scalar_t>(p, mean, var, nullptr, 0.0);
  });
  return {mean, var};
}

at::Tensor batch_norm_elementwise_cuda(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& invstd,
                                       const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                       bool relu) {
  const char* op = "batch_norm_elementwise";
  check_elementwise_arguments(input, mean, invstd, weight, bias, op);
  const cuda::DeviceGuard guard(input.device());
  const BatchNormInput p = prepare_batch_norm_input(input);
  at::Tensor output = at::empty_like(p.input);
  const at::Tensor m = mean.contiguous(), s = invstd.contiguous();
  const auto w = contiguous_or_none(weight), b = contiguous_or_none(bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "regops_batch_norm_elementwise_cuda", [&] {
    launch_normalize<scalar_t>(p, output, channel_params<at::opmath_type<scalar_t>>(m, s, w, b), relu);
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor> batch_norm_backward_reduce_cuda(const at::Tensor& grad_out, const at::Tensor& input,
                                                                   const at::Tensor& mean, const at::Tensor& invstd,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias, bool relu) {
  const char* op = "batch_norm_backward_reduce";
  check_backward_reduce_arguments(grad_out, input, mean, invstd, weight, bias, op);
  const cuda::DeviceGuard guard(input.device());
  const BatchNormInput p = prepare_batch_norm_input(input);
  const at::Tensor dy = grad_out.contiguous(p.format);
  at::Tensor sum_dy = at::empty({input.size(1)}, accumulate_options(input));
  at::Tensor sum_dy_xmu = at::empty_like(sum_dy);
  const at::Tensor m = mean.contiguous(), s = invstd.contiguous();
  const auto w = contiguous_or_none(weight), b = contiguous_or_none(bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "regops_batch_norm_backward_reduce_cuda", [&] {
    compute_gradient_sums<scalar_t>(p, dy, channel_params<at::opmath_type<scalar_t>>(m, s, w, b), relu, sum_dy, sum_dy_xmu);
  });
  return {sum_dy, sum_dy_xmu};
}

at::Tensor batch_norm_backward_elementwise_cuda(const at::Tensor& grad_out, const at::Tensor& input,
                                                const at::Tensor& mean, const at::Tensor& invstd,
                                                const std::optional<at::Tensor>& weight,
                                                const std::optional<at::Tensor>& bias, const at::Tensor& sum_dy,
                                                const at::Tensor& sum_dy_xmu, int64_t count, bool relu) {
  const char* op = "batch_norm_backward_elementwise";
  check_backward_elementwise_arguments(grad_out, input, mean, invstd, weight, bias, sum_dy, sum_dy_xmu, count, op);
  const cuda::DeviceGuard guard(input.device());
  const BatchNormInput p = prepare_batch_norm_input(input);
  const at::Tensor dy = grad_out.contiguous(p.format);
  at::Tensor dx = at::empty_like(p.input);
  const at::Tensor m = mean.contiguous(), s = invstd.contiguous(), a = sum_dy.contiguous(), c = sum_dy_xmu.contiguous();
  const auto w = contiguous_or_none(weight), b = contiguous_or_none(bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "regops_batch_norm_backward_elementwise_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardParams<acc_t> params{channel_params<acc_t>(m, s, w, b), a.const_data_ptr<acc_t>(),
                                       c.const_data_ptr<acc_t>(), static_cast<acc_t>(count), true, relu};
    launch_grad_input<scalar_t>(p, dy, dx, params);
  });
  return dx;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_forward_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var, bool training,
    double eps, bool relu, const std::optional<at::Tensor>& residual) {
  const char* op = "batch_norm_forward";
  check_forward_arguments(input, weight, bias, running_mean, running_var, training, residual, op);
  const cuda::DeviceGuard guard(input.device());
  const BatchNormInput p = prepare_batch_norm_input(input);
  const at::Tensor z = prepare_residual(residual, p);
  const at::TensorOptions options = accumulate_options(input);
  at::Tensor output = at::empty_like(p.input);
  at::Tensor mean, invstd, batch_var;
  if (training) {
    mean = at::empty({input.size(1)}, options);
    invstd = at::empty_like(mean);
    batch_var = at::empty_like(mean);
  } else {
    mean = running_mean->contiguous().clone();
    invstd = at::rsqrt(*running_var + eps).contiguous();
    batch_var = at::empty({0}, options);
  }
  const auto w = contiguous_or_none(weight), b = contiguous_or_none(bias);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "regops_batch_norm_forward_cuda", [&] {
    if (training) compute_statistics<scalar_t>(p, mean, batch_var, &invstd, eps);
    launch_normalize<scalar_t>(p, output, channel_params<at::opmath_type<scalar_t>>(mean, invstd, w, b), relu, z);
  });
  return {output, mean, invstd, batch_var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> batch_norm_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& save_mean, const at::Tensor& save_invstd, bool training,
    bool relu, const std::optional<at::Tensor>& residual) {
  const char* op = "batch_norm_backward";
  check_backward_arguments(grad_out, input, weight, bias, save_mean, save_invstd, residual, op);
  const cuda::DeviceGuard guard(input.device());
  const BatchNormInput p = prepare_batch_norm_input(input);
  const at::Tensor dy = grad_out.contiguous(p.format);
  const at::Tensor z = prepare_residual(residual, p);
  at::Tensor grad_residual = z.defined() ? at::empty_like(p.input) : at::empty({0}, input.options());
  at::Tensor dx = at::empty_like(p.input);
  const at::TensorOptions options = accumulate_options(input);
  at::Tensor sum_dy = at::empty({input.size(1)}, options);
  at::Tensor sum_dy_xmu = at::empty_like(sum_dy);
  const at::Tensor m = save_mean.contiguous(), s = save_invstd.contiguous();
  const auto w = contiguous_or_none(weight), b = contiguous_or_none(bias);
  const int64_t count = std::max<int64_t>(1, p.geometry.count_per_channel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "regops_batch_norm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const ChannelParams<acc_t> params = channel_params<acc_t>(m, s, w, b);
    compute_gradient_sums<scalar_t>(p, dy, params, relu, sum_dy, sum_dy_xmu, z, grad_residual);
    // With a residual the reduction wrote the masked dy: grad_input needs no mask.
    const BackwardParams<acc_t> backward{params, sum_dy.const_data_ptr<acc_t>(), sum_dy_xmu.const_data_ptr<acc_t>(),
                                         static_cast<acc_t>(count), training, relu && !z.defined()};
    launch_grad_input<scalar_t>(p, z.defined() ? grad_residual : dy, dx, backward);
  });
  return {dx, sum_dy_xmu * s, sum_dy, grad_residual};
}

}  // namespace

REGOPS_CUDA_LIBRARY_IMPL(m) {
  m.impl("batch_norm_forward", &batch_norm_forward_cuda);
  m.impl("batch_norm_backward", &batch_norm_backward_cuda);
  m.impl("batch_norm_stats", &batch_norm_stats_cuda);
  m.impl("batch_norm_elementwise", &batch_norm_elementwise_cuda);
  m.impl("batch_norm_backward_reduce", &batch_norm_backward_reduce_cuda);
  m.impl("batch_norm_backward_elementwise", &batch_norm_backward_elementwise_cuda);
}

}  // namespace regops
