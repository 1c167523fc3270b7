// Layer normalization and RMSNorm on CUDA, fused with dropout and a residual
// add (formulas: csrc/include/regops/layer_norm.h).
//
// Work split: a row goes to one warp when hidden <= kWarpRowLimit (eight rows
// per 256-thread block, reductions by shuffles only) and to a whole block
// otherwise (shuffles, then the eight warp sums through shared memory). Rows
// are visited with a grid-stride loop. A row's threads walk it with a stride
// of their count, so every access of a warp is coalesced; when hidden is a
// multiple of a 16-byte vector of every tensor's dtype and every pointer is
// 16-byte aligned, they move whole 16-byte vectors, else scalars.
//
// The dropout mask is drawn first by a kernel that writes one mask byte per
// thread (the dropout random rule, as the dropout kernel draws it): bytes
// span rows when hidden % 8 != 0, so the row kernels only read bits.
// Statistics are exact two-pass ones (mean, then the centred second moment)
// in float32 (float64 for float64): the row is re-read for each pass, which
// the L1 and L2 caches serve for the rows of one block. Traffic per element:
// forward reads x (and the residual) and writes y (and h), 1/8 byte of mask
// written and read; backward reads dy (and dh) and h and writes dx (and
// dresidual).
//
// grad_weight and grad_bias: each row slot (a warp or a block of a fixed
// grid) sums its rows into its own partial row, and a second kernel adds the
// partials in slot order: deterministic, no atomics.
#include "regops/aten.h"
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <type_traits>

#include "regops/cuda_utils.cuh"
#include "regops/dropout.h"
#include "regops/layer_norm.h"
#include "regops/layer_norm_host.h"
#include "regops/philox.h"

namespace regops {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kWarpRowLimit = 1024;
// Four resident blocks per SM in the launch bounds: without a minimum, ptxas
// held the 16-bit-input / float32-h variants to 32 registers and spilled.
constexpr int kMinBlocksPerSm = 4;
// The backward of float64 rows holds twice the registers of float32 ones:
// with four blocks per SM (64 registers a thread) its vector path spilled
// (sm_80 and sm_90, 16-48 bytes); two leave it 128.
template <typename scalar_t>
constexpr int kBackwardMinBlocksPerSm = sizeof(scalar_t) == 8 ? 2 : kMinBlocksPerSm;
// The backward's partial rows (slots x hidden, two of them) stay under this
// many elements.
constexpr int64_t kMaxPartialElements = int64_t{1} << 23;

struct SeedArg {
  const int64_t* device_pointer;
  uint64_t value;
  __device__ __forceinline__ uint64_t get() const {
    return device_pointer != nullptr ? static_cast<uint64_t>(*device_pointer) : value;
  }
};

SeedArg make_seed_arg(const at::Tensor& seed) {
  if (cuda::on_device(seed)) return SeedArg{seed.const_data_ptr<int64_t>(), 0};
  return SeedArg{nullptr, read_seed(seed)};
}

__global__ void layer_norm_mask_kernel(uint8_t* __restrict__ mask, int64_t numel, int64_t mask_bytes,
                                       SeedArg seed_arg, uint64_t offset, uint64_t threshold) {
  const uint64_t seed = seed_arg.get();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t byte = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; byte < mask_bytes;
       byte += stride) {
    mask[byte] = byte * 8 < numel ? static_cast<uint8_t>(dropout_keep_byte(seed, offset, byte, numel, threshold)) : 0;
  }
}

at::Tensor make_mask(int64_t numel, double p, const at::Tensor& seed, int64_t offset, const at::TensorOptions& options) {
  const int64_t mask_bytes = dropout_mask_bytes(numel);
  at::Tensor mask = at::empty({mask_bytes}, options.dtype(at::kByte));
  cuda::launch(layer_norm_mask_kernel, grid_size_for(layer_norm_mask_kernel, mask_bytes, kThreads), kThreads, 0, cuda::current_stream(),
               mask.mutable_data_ptr<uint8_t>(), numel, mask_bytes, make_seed_arg(seed),
               static_cast<uint64_t>(offset), dropout_threshold(p));
  REGOPS_KERNEL_LAUNCH_CHECK();
  return mask;
}

// How a block's threads share rows.
struct RowSplit {
  int threads_per_row;  // 32 (a warp) or kThreads (the block)
  __device__ __forceinline__ int rows_per_block() const { return kThreads / threads_per_row; }
  __device__ __forceinline__ int lane() const { return static_cast<int>(threadIdx.x) % threads_per_row; }
  __device__ __forceinline__ int slot() const { return static_cast<int>(threadIdx.x) / threads_per_row; }
};

RowSplit row_split(int64_t hidden) { return RowSplit{hidden <= kWarpRowLimit ? 32 : kThreads}; }

// fn(j, width) for this thread's pieces of a row: whole 16-byte vectors
// (width kVec, as a std::integral_constant) when vectorized, else single
// elements (width 1). A row's threads take consecutive pieces, so a thread
// visits the same columns in every pass over a row.
template <int kVec, typename Fn>
__device__ __forceinline__ void for_row_pieces(int64_t hidden, RowSplit split, bool vectorized, Fn fn) {
  if (vectorized) {
    for (int64_t j = static_cast<int64_t>(split.lane()) * kVec; j < hidden; j += split.threads_per_row * kVec) {
      fn(j, std::integral_constant<int, kVec>{});
    }
  } else {
    for (int64_t j = split.lane(); j < hidden; j += split.threads_per_row) fn(j, std::integral_constant<int, 1>{});
  }
}

// The width of a piece's values (an array reference of for_row_pieces' width).
template <typename Array>
constexpr int piece_width = static_cast<int>(std::extent_v<std::remove_cv_t<std::remove_reference_t<Array>>>);

// The sum of `value` over a row's threads, the same in every one of them
// (a fixed shuffle tree, then the warps in order: deterministic).
template <typename acc_t>
__device__ __forceinline__ acc_t row_sum(acc_t value, RowSplit split, acc_t* warp_sums) {
#pragma unroll
  for (int delta = 16; delta > 0; delta /= 2) value += __shfl_xor_sync(0xffffffffu, value, delta);
  if (split.threads_per_row == 32) return value;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  __syncthreads();  // the previous sum's readers are done with warp_sums
  if (threadIdx.x % 32 == 0) warp_sums[warp] = value;
  __syncthreads();
  acc_t total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += warp_sums[w];
  return total;
}

template <typename acc_t>
__device__ __forceinline__ acc_t keep_factor(const uint8_t* mask, int64_t i, acc_t scale) {
  return static_cast<acc_t>((mask[i >> 3] >> (i & 7)) & 1) * scale;
}

template <typename scalar_t, typename h_t>
struct ForwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  const h_t* residual;  // may be null
  const acc_t* weight;  // may be null: 1
  const acc_t* bias;    // may be null: 0
  const uint8_t* mask;  // null: no dropout
  scalar_t* out;
  h_t* h_out;           // may be null
  acc_t* mean_out;      // null for RMSNorm
  acc_t* rstd_out;
  int64_t rows, hidden;
  acc_t scale, eps;
  bool rms;

  // h of element i, as stored (dropout rounded to x's dtype, the sum to h's).
  __device__ __forceinline__ acc_t h(int64_t i, scalar_t x_value, h_t residual_value) const {
    acc_t v = static_cast<acc_t>(x_value);
    if (mask != nullptr) v = static_cast<acc_t>(static_cast<scalar_t>(v * keep_factor(mask, i, scale)));
    if (residual != nullptr) v = static_cast<acc_t>(static_cast<h_t>(v + static_cast<acc_t>(residual_value)));
    return v;
  }

  // h of the kWidth elements from i: one vector load of x (and of the
  // residual) each.
  template <int kWidth>
  __device__ __forceinline__ void load_h(int64_t i, acc_t (&values)[kWidth]) const {
    const auto xv = load_vector<AlignedVector<scalar_t, kWidth>>(x + i);
    AlignedVector<h_t, kWidth> rv{};
    if (residual != nullptr) rv = load_vector<AlignedVector<h_t, kWidth>>(residual + i);
#pragma unroll
    for (int e = 0; e < kWidth; ++e) values[e] = h(i + e, xv.value[e], rv.value[e]);
  }
};

// visit(j, h) for this thread's pieces of a row (for_row_pieces): h holds
// the values of columns j, j + 1, ...
template <int kVec, typename scalar_t, typename h_t, typename Visit>
__device__ __forceinline__ void for_row_h(const ForwardArgs<scalar_t, h_t>& args, int64_t base, RowSplit split,
                                          bool vectorized, Visit visit) {
  using acc_t = at::opmath_type<scalar_t>;
  for_row_pieces<kVec>(args.hidden, split, vectorized, [&](int64_t j, auto width) {
    acc_t h[decltype(width)::value];
    args.load_h(base + j, h);
    visit(j, h);
  });
}

template <int kVec, typename scalar_t, typename h_t>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm)
    layer_norm_forward_kernel(ForwardArgs<scalar_t, h_t> args, RowSplit split, bool vectorized) {
  using acc_t = at::opmath_type<scalar_t>;
  REGOPS_SHARED_ARRAY(acc_t, warp_sums, [kWarps]);
  const int64_t rows_per_step = static_cast<int64_t>(gridDim.x) * split.rows_per_block();
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(args.hidden);
  // Every thread of a block runs the same number of steps (row_sum may sync the block).
  for (int64_t first_row = static_cast<int64_t>(blockIdx.x) * split.rows_per_block(); first_row < args.rows;
       first_row += rows_per_step) {
    const int64_t row = first_row + split.slot();
    const bool active = row < args.rows;  // uniform over a row's threads
    const int64_t base = row * args.hidden;
    acc_t sum = 0;
    if (active && !args.rms) {
      for_row_h<kVec>(args, base, split, vectorized, [&](int64_t, const auto& h) {
#pragma unroll
        for (int e = 0; e < piece_width<decltype(h)>; ++e) sum += h[e];
      });
    }
    const acc_t mean = args.rms ? acc_t(0) : row_sum(sum, split, &warp_sums[0]) * inv_n;
    acc_t second = 0;
    if (active) {
      for_row_h<kVec>(args, base, split, vectorized, [&](int64_t, const auto& h) {
#pragma unroll
        for (int e = 0; e < piece_width<decltype(h)>; ++e) second += (h[e] - mean) * (h[e] - mean);
      });
    }
    const acc_t rstd = layer_norm_rstd(row_sum(second, split, &warp_sums[0]) * inv_n, args.eps);
    if (!active) continue;
    if (split.lane() == 0) {
      if (args.mean_out != nullptr) args.mean_out[row] = mean;
      args.rstd_out[row] = rstd;
    }
    const auto normalize = [&](int64_t j, acc_t h) {
      acc_t y = (h - mean) * rstd;
      if (args.weight != nullptr) y = y * args.weight[j];
      if (args.bias != nullptr) y = y + args.bias[j];
      return static_cast<scalar_t>(y);
    };
    for_row_h<kVec>(args, base, split, vectorized, [&](int64_t j, const auto& h) {
      constexpr int kWidth = piece_width<decltype(h)>;
      AlignedVector<scalar_t, kWidth> y;
      AlignedVector<h_t, kWidth> h_stored;
#pragma unroll
      for (int e = 0; e < kWidth; ++e) {
        y.value[e] = normalize(j + e, h[e]);
        h_stored.value[e] = static_cast<h_t>(h[e]);
      }
      store_vector(args.out + base + j, y);
      if (args.h_out != nullptr) store_vector(args.h_out + base + j, h_stored);
    });
  }
}

// Vector width (elements) for a pair of dtypes: 16 bytes of the wider one.
template <typename scalar_t, typename h_t>
constexpr int vector_elements() {
  return 16 / (sizeof(scalar_t) > sizeof(h_t) ? sizeof(scalar_t) : sizeof(h_t));
}

int64_t row_blocks(int64_t rows, int64_t hidden) {
  const int64_t rows_per_block = kThreads / row_split(hidden).threads_per_row;
  return (rows + rows_per_block - 1) / rows_per_block;
}

template <typename scalar_t, typename h_t>
void launch_forward(const ForwardArgs<scalar_t, h_t>& args, std::initializer_list<const void*> pointers) {
  constexpr int kVec = vector_elements<scalar_t, h_t>();
  const RowSplit split = row_split(args.hidden);
  const bool vectorized = args.hidden % kVec == 0 && can_vectorize(pointers);
  const auto kernel = layer_norm_forward_kernel<kVec, scalar_t, h_t>;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(row_blocks(args.rows, args.hidden),
                                                                grid_size_for(kernel, args.rows * kThreads, kThreads)));
  cuda::launch(kernel, blocks, kThreads, 0, cuda::current_stream(), args, split, vectorized);
  REGOPS_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_forward_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double p, const std::optional<at::Tensor>& seed, int64_t offset,
    double eps, bool rms, bool store_mask, bool store_h, bool residual_in_fp32) {
  check_layer_norm_forward(input, residual, weight, bias, p, seed, offset, eps);
  TORCH_CHECK(!store_mask || seed.has_value(), "regops layer_norm: store_mask needs a seed (dropout)");
  const cuda::DeviceGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  const at::ScalarType h_type = layer_norm_h_type(input, residual, residual_in_fp32);
  const at::Tensor res = residual.has_value() ? residual->to(h_type).contiguous() : at::Tensor();
  const at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  LayerNormOutputs outs = allocate_layer_norm_outputs(x, h_type, rms, store_mask, store_h);
  if (x.numel() == 0) return {outs.output, outs.h, outs.mean, outs.rstd, outs.mask};
  at::Tensor mask;
  if (seed.has_value()) {
    mask = make_mask(x.numel(), p, *seed, offset, x.options());
    if (store_mask) outs.mask = mask;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "regops_layer_norm_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto run = [&](auto h_tag) {
      using h_t = typename decltype(h_tag)::type;
      ForwardArgs<scalar_t, h_t> args{x.const_data_ptr<scalar_t>(),
                                      res.defined() ? res.const_data_ptr<h_t>() : nullptr,
                                      w.defined() ? w.const_data_ptr<acc_t>() : nullptr,
                                      b.defined() ? b.const_data_ptr<acc_t>() : nullptr,
                                      mask.defined() ? mask.const_data_ptr<uint8_t>() : nullptr,
                                      outs.output.mutable_data_ptr<scalar_t>(),
                                      store_h ? outs.h.mutable_data_ptr<h_t>() : nullptr,
                                      rms ? nullptr : outs.mean.mutable_data_ptr<acc_t>(),
                                      outs.rstd.mutable_data_ptr<acc_t>(), x.size(0), x.size(1),
                                      static_cast<acc_t>(dropout_scale(p)), static_cast<acc_t>(eps), rms};
      launch_forward(args, {args.x, args.residual, args.out, args.h_out});
    };
    if (h_type == x.scalar_type()) run(TypeTag<scalar_t>{});
    else run(TypeTag<float>{});
  });
  return {outs.output, outs.h, outs.mean, outs.rstd, outs.mask};
}

template <typename scalar_t, typename h_t>
struct BackwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* dy;
  const h_t* grad_h;    // may be null
  const h_t* h;
  const acc_t* weight;  // may be null
  const acc_t* mean;    // null for RMSNorm
  const acc_t* rstd;
  const uint8_t* mask;  // null: no dropout
  scalar_t* grad_input;
  h_t* grad_residual;   // may be null
  acc_t* weight_partials;  // (slots, hidden) or null
  acc_t* bias_partials;    // (slots, hidden) or null
  int64_t rows, hidden;
  acc_t scale;
};

// visit(j, dy, h) for this thread's pieces of a row (for_row_pieces, the
// walk of for_row_h): dy and h hold the values of columns j, j + 1, ...
template <int kVec, typename scalar_t, typename h_t, typename Visit>
__device__ __forceinline__ void for_row_gradients(const BackwardArgs<scalar_t, h_t>& args, int64_t base,
                                                  RowSplit split, bool vectorized, Visit visit) {
  using acc_t = at::opmath_type<scalar_t>;
  for_row_pieces<kVec>(args.hidden, split, vectorized, [&](int64_t j, auto width) {
    constexpr int kWidth = decltype(width)::value;
    const auto dyv = load_vector<AlignedVector<scalar_t, kWidth>>(args.dy + base + j);
    const auto hv = load_vector<AlignedVector<h_t, kWidth>>(args.h + base + j);
    acc_t dy[kWidth], h[kWidth];
#pragma unroll
    for (int e = 0; e < kWidth; ++e) {
      dy[e] = static_cast<acc_t>(dyv.value[e]);
      h[e] = static_cast<acc_t>(hv.value[e]);
    }
    visit(j, dy, h);
  });
}

template <int kVec, typename scalar_t, typename h_t>
__global__ void __launch_bounds__(kThreads, kBackwardMinBlocksPerSm<scalar_t>)
    layer_norm_backward_kernel(BackwardArgs<scalar_t, h_t> args, RowSplit split, bool vectorized) {
  using acc_t = at::opmath_type<scalar_t>;
  REGOPS_SHARED_ARRAY(acc_t, warp_sums, [kWarps]);
  const int64_t rows_per_step = static_cast<int64_t>(gridDim.x) * split.rows_per_block();
  const int64_t slot = static_cast<int64_t>(blockIdx.x) * split.rows_per_block() + split.slot();
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(args.hidden);
  acc_t* dweight = args.weight_partials != nullptr ? args.weight_partials + slot * args.hidden : nullptr;
  acc_t* dbias = args.bias_partials != nullptr ? args.bias_partials + slot * args.hidden : nullptr;
  // Zeroed in the walk of for_row_gradients, so that every row's visit of
  // a column is by the thread that zeroed its partials.
  const int step = vectorized ? kVec : 1;
  for (int64_t j = static_cast<int64_t>(split.lane()) * step; j < args.hidden; j += split.threads_per_row * step) {
    for (int e = 0; e < step; ++e) {
      if (dweight != nullptr) dweight[j + e] = 0;
      if (dbias != nullptr) dbias[j + e] = 0;
    }
  }
  for (int64_t first_row = static_cast<int64_t>(blockIdx.x) * split.rows_per_block(); first_row < args.rows;
       first_row += rows_per_step) {
    const int64_t row = first_row + split.slot();
    const bool active = row < args.rows;
    const int64_t base = row * args.hidden;
    const acc_t mean = active && args.mean != nullptr ? args.mean[row] : acc_t(0);
    const acc_t rstd = active ? args.rstd[row] : acc_t(0);
    acc_t sum_g = 0, sum_g_xhat = 0;
    if (active) {
      for_row_gradients<kVec>(args, base, split, vectorized, [&](int64_t j, const auto& dy, const auto& h) {
#pragma unroll
        for (int e = 0; e < piece_width<decltype(h)>; ++e) {
          const acc_t xhat = (h[e] - mean) * rstd;
          const acc_t g = args.weight != nullptr ? dy[e] * args.weight[j + e] : dy[e];
          sum_g += g;
          sum_g_xhat += g * xhat;
          // Each slot owns its partial row, and a row's threads own distinct columns.
          if (dweight != nullptr) dweight[j + e] += dy[e] * xhat;
          if (dbias != nullptr) dbias[j + e] += dy[e];
        }
      });
    }
    const acc_t mean_g = args.mean != nullptr ? row_sum(sum_g, split, &warp_sums[0]) * inv_n : acc_t(0);
    const acc_t mean_g_xhat = row_sum(sum_g_xhat, split, &warp_sums[0]) * inv_n;
    if (!active) continue;
    const auto grad_h = [&](int64_t j, acc_t dy, acc_t h) {
      const acc_t xhat = (h - mean) * rstd;
      const acc_t g = args.weight != nullptr ? dy * args.weight[j] : dy;
      return layer_norm_grad_h(g, xhat, rstd, mean_g, mean_g_xhat);
    };
    for_row_gradients<kVec>(args, base, split, vectorized, [&](int64_t j, const auto& dy, const auto& h) {
      constexpr int kWidth = piece_width<decltype(h)>;
      AlignedVector<h_t, kWidth> dhv{};
      if (args.grad_h != nullptr) dhv = load_vector<AlignedVector<h_t, kWidth>>(args.grad_h + base + j);
      AlignedVector<scalar_t, kWidth> dxv;
      AlignedVector<h_t, kWidth> drv;
#pragma unroll
      for (int e = 0; e < kWidth; ++e) {
        acc_t dh = grad_h(j + e, dy[e], h[e]);
        if (args.grad_h != nullptr) dh += static_cast<acc_t>(dhv.value[e]);
        drv.value[e] = static_cast<h_t>(dh);
        if (args.mask != nullptr) dh *= keep_factor(args.mask, base + j + e, args.scale);
        dxv.value[e] = static_cast<scalar_t>(dh);
      }
      if (args.grad_residual != nullptr) store_vector(args.grad_residual + base + j, drv);
      store_vector(args.grad_input + base + j, dxv);
    });
  }
}

// total[j] = sum over slots s, in order, of partials[s][j].
template <typename acc_t>
__global__ void layer_norm_reduce_partials_kernel(const acc_t* __restrict__ partials, acc_t* __restrict__ total,
                                                  int64_t slots, int64_t hidden) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < hidden; j += stride) {
    acc_t sum = 0;
    for (int64_t s = 0; s < slots; ++s) sum += partials[s * hidden + j];
    total[j] = sum;
  }
}

template <typename acc_t>
void reduce_partials(const at::Tensor& partials, at::Tensor& total) {
  const int64_t hidden = total.numel();
  const auto kernel = layer_norm_reduce_partials_kernel<acc_t>;
  cuda::launch(kernel, grid_size_for(kernel, hidden, kThreads), kThreads, 0, cuda::current_stream(),
               partials.const_data_ptr<acc_t>(), total.mutable_data_ptr<acc_t>(), partials.size(0), hidden);
  REGOPS_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_h, const at::Tensor& h,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& seed, double p, int64_t offset, bool rms,
    bool has_residual, bool has_bias) {
  check_layer_norm_backward(grad_out, grad_h, h, weight, mean, rstd, mask, seed, p, offset, rms);
  const cuda::DeviceGuard guard(grad_out.device());
  const at::Tensor dy = grad_out.contiguous(), h_work = h.contiguous();
  const at::Tensor dh = grad_h.has_value() ? grad_h->contiguous() : at::Tensor();
  const int64_t rows = dy.size(0), hidden = dy.size(1);
  const auto acc = dy.options().dtype(layer_norm_accumulate_type(dy.scalar_type()));
  at::Tensor grad_input = at::empty_like(dy);
  at::Tensor grad_residual = at::empty(has_residual ? dy.sizes() : at::IntArrayRef{0}, h.options());
  const bool want_weight = weight.has_value();
  at::Tensor grad_weight = want_weight ? at::zeros({hidden}, acc) : at::empty({0}, acc);
  at::Tensor grad_bias = has_bias ? at::zeros({hidden}, acc) : at::empty({0}, acc);
  if (dy.numel() == 0) return {grad_input, grad_residual, grad_weight, grad_bias};
  at::Tensor keep;
  if (mask.has_value()) keep = mask->contiguous();
  else if (seed.has_value()) keep = make_mask(dy.numel(), p, *seed, offset, dy.options());
  const RowSplit split = row_split(hidden);
  const int64_t rows_per_block = kThreads / split.threads_per_row;
  const int64_t max_blocks = std::max<int64_t>(1, kMaxPartialElements / (hidden * rows_per_block));
  const at::Tensor w = want_weight ? weight->contiguous() : at::Tensor();
  const at::Tensor m = mean.contiguous(), r = rstd.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "regops_layer_norm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto run = [&](auto h_tag) {
      using h_t = typename decltype(h_tag)::type;
      constexpr int kVec = vector_elements<scalar_t, h_t>();
      const auto kernel = layer_norm_backward_kernel<kVec, scalar_t, h_t>;
      const int64_t blocks = std::max<int64_t>(1, std::min({row_blocks(rows, hidden), max_blocks,
                                                            grid_size_for(kernel, rows * kThreads, kThreads)}));
      const int64_t slots = blocks * rows_per_block;
      at::Tensor weight_partials = want_weight ? at::empty({slots, hidden}, acc) : at::Tensor();
      at::Tensor bias_partials = has_bias ? at::empty({slots, hidden}, acc) : at::Tensor();
      BackwardArgs<scalar_t, h_t> args{dy.const_data_ptr<scalar_t>(), dh.defined() ? dh.const_data_ptr<h_t>() : nullptr,
                                       h_work.const_data_ptr<h_t>(), want_weight ? w.const_data_ptr<acc_t>() : nullptr,
                                       rms ? nullptr : m.const_data_ptr<acc_t>(), r.const_data_ptr<acc_t>(),
                                       keep.defined() ? keep.const_data_ptr<uint8_t>() : nullptr,
                                       grad_input.mutable_data_ptr<scalar_t>(),
                                       has_residual ? grad_residual.mutable_data_ptr<h_t>() : nullptr,
                                       want_weight ? weight_partials.mutable_data_ptr<acc_t>() : nullptr,
                                       has_bias ? bias_partials.mutable_data_ptr<acc_t>() : nullptr, rows, hidden,
                                       static_cast<acc_t>(dropout_scale(p))};
      const bool vectorized = hidden % kVec == 0 && can_vectorize({args.dy, args.grad_h, args.h, args.grad_input,
                                                                    args.grad_residual});
      cuda::launch(kernel, blocks, kThreads, 0, cuda::current_stream(), args, split, vectorized);
      REGOPS_KERNEL_LAUNCH_CHECK();
      if (want_weight) reduce_partials<acc_t>(weight_partials, grad_weight);
      if (has_bias) reduce_partials<acc_t>(bias_partials, grad_bias);
    };
    if (h.scalar_type() == dy.scalar_type()) run(TypeTag<scalar_t>{});
    else run(TypeTag<float>{});
  });
  return {grad_input, grad_residual, grad_weight, grad_bias};
}

}  // namespace

REGOPS_CUDA_LIBRARY_IMPL(m) {
  m.impl("layer_norm_forward", &layer_norm_forward_cuda);
  m.impl("layer_norm_backward", &layer_norm_backward_cuda);
}

}  // namespace regops
