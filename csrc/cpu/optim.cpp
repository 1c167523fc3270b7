// Penalized SGD and AdamW on the CPU: one call updates every tensor of a
// (device, dtype) group. The tensors are cut into chunks of kChunk elements
// that at::parallel_for spreads over ATen's OpenMP pool (so small tensors
// share a thread and large ones are split). Inside a chunk the element
// update of regops/optim.h runs in loops the compiler vectorizes, on float32
// tensors directly and on bfloat16 tensors as bits converted in registers
// (shift to widen, round-to-nearest-even with bit operations to narrow:
// c10's per-element bfloat16 conversion does not vectorize and made bf16
// SGD slow); float16 goes through float32 blocks of kBlock elements.
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
constexpr int64_t kBlock = 512;      // float16 path: five float32 lists of 512 stay in L1
// Below this many elements in all, a call runs on the calling thread: waking
// the pool costs more than the work.
constexpr int64_t kSerialBelow = 1 << 16;

// --- vectorizable loops --------------------------------------------------------
// Compiled for AVX-512 and AVX2 as well; the loader picks the best the
// processor has. Flags that would make a loop branch on memory (momentum,
// amsgrad) are template parameters of the inlined body; the rest become selects.

// Flags that would otherwise be loop-invariant selects are template
// parameters of the inlined loops (see regops/optim.h); each variant is a
// plain function so that target_clones applies. The loops run on float32
// storage or directly on bfloat16 bits (Bits16), converting in registers:
// one pass over memory, no staging buffers. float16 goes through float32
// blocks (apply_blocks).
// x86-64-v4 (AVX-512 with BW/VL) rather than plain avx512f: narrowing float32
// to bfloat16 bits needs the 16-bit element instructions, without which the
// bfloat16 loops ran at half speed.
#define REGOPS_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
// The loops must be inlined into each clone to be compiled for its target.
#define REGOPS_ALWAYS_INLINE __attribute__((always_inline)) inline

using Bits16 = uint16_t;  // bfloat16 storage

REGOPS_ALWAYS_INLINE float load_element(const float* data, int64_t i) { return data[i]; }
REGOPS_ALWAYS_INLINE void store_element(float* data, int64_t i, float value) { data[i] = value; }

// bfloat16 <-> float32 as bit operations: widening is a shift; narrowing
// rounds to nearest even and keeps NaN a quiet NaN, as c10::BFloat16 does.
REGOPS_ALWAYS_INLINE float load_element(const Bits16* data, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(data[i]) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

REGOPS_ALWAYS_INLINE void store_element(Bits16* data, int64_t i, float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const bool is_nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
  data[i] = static_cast<Bits16>(is_nan ? 0x7FC0u : rounded);
}

template <typename T, bool kMomentum, bool kFirstStep, bool kNesterov>
REGOPS_ALWAYS_INLINE void sgd_loop(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ buffer, int64_t n,
                     const SGDCoefficients& coefficients) {
  SGDCoefficients c = coefficients;
  c.has_momentum = kMomentum;
  c.first_step = kFirstStep;
  c.nesterov = kNesterov;
  for (int64_t i = 0; i < n; ++i) {
    float param = load_element(p, i);
    float buf = kMomentum && !kFirstStep ? load_element(buffer, i) : 0.0f;
    sgd_update(param, load_element(g, i), buf, c);
    store_element(p, i, param);
    if (kMomentum) store_element(buffer, i, buf);
  }
}

template <typename T>
using SGDBlock = void (*)(T*, const T*, T*, int64_t, const SGDCoefficients&);

#define REGOPS_SGD_BLOCK(NAME, T, MOMENTUM, FIRST_STEP, NESTEROV)                                        \
  REGOPS_CLONES void NAME(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ buffer, int64_t n,   \
                          const SGDCoefficients& c) {                                                     \
    sgd_loop<T, MOMENTUM, FIRST_STEP, NESTEROV>(p, g, buffer, n, c);                                      \
  }
#define REGOPS_SGD_BLOCKS(SUFFIX, T)                                          \
  REGOPS_SGD_BLOCK(sgd_block_##SUFFIX, T, false, false, false)                \
  REGOPS_SGD_BLOCK(sgd_momentum_block_##SUFFIX, T, true, false, false)        \
  REGOPS_SGD_BLOCK(sgd_momentum_first_block_##SUFFIX, T, true, true, false)   \
  REGOPS_SGD_BLOCK(sgd_nesterov_block_##SUFFIX, T, true, false, true)         \
  REGOPS_SGD_BLOCK(sgd_nesterov_first_block_##SUFFIX, T, true, true, true)    \
  SGDBlock<T> select_sgd_block(const SGDCoefficients& c, T*) {                \
    if (!c.has_momentum) return sgd_block_##SUFFIX;                           \
    if (c.nesterov) return c.first_step ? sgd_nesterov_first_block_##SUFFIX : sgd_nesterov_block_##SUFFIX; \
    return c.first_step ? sgd_momentum_first_block_##SUFFIX : sgd_momentum_block_##SUFFIX;                 \
  }
REGOPS_SGD_BLOCKS(float32, float)
REGOPS_SGD_BLOCKS(bfloat16, Bits16)
#undef REGOPS_SGD_BLOCKS
#undef REGOPS_SGD_BLOCK

template <typename T, bool kAmsgrad, bool kLerpFromStart>
REGOPS_ALWAYS_INLINE void adamw_loop(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ exp_avg, T* __restrict__ exp_avg_sq,
                       T* __restrict__ max_exp_avg_sq, int64_t n, const AdamWCoefficients& coefficients) {
  AdamWCoefficients c = coefficients;
  c.amsgrad = kAmsgrad;
  c.exp_avg_weight.from_start = kLerpFromStart;
  for (int64_t i = 0; i < n; ++i) {
    float param = load_element(p, i), m = load_element(exp_avg, i), v = load_element(exp_avg_sq, i);
    float v_max = kAmsgrad ? load_element(max_exp_avg_sq, i) : 0.0f;
    adamw_update(param, load_element(g, i), m, v, v_max, c);
    store_element(p, i, param);
    store_element(exp_avg, i, m);
    store_element(exp_avg_sq, i, v);
    if (kAmsgrad) store_element(max_exp_avg_sq, i, v_max);
  }
}

template <typename T>
using AdamWBlock = void (*)(T*, const T*, T*, T*, T*, int64_t, const AdamWCoefficients&);

#define REGOPS_ADAMW_BLOCK(NAME, T, AMSGRAD, FROM_START)                                                        \
  REGOPS_CLONES void NAME(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ exp_avg,                   \
                          T* __restrict__ exp_avg_sq, T* __restrict__ max_exp_avg_sq, int64_t n,                 \
                          const AdamWCoefficients& c) {                                                          \
    adamw_loop<T, AMSGRAD, FROM_START>(p, g, exp_avg, exp_avg_sq, max_exp_avg_sq, n, c);                         \
  }
#define REGOPS_ADAMW_BLOCKS(SUFFIX, T)                                                              \
  REGOPS_ADAMW_BLOCK(adamw_block_##SUFFIX, T, false, true)                                          \
  REGOPS_ADAMW_BLOCK(adamw_amsgrad_block_##SUFFIX, T, true, true)                                   \
  REGOPS_ADAMW_BLOCK(adamw_block_lerp_from_end_##SUFFIX, T, false, false) /* beta1 <= 0.5 */        \
  REGOPS_ADAMW_BLOCK(adamw_amsgrad_block_lerp_from_end_##SUFFIX, T, true, false)                    \
  AdamWBlock<T> select_adamw_block(const AdamWCoefficients& c, T*) {                                \
    if (c.exp_avg_weight.from_start) return c.amsgrad ? adamw_amsgrad_block_##SUFFIX : adamw_block_##SUFFIX; \
    return c.amsgrad ? adamw_amsgrad_block_lerp_from_end_##SUFFIX : adamw_block_lerp_from_end_##SUFFIX;     \
  }
REGOPS_ADAMW_BLOCKS(float32, float)
REGOPS_ADAMW_BLOCKS(bfloat16, Bits16)
#undef REGOPS_ADAMW_BLOCKS
#undef REGOPS_ADAMW_BLOCK

// Sum of squares with 16 independent float32 accumulators (a plain float sum
// does not vectorize without reassociation).
REGOPS_CLONES
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

// float16 <-> float32 for the staged path.
REGOPS_CLONES
void half_to_float(const at::Half* __restrict__ src, float* __restrict__ dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

REGOPS_CLONES
void float_to_half(const float* __restrict__ src, at::Half* __restrict__ dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<at::Half>(src[i]);
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

// The type the loops run on: float32 and bfloat16 (as Bits16) directly,
// float16 through float32 blocks.
template <typename scalar_t>
using LoopType = std::conditional_t<std::is_same_v<scalar_t, at::BFloat16>, Bits16, float>;

// Runs block_fn(LoopType* views[kLists], n, tensor) over every element of
// the tensors of `lists` (lists[l][t] is tensor t of list l; list 1 holds the
// gradients, which are read only). float16 tensors are converted to float32
// blocks of kBlock elements and the written lists converted back.
template <typename scalar_t, int kLists, typename BlockFn>
void apply_blocks(const std::array<at::TensorList, kLists>& lists, BlockFn block_fn) {
  const std::vector<Chunk> chunks = make_chunks(lists[0]);
  std::array<std::vector<scalar_t*>, kLists> pointers;
  for (int l = 0; l < kLists; ++l) {
    for (const at::Tensor& t : lists[l]) pointers[l].push_back(static_cast<scalar_t*>(t.data_ptr()));
  }
  for_chunks(chunks, total_numel(lists[0]), [&](int64_t first, int64_t last) {
    for (int64_t index = first; index < last; ++index) {
      const Chunk& chunk = chunks[index];
      if constexpr (!std::is_same_v<scalar_t, at::Half>) {
        std::array<LoopType<scalar_t>*, kLists> views;
        for (int l = 0; l < kLists; ++l) {
          views[l] = reinterpret_cast<LoopType<scalar_t>*>(pointers[l][chunk.tensor] + chunk.begin);
        }
        block_fn(views, chunk.end - chunk.begin, chunk.tensor);
      } else {
        float buffers[kLists][kBlock];
        for (int64_t start = chunk.begin; start < chunk.end; start += kBlock) {
          const int64_t n = std::min(kBlock, chunk.end - start);
          std::array<float*, kLists> views;
          for (int l = 0; l < kLists; ++l) {
            half_to_float(pointers[l][chunk.tensor] + start, buffers[l], n);
            views[l] = buffers[l];
          }
          block_fn(views, n, chunk.tensor);
          for (int l = 0; l < kLists; ++l) {
            if (l != 1) float_to_half(buffers[l], pointers[l][chunk.tensor] + start, n);
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
  float grad_factor = 1.0f;
  if (!gradient_factor(grad_scale, found_inf, clip_coef, grad_factor)) return;
  c.gradient.grad_factor *= grad_factor;  // keeps maximize's sign
  dispatch_optimizer_dtype(op, params[0].scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    using T = LoopType<scalar_t>;
    const SGDBlock<T> block = select_sgd_block(c, static_cast<T*>(nullptr));
    if (momentum != 0.0) {
      apply_blocks<scalar_t, 3>({params, grads, momentum_buffers}, [&](const auto& v, int64_t n, int64_t) {
        block(v[0], v[1], v[2], n, c);
      });
    } else {
      apply_blocks<scalar_t, 2>({params, grads}, [&](const auto& v, int64_t n, int64_t) {
        block(v[0], v[1], nullptr, n, c);
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
  if (maximize) grad_factor = -grad_factor;
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
    using T = LoopType<scalar_t>;
    const AdamWBlock<T> block = select_adamw_block(coefficients[0], static_cast<T*>(nullptr));  // same flags for all
    if (amsgrad) {
      apply_blocks<scalar_t, 5>({params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs},
                                [&](const auto& v, int64_t n, int64_t t) {
        block(v[0], v[1], v[2], v[3], v[4], n, coefficients[t]);
      });
    } else {
      apply_blocks<scalar_t, 4>({params, grads, exp_avgs, exp_avg_sqs},
                                [&](const auto& v, int64_t n, int64_t t) {
        block(v[0], v[1], v[2], v[3], nullptr, n, coefficients[t]);
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
            if constexpr (std::is_same_v<scalar_t, at::Half>) {
              half_to_float(data + start, buffer, n);
            } else {
              const Bits16* bits = reinterpret_cast<const Bits16*>(data + start);
              for (int64_t i = 0; i < n; ++i) buffer[i] = load_element(bits, i);
            }
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
