// Layer normalization and RMSNorm on the CPU, fused with dropout and a
// residual add. OpenMP (at::parallel_for) over rows.
//
// Dropout first writes the packed keep mask of the whole input (Philox
// blocks of 128 elements, as the dropout kernel draws them); the row passes
// then read it 32 bits at a time (mask bytes span row boundaries when
// hidden % 8 != 0, so rows never write them). A row is walked in chunks of
// 32 elements: one mask word, and inner loops of a fixed length that the
// compiler vectorizes (the row functions are compiled for AVX-512 and AVX2
// as well, REGOPS_CPU_CLONES).
//
// Forward, per row: one pass reads x (and the residual), writes h and keeps
// it in a row buffer of the accumulate dtype (at most 256 KiB for hidden
// 65536, in L2), summing it; the centred variance takes a second pass over
// the buffer (exact, no E[h^2] - E[h]^2 cancellation), and a third writes
// y. Backward, per row: one pass reads dy and h and sums g = dy * weight and
// g * xhat, adding dy * xhat and dy to the grad_weight / grad_bias partials;
// a second pass reads them again (from cache) and writes dx and dresidual.
// Memory traffic per element, forward: read x (and the residual), write y
// (and h), 1/8 byte of mask written and read. Backward: read dy (and dh),
// h, 1/8 byte of mask, write dx (and dresidual).
//
// grad_weight and grad_bias: each chunk of rows (the chunking depends only
// on the shape) sums into its own partial row, and the partials are added in
// chunk order, so the result does not depend on the thread count or
// schedule.
// No floating-point contraction in this file (GCC contracts a * b + c into
// an FMA in the AVX2 / AVX-512 clones by default): dropout(x) + residual is
// rounded twice, as the separate torch ops round it, and every clone computes
// the same bits. No memcpy / memset calls for the short copy loops of a
// chunk either: they stay inline vector moves. Before every include, so that
// all functions inlined into the loops carry the same options.
#pragma GCC optimize("fp-contract=off", "no-tree-loop-distribute-patterns")

#include "regops/aten.h"
#include <ATen/ops/full.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cstring>
#include <type_traits>
#include <vector>

#include "regops/bfloat16.h"
#include "regops/cpu_memory.h"
#include "regops/dropout_cpu.h"
#include "regops/layer_norm.h"
#include "regops/layer_norm_host.h"

namespace regops {
namespace {

static_assert(std::endian::native == std::endian::little, "mask_word reads the packed mask as little-endian words");

constexpr int64_t kBlocksPerTask = 128;
// Rows per parallel task: about 16K elements, enough to amortize the fork.
constexpr int64_t kElementsPerTask = 1 << 14;
// Elements per chunk of a row: one 32-bit mask word; also the number of
// independent lanes of a row sum (fixed, so the sum's rounding does not
// depend on the vector width the loader picked).
constexpr int64_t kChunk = 32;
using FullChunk = std::integral_constant<int64_t, kChunk>;
// The chunk lambdas of the row functions are inlined into each clone, so
// they are compiled for its target too.
#define REGOPS_LAMBDA_INLINE __attribute__((always_inline))
// grad_weight / grad_bias partials: at most this many chunks of rows, each
// of at least kElementsPerChunk elements where there are enough rows (fewer
// partial rows to write and add up when rows are long).
constexpr int64_t kMaxChunks = 32;
constexpr int64_t kElementsPerChunk = 1 << 16;
// The backward's first pass: groups of about kElementsPerGroup elements
// (their dy and h stay in L2 for the second pass), walked in column blocks
// of kColumnBlock (a multiple of kChunk: the block's weight and partials,
// 12 KiB of float32, stay in L1).
constexpr int64_t kElementsPerGroup = 1 << 16;
constexpr int64_t kMaxGroupRows = 256;
constexpr int64_t kColumnBlock = 1024;
static_assert(kColumnBlock % kChunk == 0, "column blocks are whole chunks");

// The packed keep mask of numel elements under the dropout random rule,
// padding bits and bytes zero.
at::Tensor make_mask(int64_t numel, double p, uint64_t seed, uint64_t offset, const at::TensorOptions& options) {
  at::Tensor mask = at::zeros({dropout_mask_bytes(numel)}, options.dtype(at::kByte));
  uint8_t* bytes = mask.mutable_data_ptr<uint8_t>();
  const uint64_t threshold = dropout_threshold(p);
  const int64_t whole_blocks = numel / kElementsPerBlock;
  at::parallel_for(0, whole_blocks, kBlocksPerTask, [=](int64_t begin, int64_t end) {
    uint32_t keep[kElementsPerBlock];
    for (int64_t block = begin; block < end; ++block) {
      dropout_keep_block(seed, offset + static_cast<uint64_t>(block) * kCountersPerBlock, threshold, keep,
                         bytes + block * kMaskBytesPerBlock);
    }
  });
  for (int64_t byte = whole_blocks * kMaskBytesPerBlock; byte * 8 < numel; ++byte) {
    bytes[byte] = static_cast<uint8_t>(dropout_keep_byte(seed, offset, byte, numel, threshold));
  }
  return mask;
}

// Keep bits of elements i .. i + 31 (bit e for element i + e).
REGOPS_ALWAYS_INLINE uint32_t mask_word(const uint8_t* mask, int64_t mask_bytes, int64_t i) {
  const int64_t byte = i >> 3;
  uint64_t window = 0;
  if (byte + 8 <= mask_bytes) {
    std::memcpy(&window, mask + byte, sizeof(window));
  } else {
    for (int64_t k = 0; byte + k < mask_bytes; ++k) window |= static_cast<uint64_t>(mask[byte + k]) << (8 * k);
  }
  return static_cast<uint32_t>(window >> (i & 7));
}

// 0 or the dropout scale, for bit e of a mask word.
template <typename acc_t>
REGOPS_ALWAYS_INLINE acc_t keep_factor(uint32_t word, int64_t e, acc_t scale) {
  return static_cast<acc_t>((word >> e) & 1u) * scale;
}

// value in the storage dtype T; bfloat16 through the branch-free rounding of
// bfloat16_bits_nearest, which keeps the storing loops vectorized.
template <typename T, typename acc_t>
REGOPS_ALWAYS_INLINE T to_storage(acc_t value) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) return T(bfloat16_bits_nearest(value), T::from_bits());
  else return static_cast<T>(value);
}

// value rounded to T's precision, as a separate torch op producing a T
// tensor rounds it.
template <typename T, typename acc_t>
REGOPS_ALWAYS_INLINE acc_t round_to(acc_t value) {
  return static_cast<acc_t>(to_storage<T>(value));
}

// f(j, n) for the chunks of a row of hidden elements: whole chunks with n a
// compile-time kChunk (fixed-length loops), then the rest.
template <typename F>
REGOPS_ALWAYS_INLINE void for_each_chunk(int64_t hidden, F&& f) {
  const int64_t whole = hidden / kChunk * kChunk;
  for (int64_t j = 0; j < whole; j += kChunk) f(j, FullChunk{});
  if (whole < hidden) f(whole, hidden - whole);
}

template <typename acc_t>
REGOPS_ALWAYS_INLINE acc_t lanes_total(const acc_t* lanes) {
  acc_t total = 0;
  for (int64_t l = 0; l < kChunk; ++l) total += lanes[l];
  return total;
}

int64_t rows_per_task(int64_t hidden) { return std::max<int64_t>(1, kElementsPerTask / hidden); }

template <typename scalar_t, typename h_t>
struct ForwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  const h_t* residual;   // null without a residual
  const acc_t* weight;   // ones without a weight
  const acc_t* bias;     // -0.0 without a bias (y + -0.0 is y, signed zeros included)
  const uint8_t* mask;   // null without dropout
  int64_t mask_bytes;
  acc_t scale;
  scalar_t* out;
  h_t* h;                // null unless h is stored
  acc_t* mean;           // null for RMSNorm
  acc_t* rstd;
  int64_t hidden;
  acc_t eps;
};

// Chunk of n elements at column j of the row starting at flat index first:
// h into buffer (and args.h), summed into lanes.
template <bool kDropout, bool kResidual, typename scalar_t, typename h_t, typename acc_t, typename Count>
REGOPS_ALWAYS_INLINE void forward_load_chunk(const ForwardArgs<scalar_t, h_t>& args, int64_t first, int64_t j, Count n,
                                             acc_t* __restrict__ buffer, acc_t* __restrict__ lanes) {
  const uint32_t word = kDropout ? mask_word(args.mask, args.mask_bytes, first + j) : 0u;
  const scalar_t* __restrict__ x = args.x + first + j;
  for (int64_t e = 0; e < n; ++e) {
    acc_t v = static_cast<acc_t>(x[e]);
    // dropout(x) is rounded to x's dtype and the sum to h's, as the
    // separate torch ops round them; the row is normalized as stored.
    if constexpr (kDropout) v = round_to<scalar_t>(v * keep_factor(word, e, args.scale));
    if constexpr (kResidual) v = round_to<h_t>(v + static_cast<acc_t>(args.residual[first + j + e]));
    buffer[j + e] = v;
    lanes[e] += v;
  }
  if (args.h != nullptr) {
    h_t* __restrict__ h = args.h + first + j;
    for (int64_t e = 0; e < n; ++e) h[e] = to_storage<h_t>(buffer[j + e]);
  }
}

template <typename acc_t, typename Count>
REGOPS_ALWAYS_INLINE void centred_squares_chunk(const acc_t* __restrict__ buffer, int64_t j, Count n, acc_t mean,
                                                acc_t* __restrict__ lanes) {
  for (int64_t e = 0; e < n; ++e) {
    const acc_t d = buffer[j + e] - mean;
    lanes[e] += d * d;
  }
}

template <typename scalar_t, typename h_t, typename acc_t, typename Count>
REGOPS_ALWAYS_INLINE void normalize_chunk(const ForwardArgs<scalar_t, h_t>& args, const acc_t* __restrict__ buffer,
                                          int64_t first, int64_t j, Count n, acc_t mean, acc_t rstd) {
  scalar_t* __restrict__ out = args.out + first + j;
  for (int64_t e = 0; e < n; ++e) {
    out[e] = to_storage<scalar_t>((buffer[j + e] - mean) * rstd * args.weight[j + e] + args.bias[j + e]);
  }
}

// Rows begin .. end - 1 of the forward; buffer holds one row.
template <typename scalar_t, typename h_t, bool kDropout, bool kResidual>
REGOPS_CPU_CLONES void forward_rows(const ForwardArgs<scalar_t, h_t>& args, int64_t begin, int64_t end,
                                    at::opmath_type<scalar_t>* buffer) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(args.hidden);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t first = row * args.hidden;
    acc_t lanes[kChunk] = {};
    for_each_chunk(args.hidden, [&](int64_t j, auto n) REGOPS_LAMBDA_INLINE {
      forward_load_chunk<kDropout, kResidual>(args, first, j, n, buffer, lanes);
    });
    const acc_t mean = args.mean != nullptr ? lanes_total(lanes) * inv_n : acc_t(0);
    std::fill(lanes, lanes + kChunk, acc_t(0));
    for_each_chunk(args.hidden, [&](int64_t j, auto n) REGOPS_LAMBDA_INLINE {
      centred_squares_chunk(buffer, j, n, mean, lanes);
    });
    const acc_t rstd = layer_norm_rstd(lanes_total(lanes) * inv_n, args.eps);
    if (args.mean != nullptr) args.mean[row] = mean;
    args.rstd[row] = rstd;
    for_each_chunk(args.hidden, [&](int64_t j, auto n) REGOPS_LAMBDA_INLINE {
      normalize_chunk(args, buffer, first, j, n, mean, rstd);
    });
  }
}

// f(TypeTag<scalar_t>, TypeTag<h_t>) for the input's dtype and h's: the
// input's, or the accumulate dtype (residual_in_fp32, a float32 residual).
template <typename F>
void dispatch_input_and_h(at::ScalarType input, at::ScalarType h, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input, "regops_layer_norm_cpu", [&] {
    if (h == input) f(TypeTag<scalar_t>{}, TypeTag<scalar_t>{});
    else f(TypeTag<scalar_t>{}, TypeTag<at::opmath_type<scalar_t>>{});
  });
}

// A (hidden,) row tensor, or a fresh one filled with value when absent.
at::Tensor row_or_fill(const std::optional<at::Tensor>& row, const at::Tensor& input, double value) {
  if (row.has_value()) return row->contiguous();
  return at::full({input.size(1)}, value, input.options().dtype(layer_norm_accumulate_type(input.scalar_type())));
}

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

ForwardResult layer_norm_forward_cpu(const at::Tensor& input, const std::optional<at::Tensor>& residual,
                                     const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                     double p, const std::optional<at::Tensor>& seed, int64_t offset, double eps,
                                     bool rms, bool store_mask, bool store_h, bool residual_in_fp32) {
  check_layer_norm_forward(input, residual, weight, bias, p, seed, offset, eps);
  TORCH_CHECK(!store_mask || seed.has_value(), "regops layer_norm: store_mask needs a seed (dropout)");
  const at::Tensor x = input.contiguous();
  const at::ScalarType h_type = layer_norm_h_type(input, residual, residual_in_fp32);
  LayerNormOutputs outs = allocate_layer_norm_outputs(x, h_type, rms, store_mask, store_h);
  const ForwardResult result{outs.output, outs.h, outs.mean, outs.rstd, outs.mask};
  if (x.numel() == 0) return result;
  const at::Tensor res = residual.has_value() ? residual->to(h_type).contiguous() : at::Tensor();
  const at::Tensor w = row_or_fill(weight, x, 1.0), b = row_or_fill(bias, x, -0.0);
  advise_huge_pages(outs.output);
  if (store_h) advise_huge_pages(outs.h);
  at::Tensor mask;
  if (seed.has_value()) {
    mask = make_mask(x.numel(), p, read_seed(*seed), static_cast<uint64_t>(offset), x.options());
    if (store_mask) outs.mask = mask;
  }
  dispatch_input_and_h(x.scalar_type(), h_type, [&](auto input_tag, auto h_tag) {
    using scalar_t = typename decltype(input_tag)::type;
    using h_t = typename decltype(h_tag)::type;
    using acc_t = at::opmath_type<scalar_t>;
    const ForwardArgs<scalar_t, h_t> args{
        x.const_data_ptr<scalar_t>(), res.defined() ? res.const_data_ptr<h_t>() : nullptr, w.const_data_ptr<acc_t>(),
        b.const_data_ptr<acc_t>(), mask.defined() ? mask.const_data_ptr<uint8_t>() : nullptr,
        mask.defined() ? mask.numel() : 0, static_cast<acc_t>(dropout_scale(p)),
        outs.output.mutable_data_ptr<scalar_t>(), store_h ? outs.h.mutable_data_ptr<h_t>() : nullptr,
        rms ? nullptr : outs.mean.mutable_data_ptr<acc_t>(), outs.rstd.mutable_data_ptr<acc_t>(), x.size(1),
        static_cast<acc_t>(eps)};
    auto rows = &forward_rows<scalar_t, h_t, false, false>;
    if (mask.defined() && res.defined()) rows = &forward_rows<scalar_t, h_t, true, true>;
    else if (mask.defined()) rows = &forward_rows<scalar_t, h_t, true, false>;
    else if (res.defined()) rows = &forward_rows<scalar_t, h_t, false, true>;
    at::parallel_for(0, x.size(0), rows_per_task(x.size(1)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buffer(x.size(1));
      rows(args, begin, end, buffer.data());
    });
  });
  return {outs.output, outs.h, outs.mean, outs.rstd, outs.mask};
}

// Chunks of rows for the grad_weight / grad_bias partials, from the shape
// alone (never the thread count), so the sums are reproducible.
int64_t rows_per_chunk(int64_t rows, int64_t hidden) {
  const int64_t for_count = (rows + kMaxChunks - 1) / kMaxChunks;
  const int64_t for_size = (kElementsPerChunk + hidden - 1) / hidden;
  return std::max<int64_t>(1, std::min(rows, std::max(for_count, for_size)));
}

template <typename scalar_t, typename h_t>
struct BackwardArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* dy;
  const h_t* grad_h;      // null without a gradient of h
  const h_t* h;
  const acc_t* weight;    // ones without a weight
  const acc_t* mean;      // null for RMSNorm
  const acc_t* rstd;
  const uint8_t* mask;    // null without dropout
  int64_t mask_bytes;
  acc_t scale;
  scalar_t* grad_input;
  h_t* grad_residual;     // null without a residual
  int64_t hidden;
};

// The row sums of g = dy * weight and g * xhat, and the grad_weight /
// grad_bias partials, over a chunk.
template <typename scalar_t, typename h_t, typename acc_t, typename Count>
REGOPS_ALWAYS_INLINE void gradient_sums_chunk(const BackwardArgs<scalar_t, h_t>& args, int64_t first, int64_t j,
                                              Count n, acc_t mean, acc_t rstd, acc_t* __restrict__ sum_g,
                                              acc_t* __restrict__ sum_g_xhat, acc_t* __restrict__ dweight,
                                              acc_t* __restrict__ dbias) {
  const scalar_t* __restrict__ dy = args.dy + first + j;
  const h_t* __restrict__ h = args.h + first + j;
  for (int64_t e = 0; e < n; ++e) {
    const acc_t dy_e = static_cast<acc_t>(dy[e]);
    const acc_t xhat = (static_cast<acc_t>(h[e]) - mean) * rstd;
    const acc_t g = dy_e * args.weight[j + e];
    sum_g[e] += g;
    sum_g_xhat[e] += g * xhat;
    dweight[j + e] += dy_e * xhat;
  }
  if (dbias != nullptr) {
    for (int64_t e = 0; e < n; ++e) dbias[j + e] += static_cast<acc_t>(dy[e]);
  }
}

template <bool kDropout, typename scalar_t, typename h_t, typename acc_t, typename Count>
REGOPS_ALWAYS_INLINE void grad_input_chunk(const BackwardArgs<scalar_t, h_t>& args, int64_t first, int64_t j, Count n,
                                           acc_t mean, acc_t rstd, acc_t mean_g, acc_t mean_g_xhat) {
  const scalar_t* __restrict__ dy = args.dy + first + j;
  const h_t* __restrict__ h = args.h + first + j;
  acc_t grad[kChunk];
  for (int64_t e = 0; e < n; ++e) {
    const acc_t xhat = (static_cast<acc_t>(h[e]) - mean) * rstd;
    grad[e] = layer_norm_grad_h(static_cast<acc_t>(dy[e]) * args.weight[j + e], xhat, rstd, mean_g, mean_g_xhat);
  }
  if (args.grad_h != nullptr) {
    const h_t* __restrict__ grad_h = args.grad_h + first + j;
    for (int64_t e = 0; e < n; ++e) grad[e] += static_cast<acc_t>(grad_h[e]);
  }
  if (args.grad_residual != nullptr) {
    h_t* __restrict__ grad_residual = args.grad_residual + first + j;
    for (int64_t e = 0; e < n; ++e) grad_residual[e] = to_storage<h_t>(grad[e]);
  }
  scalar_t* __restrict__ grad_input = args.grad_input + first + j;
  if constexpr (kDropout) {
    const uint32_t word = mask_word(args.mask, args.mask_bytes, first + j);
    for (int64_t e = 0; e < n; ++e) grad_input[e] = to_storage<scalar_t>(grad[e] * keep_factor(word, e, args.scale));
  } else {
    for (int64_t e = 0; e < n; ++e) grad_input[e] = to_storage<scalar_t>(grad[e]);
  }
}

// Rows begin .. end - 1 of the backward, their dy * xhat and dy added to
// the partial rows dweight and dbias (dbias null: not wanted). The first
// pass walks a group of rows one column block at a time, so that the block's
// weight and partials stay in L1 while the rows stream past them (rows of
// 16384 elements would otherwise read and write the partials from L2 once
// per row); a column's lane and the order of every sum are the row walk's.
// sums holds kMaxGroupRows rows of (sum_g, sum_g_xhat) lanes.
template <typename scalar_t, typename h_t, bool kDropout>
REGOPS_CPU_CLONES void backward_rows(const BackwardArgs<scalar_t, h_t>& args, int64_t begin, int64_t end,
                                     at::opmath_type<scalar_t>* dweight, at::opmath_type<scalar_t>* dbias,
                                     at::opmath_type<scalar_t>* sums) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t hidden = args.hidden;
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(hidden);
  const int64_t group_rows = std::clamp<int64_t>(kElementsPerGroup / hidden, 1, kMaxGroupRows);
  auto row_mean = [&](int64_t row) REGOPS_LAMBDA_INLINE { return args.mean != nullptr ? args.mean[row] : acc_t(0); };
  for (int64_t group = begin; group < end; group += group_rows) {
    const int64_t group_end = std::min(end, group + group_rows);
    std::fill(sums, sums + (group_end - group) * 2 * kChunk, acc_t(0));
    for (int64_t column = 0; column < hidden; column += kColumnBlock) {
      for (int64_t row = group; row < group_end; ++row) {
        acc_t* sum_g = sums + (row - group) * 2 * kChunk;
        const acc_t mean = row_mean(row), rstd = args.rstd[row];
        for_each_chunk(std::min(kColumnBlock, hidden - column), [&](int64_t j, auto n) REGOPS_LAMBDA_INLINE {
          gradient_sums_chunk(args, row * hidden, column + j, n, mean, rstd, sum_g, sum_g + kChunk, dweight, dbias);
        });
      }
    }
    for (int64_t row = group; row < group_end; ++row) {
      const acc_t* sum_g = sums + (row - group) * 2 * kChunk;
      const acc_t mean = row_mean(row), rstd = args.rstd[row];
      // RMSNorm has no mean(g) term: its xhat does not depend on a mean.
      const acc_t mean_g = args.mean != nullptr ? lanes_total(sum_g) * inv_n : acc_t(0);
      const acc_t mean_g_xhat = lanes_total(sum_g + kChunk) * inv_n;
      for_each_chunk(hidden, [&](int64_t j, auto n) REGOPS_LAMBDA_INLINE {
        grad_input_chunk<kDropout>(args, row * hidden, j, n, mean, rstd, mean_g, mean_g_xhat);
      });
    }
  }
}

// Sums (chunks, hidden) partials over chunks, in chunk order.
template <typename acc_t>
void reduce_partials(const acc_t* partials, acc_t* total, int64_t chunks, int64_t hidden) {
  at::parallel_for(0, hidden, 4096, [=](int64_t begin, int64_t end) {
    std::copy(partials + begin, partials + end, total + begin);
    for (int64_t c = 1; c < chunks; ++c) {
      for (int64_t j = begin; j < end; ++j) total[j] += partials[c * hidden + j];
    }
  });
}

using BackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

BackwardResult layer_norm_backward_cpu(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_h,
                                       const at::Tensor& h, const std::optional<at::Tensor>& weight,
                                       const at::Tensor& mean, const at::Tensor& rstd,
                                       const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& seed,
                                       double p, int64_t offset, bool rms, bool has_residual, bool has_bias) {
  check_layer_norm_backward(grad_out, grad_h, h, weight, mean, rstd, mask, seed, p, offset, rms);
  const at::Tensor dy = grad_out.contiguous();
  const int64_t rows = dy.size(0), hidden = dy.size(1);
  const auto acc = dy.options().dtype(layer_norm_accumulate_type(dy.scalar_type()));
  const bool want_weight = weight.has_value();
  // grad_weight and grad_bias are sums: zero for no rows.
  BackwardResult result{at::empty_like(dy), at::empty(has_residual ? dy.sizes() : at::IntArrayRef{0}, h.options()),
                        at::zeros({want_weight ? hidden : 0}, acc), at::zeros({has_bias ? hidden : 0}, acc)};
  auto& [grad_input, grad_residual, grad_weight, grad_bias] = result;
  if (rows == 0) return result;
  advise_huge_pages(grad_input);
  advise_huge_pages(grad_residual);
  const at::Tensor h_work = h.contiguous();
  const at::Tensor dh = grad_h.has_value() ? grad_h->contiguous() : at::Tensor();
  at::Tensor keep;
  if (mask.has_value()) {
    keep = mask->contiguous();
  } else if (seed.has_value()) {
    keep = make_mask(dy.numel(), p, read_seed(*seed), static_cast<uint64_t>(offset), dy.options());
  }
  const int64_t chunk_rows = rows_per_chunk(rows, hidden);
  const int64_t chunks = (rows + chunk_rows - 1) / chunk_rows;
  // Without a weight the grad_weight partials are still summed (the loop
  // stays branch-free) and dropped.
  at::Tensor weight_partials = at::empty({chunks, hidden}, acc);
  at::Tensor bias_partials = has_bias ? at::empty({chunks, hidden}, acc) : at::Tensor();
  const at::Tensor w = row_or_fill(weight, dy, 1.0);
  const at::Tensor m = mean.contiguous(), r = rstd.contiguous();
  dispatch_input_and_h(dy.scalar_type(), h.scalar_type(), [&](auto input_tag, auto h_tag) {
    using scalar_t = typename decltype(input_tag)::type;
    using h_t = typename decltype(h_tag)::type;
    using acc_t = at::opmath_type<scalar_t>;
    const BackwardArgs<scalar_t, h_t> args{
        dy.const_data_ptr<scalar_t>(), dh.defined() ? dh.const_data_ptr<h_t>() : nullptr,
        h_work.const_data_ptr<h_t>(), w.const_data_ptr<acc_t>(), rms ? nullptr : m.const_data_ptr<acc_t>(),
        r.const_data_ptr<acc_t>(), keep.defined() ? keep.const_data_ptr<uint8_t>() : nullptr,
        keep.defined() ? keep.numel() : 0, static_cast<acc_t>(dropout_scale(p)),
        grad_input.mutable_data_ptr<scalar_t>(), has_residual ? grad_residual.mutable_data_ptr<h_t>() : nullptr,
        hidden};
    const auto rows_fn = keep.defined() ? &backward_rows<scalar_t, h_t, true> : &backward_rows<scalar_t, h_t, false>;
    acc_t* weight_rows = weight_partials.mutable_data_ptr<acc_t>();
    acc_t* bias_rows = has_bias ? bias_partials.mutable_data_ptr<acc_t>() : nullptr;
    const int64_t grain = std::max<int64_t>(1, rows_per_task(hidden) / chunk_rows);
    at::parallel_for(0, chunks, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sums(kMaxGroupRows * 2 * kChunk);
      for (int64_t chunk = begin; chunk < end; ++chunk) {
        acc_t* dweight = weight_rows + chunk * hidden;
        acc_t* dbias = bias_rows != nullptr ? bias_rows + chunk * hidden : nullptr;
        std::fill(dweight, dweight + hidden, acc_t(0));
        if (dbias != nullptr) std::fill(dbias, dbias + hidden, acc_t(0));
        rows_fn(args, chunk * chunk_rows, std::min(rows, (chunk + 1) * chunk_rows), dweight, dbias, sums.data());
      }
    });
    if (want_weight) reduce_partials<acc_t>(weight_rows, grad_weight.mutable_data_ptr<acc_t>(), chunks, hidden);
    if (has_bias) reduce_partials<acc_t>(bias_rows, grad_bias.mutable_data_ptr<acc_t>(), chunks, hidden);
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(regops, CPU, m) {
  m.impl("layer_norm_forward", &layer_norm_forward_cpu);
  m.impl("layer_norm_backward", &layer_norm_backward_cpu);
}

}  // namespace regops
