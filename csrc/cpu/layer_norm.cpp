// Layer normalization and RMSNorm on the CPU, fused with dropout and a
// residual add. OpenMP (at::parallel_for) over rows; a row (at most a few
// hundred KiB) is staged once in an accumulate-dtype buffer that stays in
// cache, so the input and residual are read once and the statistics take
// two passes over the buffer (exact mean, then the centred variance).
//
// Dropout first writes the packed keep mask of the whole input (Philox
// blocks of 128 elements, as the dropout kernel draws them), then the row
// pass reads its bits: mask bytes span row boundaries when hidden % 8 != 0,
// so rows never write them. Traffic per element, forward: read x (and the
// residual), write y (and h), 1/8 byte of mask written and read. Backward:
// read dy (and dh), h, 1/8 byte of mask, write dx (and dresidual).
//
// grad_weight and grad_bias: each chunk of rows (the chunking depends only
// on the number of rows) sums into its own partial row, and the partials
// are added in chunk order, so the result does not depend on the thread
// count or schedule.
#include "regops/aten.h"
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>
#include <vector>

#include "regops/cpu_memory.h"
#include "regops/dropout_cpu.h"
#include "regops/layer_norm.h"
#include "regops/layer_norm_host.h"

namespace regops {
namespace {

constexpr int64_t kBlocksPerTask = 128;
// Rows per parallel task: about 16K elements, enough to amortize the fork.
constexpr int64_t kElementsPerTask = 1 << 14;
// grad_weight / grad_bias partials: at most this many chunks of rows.
constexpr int64_t kMaxChunks = 32;
constexpr int kLanes = 8;  // independent accumulators of a row sum (vectorizable, fixed order)

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

template <typename acc_t>
acc_t row_sum(const acc_t* values, int64_t n) {
  acc_t lanes[kLanes] = {};
  const int64_t whole = n / kLanes * kLanes;
  for (int64_t j = 0; j < whole; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += values[j + l];
  }
  for (int64_t j = whole; j < n; ++j) lanes[j - whole] += values[j];
  acc_t total = 0;
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// Keep factors (0 or scale) of elements first .. first + n - 1.
template <typename acc_t>
void keep_factors(const uint8_t* mask, int64_t first, int64_t n, acc_t scale, acc_t* factor) {
  for (int64_t j = 0; j < n; ++j) {
    const int64_t i = first + j;
    factor[j] = static_cast<acc_t>((mask[i >> 3] >> (i & 7)) & 1) * scale;
  }
}

int64_t rows_per_task(int64_t hidden) { return std::max<int64_t>(1, kElementsPerTask / hidden); }

template <typename scalar_t, typename h_t, bool kDropout, bool kResidual>
void forward_kernel(const scalar_t* x, const h_t* residual, const at::opmath_type<scalar_t>* weight,
                    const at::opmath_type<scalar_t>* bias, const uint8_t* mask, double scale, scalar_t* out,
                    h_t* h_out, at::opmath_type<scalar_t>* mean_out, at::opmath_type<scalar_t>* rstd_out,
                    int64_t rows, int64_t hidden, double eps, bool rms) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t acc_scale = static_cast<acc_t>(scale), acc_eps = static_cast<acc_t>(eps);
  at::parallel_for(0, rows, rows_per_task(hidden), [=](int64_t begin, int64_t end) {
    std::vector<acc_t> buffer(hidden), scratch(hidden);
    acc_t* h = buffer.data();
    acc_t* tmp = scratch.data();
    for (int64_t row = begin; row < end; ++row) {
      const int64_t first = row * hidden;
      if constexpr (kDropout) keep_factors(mask, first, hidden, acc_scale, tmp);
      for (int64_t j = 0; j < hidden; ++j) {
        acc_t v = static_cast<acc_t>(x[first + j]);
        // dropout(x) is rounded to x's dtype and the sum to h's, as the
        // separate torch ops round them; the row is normalized as stored.
        if constexpr (kDropout) v = static_cast<acc_t>(static_cast<scalar_t>(v * tmp[j]));
        if constexpr (kResidual) v = static_cast<acc_t>(static_cast<h_t>(v + static_cast<acc_t>(residual[first + j])));
        h[j] = v;
      }
      if (h_out != nullptr) {
        for (int64_t j = 0; j < hidden; ++j) h_out[first + j] = static_cast<h_t>(h[j]);
      }
      acc_t mean = 0;
      if (!rms) {
        mean = row_sum(h, hidden) / static_cast<acc_t>(hidden);
        for (int64_t j = 0; j < hidden; ++j) tmp[j] = (h[j] - mean) * (h[j] - mean);
      } else {
        for (int64_t j = 0; j < hidden; ++j) tmp[j] = h[j] * h[j];
      }
      const acc_t rstd = layer_norm_rstd(row_sum(tmp, hidden) / static_cast<acc_t>(hidden), acc_eps);
      if (!rms) mean_out[row] = mean;
      rstd_out[row] = rstd;
      for (int64_t j = 0; j < hidden; ++j) {
        acc_t y = (h[j] - mean) * rstd;
        if (weight != nullptr) y = y * weight[j];
        if (bias != nullptr) y = y + bias[j];
        out[first + j] = static_cast<scalar_t>(y);
      }
    }
  });
}

template <typename scalar_t, typename h_t>
void forward_dispatch(const at::Tensor& x, const std::optional<at::Tensor>& residual,
                      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                      const at::Tensor& mask, double p, LayerNormOutputs& outs, bool store_h, double eps, bool rms) {
  using acc_t = at::opmath_type<scalar_t>;
  const bool dropout = mask.defined();
  const bool has_residual = residual.has_value();
  auto run = [&](auto dropout_tag, auto residual_tag) {
    forward_kernel<scalar_t, h_t, decltype(dropout_tag)::value, decltype(residual_tag)::value>(
        x.const_data_ptr<scalar_t>(), has_residual ? residual->const_data_ptr<h_t>() : nullptr,
        weight.has_value() ? weight->const_data_ptr<acc_t>() : nullptr,
        bias.has_value() ? bias->const_data_ptr<acc_t>() : nullptr,
        dropout ? mask.const_data_ptr<uint8_t>() : nullptr, dropout_scale(p), outs.output.mutable_data_ptr<scalar_t>(),
        store_h ? outs.h.mutable_data_ptr<h_t>() : nullptr, rms ? nullptr : outs.mean.mutable_data_ptr<acc_t>(),
        outs.rstd.mutable_data_ptr<acc_t>(), x.size(0), x.size(1), eps, rms);
  };
  using T = std::true_type;
  using F = std::false_type;
  if (dropout && has_residual) run(T{}, T{});
  else if (dropout) run(T{}, F{});
  else if (has_residual) run(F{}, T{});
  else run(F{}, F{});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_forward_cpu(
    const at::Tensor& input, const std::optional<at::Tensor>& residual, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double p, const std::optional<at::Tensor>& seed, int64_t offset,
    double eps, bool rms, bool store_mask, bool store_h, bool residual_in_fp32) {
  check_layer_norm_forward(input, residual, weight, bias, p, seed, offset, eps);
  TORCH_CHECK(!store_mask || seed.has_value(), "regops layer_norm: store_mask needs a seed (dropout)");
  const at::Tensor x = input.contiguous();
  const at::ScalarType h_type = layer_norm_h_type(input, residual, residual_in_fp32);
  std::optional<at::Tensor> res;
  if (residual.has_value()) res = residual->to(h_type).contiguous();
  const std::optional<at::Tensor> w = weight.has_value() ? std::optional<at::Tensor>(weight->contiguous()) : weight;
  const std::optional<at::Tensor> b = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : bias;
  LayerNormOutputs outs = allocate_layer_norm_outputs(x, h_type, rms, store_mask, store_h);
  if (x.numel() == 0) return {outs.output, outs.h, outs.mean, outs.rstd, outs.mask};
  advise_huge_pages(outs.output);
  at::Tensor mask;
  if (seed.has_value()) {
    mask = make_mask(x.numel(), p, read_seed(*seed), static_cast<uint64_t>(offset), x.options());
    if (store_mask) outs.mask = mask;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "regops_layer_norm_forward_cpu", [&] {
    if (h_type == x.scalar_type()) {
      forward_dispatch<scalar_t, scalar_t>(x, res, w, b, mask, p, outs, store_h, eps, rms);
    } else {
      forward_dispatch<scalar_t, float>(x, res, w, b, mask, p, outs, store_h, eps, rms);
    }
  });
  return {outs.output, outs.h, outs.mean, outs.rstd, outs.mask};
}

// Chunks of rows for the grad_weight / grad_bias partials, from the row
// count alone (never the thread count), so the sums are reproducible.
int64_t rows_per_chunk(int64_t rows) { return std::max<int64_t>(1, (rows + kMaxChunks - 1) / kMaxChunks); }

template <typename scalar_t, typename h_t, bool kDropout>
void backward_kernel(const scalar_t* dy, const h_t* grad_h, const h_t* h_in, const at::opmath_type<scalar_t>* weight,
                     const at::opmath_type<scalar_t>* mean_in, const at::opmath_type<scalar_t>* rstd_in,
                     const uint8_t* mask, double scale, scalar_t* grad_input, h_t* grad_residual,
                     at::opmath_type<scalar_t>* weight_partials, at::opmath_type<scalar_t>* bias_partials,
                     int64_t rows, int64_t hidden, bool rms) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t acc_scale = static_cast<acc_t>(scale);
  const int64_t chunk_rows = rows_per_chunk(rows);
  const int64_t chunks = (rows + chunk_rows - 1) / chunk_rows;
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(hidden);
  at::parallel_for(0, chunks, std::max<int64_t>(1, rows_per_task(hidden) / chunk_rows), [=](int64_t begin, int64_t end) {
    std::vector<acc_t> xhat_buffer(hidden), g_buffer(hidden), tmp_buffer(hidden);
    acc_t* xhat = xhat_buffer.data();
    acc_t* g = g_buffer.data();
    acc_t* tmp = tmp_buffer.data();
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      acc_t* dweight = weight_partials != nullptr ? weight_partials + chunk * hidden : nullptr;
      acc_t* dbias = bias_partials != nullptr ? bias_partials + chunk * hidden : nullptr;
      if (dweight != nullptr) std::fill(dweight, dweight + hidden, acc_t(0));
      if (dbias != nullptr) std::fill(dbias, dbias + hidden, acc_t(0));
      for (int64_t row = chunk * chunk_rows; row < std::min(rows, (chunk + 1) * chunk_rows); ++row) {
        const int64_t first = row * hidden;
        const acc_t mean = rms ? acc_t(0) : mean_in[row];
        const acc_t rstd = rstd_in[row];
        for (int64_t j = 0; j < hidden; ++j) {
          xhat[j] = (static_cast<acc_t>(h_in[first + j]) - mean) * rstd;
          const acc_t dyj = static_cast<acc_t>(dy[first + j]);
          g[j] = weight != nullptr ? dyj * weight[j] : dyj;
        }
        if (dweight != nullptr) {
          for (int64_t j = 0; j < hidden; ++j) dweight[j] += static_cast<acc_t>(dy[first + j]) * xhat[j];
        }
        if (dbias != nullptr) {
          for (int64_t j = 0; j < hidden; ++j) dbias[j] += static_cast<acc_t>(dy[first + j]);
        }
        const acc_t mean_g = rms ? acc_t(0) : row_sum(g, hidden) * inv_n;
        for (int64_t j = 0; j < hidden; ++j) tmp[j] = g[j] * xhat[j];
        const acc_t mean_g_xhat = row_sum(tmp, hidden) * inv_n;
        for (int64_t j = 0; j < hidden; ++j) {
          acc_t dh = layer_norm_grad_h(g[j], xhat[j], rstd, mean_g, mean_g_xhat);
          if (grad_h != nullptr) dh += static_cast<acc_t>(grad_h[first + j]);
          g[j] = dh;
        }
        if (grad_residual != nullptr) {
          for (int64_t j = 0; j < hidden; ++j) grad_residual[first + j] = static_cast<h_t>(g[j]);
        }
        if constexpr (kDropout) {
          keep_factors(mask, first, hidden, acc_scale, tmp);
          for (int64_t j = 0; j < hidden; ++j) grad_input[first + j] = static_cast<scalar_t>(g[j] * tmp[j]);
        } else {
          for (int64_t j = 0; j < hidden; ++j) grad_input[first + j] = static_cast<scalar_t>(g[j]);
        }
      }
    }
  });
}

// Sums (chunks, hidden) partials over chunks, in chunk order.
template <typename acc_t>
void reduce_partials(const acc_t* partials, acc_t* total, int64_t chunks, int64_t hidden) {
  at::parallel_for(0, hidden, 4096, [=](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) total[j] = 0;
    for (int64_t c = 0; c < chunks; ++c) {
      for (int64_t j = begin; j < end; ++j) total[j] += partials[c * hidden + j];
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_h, const at::Tensor& h,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& seed, double p, int64_t offset, bool rms,
    bool has_residual, bool has_bias) {
  check_layer_norm_backward(grad_out, grad_h, h, weight, mean, rstd, mask, seed, p, offset, rms);
  const at::Tensor dy = grad_out.contiguous(), h_work = h.contiguous();
  const std::optional<at::Tensor> dh =
      grad_h.has_value() ? std::optional<at::Tensor>(grad_h->contiguous()) : grad_h;
  const int64_t rows = dy.size(0), hidden = dy.size(1);
  const auto acc = dy.options().dtype(layer_norm_accumulate_type(dy.scalar_type()));
  at::Tensor grad_input = at::empty_like(dy);
  at::Tensor grad_residual = at::empty(has_residual ? dy.sizes() : at::IntArrayRef{0}, h.options());
  const int64_t chunk_rows = rows_per_chunk(rows);
  const int64_t chunks = (rows + chunk_rows - 1) / chunk_rows;
  const bool want_weight = weight.has_value();
  at::Tensor grad_weight = want_weight ? at::zeros({hidden}, acc) : at::empty({0}, acc);
  at::Tensor grad_bias = has_bias ? at::zeros({hidden}, acc) : at::empty({0}, acc);
  if (dy.numel() == 0) return {grad_input, grad_residual, grad_weight, grad_bias};
  at::Tensor keep;
  if (mask.has_value()) {
    keep = mask->contiguous();
  } else if (seed.has_value()) {
    keep = make_mask(dy.numel(), p, read_seed(*seed), static_cast<uint64_t>(offset), dy.options());
  }
  at::Tensor weight_partials = want_weight ? at::empty({chunks, hidden}, acc) : at::Tensor();
  at::Tensor bias_partials = has_bias ? at::empty({chunks, hidden}, acc) : at::Tensor();
  const at::Tensor w = want_weight ? weight->contiguous() : at::Tensor();
  const at::Tensor m = mean.contiguous(), r = rstd.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "regops_layer_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto run = [&](auto h_tag, auto dropout_tag) {
      using h_t = typename decltype(h_tag)::type;
      backward_kernel<scalar_t, h_t, decltype(dropout_tag)::value>(
          dy.const_data_ptr<scalar_t>(), dh.has_value() ? dh->const_data_ptr<h_t>() : nullptr,
          h_work.const_data_ptr<h_t>(), want_weight ? w.const_data_ptr<acc_t>() : nullptr,
          rms ? nullptr : m.const_data_ptr<acc_t>(), r.const_data_ptr<acc_t>(),
          keep.defined() ? keep.const_data_ptr<uint8_t>() : nullptr, dropout_scale(p),
          grad_input.mutable_data_ptr<scalar_t>(), has_residual ? grad_residual.mutable_data_ptr<h_t>() : nullptr,
          want_weight ? weight_partials.mutable_data_ptr<acc_t>() : nullptr,
          has_bias ? bias_partials.mutable_data_ptr<acc_t>() : nullptr, rows, hidden, rms);
    };
    auto with_h = [&](auto h_tag) {
      if (keep.defined()) run(h_tag, std::true_type{});
      else run(h_tag, std::false_type{});
    };
    if (h.scalar_type() == dy.scalar_type()) with_h(TypeTag<scalar_t>{});
    else with_h(TypeTag<float>{});
    if (want_weight) {
      reduce_partials(weight_partials.const_data_ptr<acc_t>(), grad_weight.mutable_data_ptr<acc_t>(), chunks, hidden);
    }
    if (has_bias) {
      reduce_partials(bias_partials.const_data_ptr<acc_t>(), grad_bias.mutable_data_ptr<acc_t>(), chunks, hidden);
    }
  });
  return {grad_input, grad_residual, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(regops, CPU, m) {
  m.impl("layer_norm_forward", &layer_norm_forward_cpu);
  m.impl("layer_norm_backward", &layer_norm_backward_cpu);
}

}  // namespace regops
