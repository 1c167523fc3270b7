// Penalized SGD and AdamW on the CPU: one call updates every tensor of a
// (device, dtype) group. The tensors are cut into chunks of kChunk elements
// that at::parallel_for spreads over ATen's OpenMP pool (so small tensors
// share a thread and large ones are split). Inside a chunk the element
// update of regops/optim.h runs over float32 arrays in loops the compiler
// vectorizes: float32 tensors are updated in place, 16-bit tensors go through
// float32 blocks of kBlock elements (conversion loops written to vectorize:
// c10's per-element bfloat16 rounding does not, and made bf16 SGD slow).
//
// Traffic per parameter (element size e): SGD reads p, g and the momentum
// buffer and writes p and the buffer (5e; 3e without momentum); AdamW reads
// p, g, exp_avg, exp_avg_sq and writes p, exp_avg, exp_avg_sq (7e; 9e with
// amsgrad).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cstring>
#include <type_traits>
#include <vector>

#include "regops/optim.h"
#include "regops/optim_host.h"

namespace regops {
namespace {

constexpr int64_t kChunk = 1 << 15;  // elements per parallel task: ~1 MiB of traffic for AdamW float32
constexpr int64_t kBlock = 512;      // 16-bit path: five float32 lists of 512 stay in L1
// Below this many elements in all, a call runs on the calling thread: waking
// the pool costs more than the work.
constexpr int64_t kSerialBelow = 1 << 16;

// --- vectorizable loops --------------------------------------------------------
// Compiled for AVX-512 and AVX2 as well; the loader picks the best the
// processor has. Flags that would make a loop branch on memory (momentum,
// amsgrad) are template parameters of the inlined body; the rest become selects.

template <bool kMomentum>
inline void sgd_loop(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ buffer, int64_t n,
                     const SGDCoefficients& coefficients) {
  const SGDCoefficients c = coefficients;
  for (int64_t i = 0; i < n; ++i) {
    float param = p[i];
    float buf = kMomentum ? buffer[i] : 0.0f;
    sgd_update(param, g[i], buf, c);
    p[i] = param;
    if (kMomentum) buffer[i] = buf;
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void sgd_block(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ buffer, int64_t n,
               const SGDCoefficients& c) {
  sgd_loop<false>(p, g, buffer, n, c);
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void sgd_momentum_block(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ buffer, int64_t n,
                        const SGDCoefficients& c) {
  sgd_loop<true>(p, g, buffer, n, c);
}

template <bool kAmsgrad>
inline void adamw_loop(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ exp_avg,
                       float* __restrict__ exp_avg_sq, float* __restrict__ max_exp_avg_sq, int64_t n,
                       const AdamWCoefficients& coefficients) {
  AdamWCoefficients c = coefficients;
  c.amsgrad = kAmsgrad;
  for (int64_t i = 0; i < n; ++i) {
    float param = p[i], m = exp_avg[i], v = exp_avg_sq[i];
    float v_max = kAmsgrad ? max_exp_avg_sq[i] : 0.0f;
    adamw_update(param, g[i], m, v, v_max, c);
    p[i] = param;
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    if (kAmsgrad) max_exp_avg_sq[i] = v_max;
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void adamw_block(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ exp_avg,
                 float* __restrict__ exp_avg_sq, float* __restrict__ max_exp_avg_sq, int64_t n,
                 const AdamWCoefficients& c) {
  adamw_loop<false>(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, n, c);
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void adamw_amsgrad_block(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ exp_avg,
                         float* __restrict__ exp_avg_sq, float* __restrict__ max_exp_avg_sq, int64_t n,
                         const AdamWCoefficients& c) {
  adamw_loop<true>(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, n, c);
}

// Sum of squares with 16 independent float32 accumulators (a plain float sum
// does not vectorize without reassociation).
__attribute__((target_clones("avx512f", "avx2", "default")))
double sum_of_squares(const float* __restrict__ x, int64_t n) {
  constexpr int kLanes = 16;
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += x[i + l] * x[i + l];
  }
  for (; i < n; ++i) acc[0] += x[i] * x[i];
  float total = 0.0f;
  for (int l = 0; l < kLanes; ++l) total += acc[l];
  return total;
}

// bfloat16 <-> float32 as bit operations: widening is a shift; narrowing
// rounds to nearest even and keeps NaN a quiet NaN, as c10::BFloat16 does.
__attribute__((target_clones("avx512f", "avx2", "default")))
void bfloat16_to_float(const uint16_t* __restrict__ src, float* __restrict__ dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
    std::memcpy(dst + i, &bits, sizeof(bits));
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void float_to_bfloat16(const float* __restrict__ src, uint16_t* __restrict__ dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, src + i, sizeof(bits));
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const bool is_nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
    dst[i] = static_cast<uint16_t>(is_nan ? 0x7FC0u : rounded);
  }
}

template <typename scalar_t>
void to_float(const scalar_t* src, float* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    bfloat16_to_float(reinterpret_cast<const uint16_t*>(src), dst, n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

template <typename scalar_t>
void from_float(const float* src, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    float_to_bfloat16(src, reinterpret_cast<uint16_t*>(dst), n);
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  }
}

// --- the multi-tensor driver ----------------------------------------------------

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// at::parallel_for over chunks, or inline for little work.
template <typename Body>
void for_chunks(const std::vector<Chunk>& chunks, int64_t total, const Body& body) {
  const int64_t count = static_cast<int64_t>(chunks.size());
  if (total < kSerialBelow) {
    body(0, count);
  } else {
    at::parallel_for(0, count, 1, body);
  }
}

int64_t total_numel(at::TensorList tensors) {
  int64_t total = 0;
  for (const at::Tensor& t : tensors) total += t.numel();
  return total;
}

std::vector<Chunk> make_chunks(at::TensorList tensors) {
  std::vector<Chunk> chunks;
  for (size_t t = 0; t < tensors.size(); ++t) {
    const int64_t numel = tensors[t].numel();
    for (int64_t begin = 0; begin < numel; begin += kChunk) {
      chunks.push_back({static_cast<int64_t>(t), begin, std::min(numel, begin + kChunk)});
    }
  }
  return chunks;
}

// Runs block_fn(float* views[kLists], n, tensor) over every element of the
// tensors of `lists` (lists[l][t] is tensor t of list l; list 1 holds the
// gradients, which are read only). 16-bit tensors are converted to float32
// blocks and the written lists converted back.
template <typename scalar_t, int kLists, typename BlockFn>
void apply_blocks(const std::array<at::TensorList, kLists>& lists, BlockFn block_fn) {
  const std::vector<Chunk> chunks = make_chunks(lists[0]);
  std::array<std::vector<scalar_t*>, kLists> pointers;
  for (int l = 0; l < kLists; ++l) {
    for (const at::Tensor& t : lists[l]) pointers[l].push_back(static_cast<scalar_t*>(t.data_ptr()));
  }
  for_chunks(chunks, total_numel(lists[0]), [&](int64_t first, int64_t last) {
    float buffers[kLists][kBlock];
    for (int64_t index = first; index < last; ++index) {
      const Chunk& chunk = chunks[index];
      if constexpr (std::is_same_v<scalar_t, float>) {
        std::array<float*, kLists> views;
        for (int l = 0; l < kLists; ++l) views[l] = pointers[l][chunk.tensor] + chunk.begin;
        block_fn(views, chunk.end - chunk.begin, chunk.tensor);
      } else {
        for (int64_t start = chunk.begin; start < chunk.end; start += kBlock) {
          const int64_t n = std::min(kBlock, chunk.end - start);
          std::array<float*, kLists> views;
          for (int l = 0; l < kLists; ++l) {
            to_float(pointers[l][chunk.tensor] + start, buffers[l], n);
            views[l] = buffers[l];
          }
          block_fn(views, n, chunk.tensor);
          for (int l = 0; l < kLists; ++l) {
            if (l != 1) from_float(buffers[l], pointers[l][chunk.tensor] + start, n);
          }
        }
      }
    }
  });
}

// 1 / grad_scale times the clip coefficient; false when found_inf says skip.
bool gradient_factor(const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf,
                     const c10::optional<at::Tensor>& clip_coef, float& factor) {
  if (found_inf.has_value() && found_inf->item<float>() != 0.0f) return false;
  factor = 1.0f;
  if (grad_scale.has_value()) factor = 1.0f / grad_scale->item<float>();
  if (clip_coef.has_value()) factor *= clip_coef->item<float>();
  return true;
}

void check_cpu(const char* op, at::TensorList params) {
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].device().is_cpu(), "regops ", op, ": the CPU kernel got params[", i, "] on ",
                params[i].device());
  }
}

void sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, double lr,
                  double momentum, double dampening, double weight_decay, bool nesterov, bool maximize, double l1,
                  bool proximal, bool first_step, const c10::optional<at::Tensor>& grad_scale,
                  const c10::optional<at::Tensor>& found_inf, const c10::optional<at::Tensor>& clip_coef) {
  constexpr const char* op = "sgd_step_";
  check_params(op, params);
  check_tensor_list(op, "grads", grads, params, false);
  check_tensor_list(op, "momentum_buffers", momentum_buffers, params, momentum == 0.0);
  TORCH_CHECK(momentum == 0.0 || !momentum_buffers.empty(), "regops sgd_step_: momentum ", momentum,
              " needs momentum_buffers");
  check_hyperparameters(op, lr, weight_decay, 0.0, l1);
  if (params.empty()) return;
  check_cpu(op, params);
  check_amp_and_clip(op, grad_scale, found_inf, clip_coef, params[0].device());
  SGDCoefficients c = make_sgd_coefficients(lr, momentum, dampening, weight_decay, nesterov, maximize, l1, proximal,
                                            first_step);
  if (!gradient_factor(grad_scale, found_inf, clip_coef, c.gradient.grad_factor)) return;
  dispatch_optimizer_dtype(op, params[0].scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    if (momentum != 0.0) {
      apply_blocks<scalar_t, 3>({params, grads, momentum_buffers}, [&](const std::array<float*, 3>& v, int64_t n, int64_t) {
        sgd_momentum_block(v[0], v[1], v[2], n, c);
      });
    } else {
      apply_blocks<scalar_t, 2>({params, grads}, [&](const std::array<float*, 2>& v, int64_t n, int64_t) {
        sgd_block(v[0], v[1], nullptr, n, c);
      });
    }
  });
}

void sgd_step_tensor_lr_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                            const at::Tensor& lr, double momentum, double dampening, double weight_decay,
                            bool nesterov, bool maximize, double l1, bool proximal, bool first_step,
                            const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf,
                            const c10::optional<at::Tensor>& clip_coef) {
  TORCH_CHECK(lr.numel() == 1 && lr.device().is_cpu(), "regops sgd_step_: lr must be a one-element CPU tensor here");
  sgd_step_cpu(params, grads, momentum_buffers, lr.item<double>(), momentum, dampening, weight_decay, nesterov,
               maximize, l1, proximal, first_step, grad_scale, found_inf, clip_coef);
}

void adamw_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, at::TensorList state_steps, double lr, double beta1,
                    double beta2, double eps, double weight_decay, double l2, double l1, bool proximal,
                    bool amsgrad, bool maximize, const c10::optional<at::Tensor>& grad_scale,
                    const c10::optional<at::Tensor>& found_inf, const c10::optional<at::Tensor>& clip_coef) {
  constexpr const char* op = "adamw_step_";
  check_params(op, params);
  check_tensor_list(op, "grads", grads, params, false);
  check_tensor_list(op, "exp_avgs", exp_avgs, params, false);
  check_tensor_list(op, "exp_avg_sqs", exp_avg_sqs, params, false);
  check_tensor_list(op, "max_exp_avg_sqs", max_exp_avg_sqs, params, !amsgrad);
  TORCH_CHECK(!amsgrad || !max_exp_avg_sqs.empty(), "regops adamw_step_: amsgrad needs max_exp_avg_sqs");
  check_state_steps(op, state_steps, params);
  check_hyperparameters(op, lr, weight_decay, l2, l1);
  TORCH_CHECK(beta1 >= 0.0 && beta1 < 1.0 && beta2 >= 0.0 && beta2 < 1.0,
              "regops adamw_step_: betas must be in [0, 1), got (", beta1, ", ", beta2, ")");
  TORCH_CHECK(eps >= 0.0, "regops adamw_step_: eps must be >= 0, got ", eps);
  if (params.empty()) return;
  check_cpu(op, params);
  check_amp_and_clip(op, grad_scale, found_inf, clip_coef, params[0].device());
  float grad_factor = 1.0f;
  if (!gradient_factor(grad_scale, found_inf, clip_coef, grad_factor)) return;
  // The step counts are incremented first, as torch does, and the bias
  // corrections computed from the new count in double.
  std::vector<AdamWCoefficients> coefficients;
  coefficients.reserve(params.size());
  for (const at::Tensor& step : state_steps) {
    float* count = step.mutable_data_ptr<float>();
    *count += 1.0f;
    coefficients.push_back(
        make_adamw_coefficients(lr, beta1, beta2, eps, weight_decay, l2, l1, proximal, amsgrad, maximize, *count));
    coefficients.back().gradient.grad_factor = grad_factor;
  }
  dispatch_optimizer_dtype(op, params[0].scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    if (amsgrad) {
      apply_blocks<scalar_t, 5>({params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs},
                                [&](const std::array<float*, 5>& v, int64_t n, int64_t t) {
        adamw_amsgrad_block(v[0], v[1], v[2], v[3], v[4], n, coefficients[t]);
      });
    } else {
      apply_blocks<scalar_t, 4>({params, grads, exp_avgs, exp_avg_sqs},
                                [&](const std::array<float*, 4>& v, int64_t n, int64_t t) {
        adamw_block(v[0], v[1], v[2], v[3], nullptr, n, coefficients[t]);
      });
    }
  });
}

void adamw_step_tensor_lr_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                              at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                              const at::Tensor& lr, double beta1, double beta2, double eps, double weight_decay,
                              double l2, double l1, bool proximal, bool amsgrad, bool maximize,
                              const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf,
                              const c10::optional<at::Tensor>& clip_coef) {
  TORCH_CHECK(lr.numel() == 1 && lr.device().is_cpu(), "regops adamw_step_: lr must be a one-element CPU tensor here");
  adamw_step_cpu(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr.item<double>(), beta1, beta2,
                 eps, weight_decay, l2, l1, proximal, amsgrad, maximize, grad_scale, found_inf, clip_coef);
}

at::Tensor multi_tensor_norm_cpu(at::TensorList tensors, bool squared) {
  at::Tensor result = at::zeros({}, at::TensorOptions().dtype(at::kFloat));
  if (tensors.empty()) return result;
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(tensors[i].device().is_cpu(), "regops multi_tensor_norm: tensors[", i, "] is on ",
                tensors[i].device());
    TORCH_CHECK(tensors[i].scalar_type() == tensors[0].scalar_type(),
                "regops multi_tensor_norm: all tensors must have one dtype (one call per dtype), got ",
                tensors[0].scalar_type(), " and ", tensors[i].scalar_type(), " at ", i);
    TORCH_CHECK(tensors[i].layout() == at::kStrided, "regops multi_tensor_norm: tensors[", i, "] must be dense");
  }
  // A non-dense view (rare for gradients) is summed from a contiguous copy.
  std::vector<at::Tensor> dense;
  for (const at::Tensor& t : tensors) dense.push_back(t.numel() <= 1 || t.is_non_overlapping_and_dense() ? t : t.contiguous());
  const std::vector<Chunk> chunks = make_chunks(dense);
  // One partial per chunk, summed in a fixed order: the result does not
  // depend on the number of threads.
  std::vector<double> partials(chunks.size(), 0.0);
  dispatch_optimizer_dtype("multi_tensor_norm", tensors[0].scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    for_chunks(chunks, total_numel(dense), [&](int64_t first, int64_t last) {
      float buffer[kBlock];
      for (int64_t index = first; index < last; ++index) {
        const Chunk& chunk = chunks[index];
        const scalar_t* data = static_cast<const scalar_t*>(dense[chunk.tensor].data_ptr()) + chunk.begin;
        if constexpr (std::is_same_v<scalar_t, float>) {
          partials[index] = sum_of_squares(data, chunk.end - chunk.begin);
        } else {
          double sum = 0.0;
          for (int64_t start = 0; start < chunk.end - chunk.begin; start += kBlock) {
            const int64_t n = std::min(kBlock, chunk.end - chunk.begin - start);
            to_float(data + start, buffer, n);
            sum += sum_of_squares(buffer, n);
          }
          partials[index] = sum;
        }
      }
    });
  });
  double total = 0.0;
  for (double partial : partials) total += partial;
  result.fill_(squared ? total : std::sqrt(total));
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(regops, CPU, m) {
  m.impl("sgd_step_", &sgd_step_cpu);
  m.impl("sgd_step_.tensor_lr", &sgd_step_tensor_lr_cpu);
  m.impl("adamw_step_", &adamw_step_cpu);
  m.impl("adamw_step_.tensor_lr", &adamw_step_tensor_lr_cpu);
  m.impl("multi_tensor_norm", &multi_tensor_norm_cpu);
}

}  // namespace regops
