// Penalized SGD and AdamW on CUDA: a multi-tensor apply. The tensors of a
// (device, dtype) group go to as few kernel launches as the table allows:
// the host fills a table of data pointers, element counts, step-count
// pointers and, for every CUDA block, which tensor and which chunk of kChunk
// elements it updates, and passes it by value as a kernel argument (as
// Apex's multi_tensor_apply does). Nothing is allocated or copied per step
// and nothing waits for the device, so a step can be captured in a CUDA
// graph and replayed; a group larger than one table takes several launches.
// Each block moves its chunk as 16-byte vectors when every list's pointer is
// aligned, with a scalar path for the tail and unaligned tensors. The element
// update is regops/optim.h, shared with the CPU kernel.
//
// Bytes per parameter (element size e): SGD 3e (5e with momentum), AdamW 7e
// (9e with amsgrad); AdamW adds one launch that counts the step. lr (tensor
// overload), GradScaler's grad_scale and found_inf and the clip coefficient
// are read on the device. A weight average (EMA / SWA, element size a) is
// updated by the same threads right after the parameter, from the value just
// stored: 2a more per parameter, its weights read on the device, no second
// pass.
#include "regops/aten.h"
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "regops/cuda_utils.cuh"
#include "regops/optim.h"
#include "regops/optim_host.h"
#include "regops/stochastic_rounding.h"

namespace regops {
namespace {

constexpr int kThreads = 512;
constexpr int64_t kChunk = 1 << 16;  // elements per block: 128 per thread, so the table lookup is noise

// Kernel arguments are limited to 4 KB on older toolkits and drivers (32 KB
// since CUDA 12.1 on Volta and newer): a table takes 3840 bytes of them, the
// functor and the other arguments the rest.
constexpr size_t kArgumentBytes = 4096;
constexpr size_t kTableBytes = 3840;
constexpr int kMaxBlocks = 320;  // 320 * 64K elements = 21M elements per launch

// One launch's tensors (kLists data pointers, numel and step count each) and
// blocks (tensor slot and chunk index each).
template <int kLists>
struct TensorTable {
  static constexpr int kMaxTensors =
      static_cast<int>((kTableBytes - kMaxBlocks * (sizeof(int32_t) + sizeof(uint8_t))) / (8 * (kLists + 2) + 4));
  static_assert(kMaxTensors <= 256, "block_tensor is a uint8_t");
  void* addresses[kLists][kMaxTensors];
  int64_t numels[kMaxTensors];
  float* steps[kMaxTensors];  // AdamW's step counts; null for SGD and the norm
  int32_t positions[kMaxTensors];  // the tensor's position in the call's lists (for stochastic rounding)
  int32_t block_chunk[kMaxBlocks];
  uint8_t block_tensor[kMaxBlocks];
};

// Calls launch(table, blocks, first_block) for consecutive tables that
// together cover every chunk of every non-empty tensor of lists[0], in order
// (first_block: the number of blocks of the earlier launches). A tensor whose
// chunks do not all fit continues in the next table.
template <int kLists, typename Launch>
void for_each_table(const std::vector<at::TensorList>& lists, at::TensorList steps, const Launch& launch) {
  using Table = TensorTable<kLists>;
  TORCH_INTERNAL_ASSERT(lists.size() == kLists);
  Table table{};
  int slot = 0, blocks = 0;
  int64_t first_block = 0;
  const at::TensorList params = lists[0];
  for (size_t t = 0; t < params.size(); ++t) {
    const int64_t numel = params[t].numel();
    if (numel == 0) continue;
    for (int l = 0; l < kLists; ++l) table.addresses[l][slot] = lists[l][t].data_ptr();
    table.numels[slot] = numel;
    table.steps[slot] = steps.empty() ? nullptr : steps[t].mutable_data_ptr<float>();
    table.positions[slot] = static_cast<int32_t>(t);
    const int64_t chunks = (numel + kChunk - 1) / kChunk;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      table.block_tensor[blocks] = static_cast<uint8_t>(slot);
      table.block_chunk[blocks] = static_cast<int32_t>(chunk);
      ++blocks;
      const bool tensor_done = chunk + 1 == chunks;
      if (blocks < kMaxBlocks && !(tensor_done && slot + 1 == Table::kMaxTensors)) continue;
      launch(table, blocks, first_block);
      first_block += blocks;
      blocks = 0;
      if (tensor_done) {
        slot = -1;  // the next tensor starts a fresh table
      } else {      // this tensor carries on, from slot 0 of the next table
        for (int l = 0; l < kLists; ++l) table.addresses[l][0] = table.addresses[l][slot];
        table.numels[0] = table.numels[slot];
        table.steps[0] = table.steps[slot];
        table.positions[0] = table.positions[slot];
        slot = 0;
      }
    }
    ++slot;
  }
  if (blocks > 0) launch(table, blocks, first_block);
}

// The value that random slot of list l rounds (stochastic_rounding.h): the
// parameter is list 0, the states follow the gradients (list 1).
__device__ __forceinline__ uint32_t rounding_slot(int l) { return l == 0 ? 0u : static_cast<uint32_t>(l - 1); }

template <typename scalar_t>
__device__ __forceinline__ float round_stochastic(float value, uint32_t bits) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    return stochastic_round_bfloat16(value, bits);
  } else {
    return stochastic_round_half(value, bits);
  }
}

// rounding_bits for a run-time element e (the scalar tail): the word
// chosen with selects, not by indexing, which put the words on the stack.
__device__ __forceinline__ uint32_t rounding_bits_at(const Philox4& words, int e) {
  const int w = e >> 1;
  const uint32_t word = w == 0 ? words.x[0] : w == 1 ? words.x[1] : w == 2 ? words.x[2] : words.x[3];
  return (word >> ((e & 1) * 16)) & 0xFFFFu;
}

// The weight average of one element: average = lerp(average, p, weight)
// from the stored parameter p, rounded as the CPU kernel rounds it
// (stochastically, random slot kRoundAverage, for a 16-bit average of a
// stochastic call).
// The weight is passed as a float and turned into the lerp form here: a
// LerpWeight kept across the loop went to the stack.
template <typename average_t, bool kStochastic>
__device__ __forceinline__ average_t averaged(average_t average, float stored, float weight, uint32_t bits) {
  float value = lerp_like_torch(static_cast<float>(average), stored, lerp_weight(weight));
  if constexpr (kStochastic && sizeof(average_t) == 2) value = round_stochastic<average_t>(value, bits);
  return static_cast<average_t>(value);
}

// No weight average: average_t is this type.
struct NoAverage {};

// kLists lists; list 1 (the gradients) is read only. Functor:
//   using Coefficients = ...;
//   __device__ bool prepare(const float* step, Coefficients&) const  (false: skip)
//   __device__ void apply(float (&x)[kLists], const Coefficients&) const
// kStochastic (16-bit types): the written lists are rounded stochastically,
// with `rounding` the op's [seed, group, step, tensor indices] on the device;
// a vector is eight elements, which one Philox call per list serves.
// average_t (float or scalar_t; NoAverage without): the table has one more
// list, the averages, and average_weights holds the lerp weight of each
// tensor of the call (by position), on the device.
template <typename scalar_t, int kLists, bool kStochastic, typename average_t, typename Functor>
__global__ void __launch_bounds__(kThreads)
    multi_tensor_apply_kernel(TensorTable<kLists + (std::is_same_v<average_t, NoAverage> ? 0 : 1)> table,
                              Functor functor, const int64_t* rounding, const float* average_weights) {
  constexpr bool kAverage = !std::is_same_v<average_t, NoAverage>;
  using stored_average_t = std::conditional_t<kAverage, average_t, float>;  // a type for the unused paths
  const int tensor = table.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(table.block_chunk[blockIdx.x]) * kChunk;
  const int64_t n = min(kChunk, table.numels[tensor] - start);
  typename Functor::Coefficients coefficients;
  if (!functor.prepare(table.steps[tensor], coefficients)) return;
  RoundingKey key{};
  uint32_t tensor_index = 0;
  if (kStochastic) {
    key = rounding_key(static_cast<uint64_t>(rounding[0]), static_cast<uint64_t>(rounding[1]),
                       static_cast<uint64_t>(rounding[2]));
    tensor_index = static_cast<uint32_t>(rounding[3 + table.positions[tensor]]);
  }
  scalar_t* lists[kLists];
  bool aligned = true;
#pragma unroll
  for (int l = 0; l < kLists; ++l) {
    lists[l] = static_cast<scalar_t*>(table.addresses[l][tensor]) + start;
    aligned = aligned && is_aligned<16>(lists[l]);
  }
  stored_average_t* average = nullptr;
  float weight = 0.0f;
  if constexpr (kAverage) {
    average = static_cast<stored_average_t*>(table.addresses[kLists][tensor]) + start;
    aligned = aligned && is_aligned<16>(average);
    weight = average_weights[table.positions[tensor]];
  }
  constexpr int kVector = 16 / sizeof(scalar_t);
  static_assert(!kStochastic || kVector == 8, "stochastic rounding draws 8 elements' bits per Philox call");
  using Vector = AlignedVector<scalar_t, kVector>;
  // The average's kVector elements as 16-byte vectors: two for a float32
  // average of 16-bit parameters, else one.
  constexpr int kAveragePerVector = 16 / sizeof(stored_average_t);
  constexpr int kAverageVectors = kVector / kAveragePerVector > 0 ? kVector / kAveragePerVector : 1;
  using AverageVector = AlignedVector<stored_average_t, kAveragePerVector>;
  const int64_t vector_end = aligned ? n / kVector * kVector : 0;
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * kVector; i < vector_end;
       i += static_cast<int64_t>(blockDim.x) * kVector) {
    Vector loaded[kLists];
#pragma unroll
    for (int l = 0; l < kLists; ++l) loaded[l] = load_vector<Vector>(lists[l] + i);
    AverageVector averages[kAverageVectors];
    if constexpr (kAverage) {
#pragma unroll
      for (int a = 0; a < kAverageVectors; ++a) averages[a] = load_vector<AverageVector>(average + i + a * kAveragePerVector);
    }
    Philox4 words[kLists];
    Philox4 average_words{};
    if (kStochastic) {
      const uint64_t block = static_cast<uint64_t>(start + i) / 8;
#pragma unroll
      for (int l = 0; l < kLists; ++l) {
        if (l != 1) words[l] = rounding_words(key, block, tensor_index, rounding_slot(l));
      }
      if (kAverage && sizeof(stored_average_t) == 2) average_words = rounding_words(key, block, tensor_index, kRoundAverage);
    }
#pragma unroll
    for (int e = 0; e < kVector; ++e) {
      float x[kLists];
#pragma unroll
      for (int l = 0; l < kLists; ++l) x[l] = static_cast<float>(loaded[l].value[e]);
      functor.apply(x, coefficients);
#pragma unroll
      for (int l = 0; l < kLists; ++l) {
        if (kStochastic && l != 1) x[l] = round_stochastic<scalar_t>(x[l], rounding_bits(words[l], e));
        loaded[l].value[e] = static_cast<scalar_t>(x[l]);
      }
      if constexpr (kAverage) {
        stored_average_t& a = averages[e / kAveragePerVector].value[e % kAveragePerVector];
        a = averaged<stored_average_t, kStochastic>(a, static_cast<float>(loaded[0].value[e]), weight,
                                                    kStochastic ? rounding_bits(average_words, e) : 0u);
      }
    }
#pragma unroll
    for (int l = 0; l < kLists; ++l) {
      if (l != 1) store_vector(lists[l] + i, loaded[l]);
    }
    if constexpr (kAverage) {
#pragma unroll
      for (int a = 0; a < kAverageVectors; ++a) store_vector(average + i + a * kAveragePerVector, averages[a]);
    }
  }
  for (int64_t i = vector_end + threadIdx.x; i < n; i += blockDim.x) {
    float x[kLists];
#pragma unroll
    for (int l = 0; l < kLists; ++l) x[l] = static_cast<float>(lists[l][i]);
    functor.apply(x, coefficients);
    const uint64_t element = static_cast<uint64_t>(start + i);
#pragma unroll
    for (int l = 0; l < kLists; ++l) {
      if (l == 1) continue;
      if (kStochastic) {
        const Philox4 words = rounding_words(key, element / 8, tensor_index, rounding_slot(l));
        x[l] = round_stochastic<scalar_t>(x[l], rounding_bits_at(words, static_cast<int>(element % 8)));
      }
      lists[l][i] = static_cast<scalar_t>(x[l]);
    }
    if constexpr (kAverage) {
      uint32_t bits = 0;
      if (kStochastic && sizeof(stored_average_t) == 2) {
        bits = rounding_bits_at(rounding_words(key, element / 8, tensor_index, kRoundAverage),
                                static_cast<int>(element % 8));
      }
      average[i] = averaged<stored_average_t, kStochastic>(average[i], static_cast<float>(lists[0][i]), weight, bits);
    }
  }
}

// Values read on the device; null pointers mean "absent".
struct DeviceScalars {
  const float* lr;  // null: use the float lr
  const float* grad_scale;
  const float* found_inf;
  const float* clip_coef;

  __device__ __forceinline__ bool skip() const { return found_inf != nullptr && *found_inf != 0.0f; }
  __device__ __forceinline__ float grad_factor() const {
    float factor = grad_scale != nullptr ? 1.0f / *grad_scale : 1.0f;
    return clip_coef != nullptr ? factor * *clip_coef : factor;
  }
};

template <int kLists>
struct SGDFunctor {
  using Coefficients = SGDCoefficients;
  SGDCoefficients base;
  float proximal_l1;  // l1 in proximal mode, else 0
  DeviceScalars scalars;

  __device__ bool prepare(const float*, SGDCoefficients& c) const {
    if (scalars.skip()) return false;
    c = base;
    c.gradient.grad_factor = base.gradient.grad_factor * scalars.grad_factor();  // keeps maximize's sign
    if (scalars.lr != nullptr) {
      c.lr = *scalars.lr;
      c.l1_threshold = c.lr * proximal_l1;
    }
    return true;
  }
  __device__ __forceinline__ void apply(float (&x)[kLists], const SGDCoefficients& c) const {
    float buffer = kLists == 3 ? x[kLists - 1] : 0.0f;
    sgd_update(x[0], x[1], buffer, c);
    if (kLists == 3) x[kLists - 1] = buffer;
  }
};

template <int kLists>
struct AdamWFunctor {
  using Coefficients = AdamWCoefficients;
  double lr, beta1, beta2, eps, weight_decay, l2, l1;
  bool proximal, amsgrad, maximize;
  DeviceScalars scalars;

  // Every thread derives its tensor's factors from the step count (before
  // this step's increment, which a later kernel applies).
  __device__ bool prepare(const float* step_count, AdamWCoefficients& c) const {
    if (scalars.skip()) return false;
    const double step = static_cast<double>(*step_count) + 1.0;
    const double rate = scalars.lr != nullptr ? static_cast<double>(*scalars.lr) : lr;
    c = adamw_coefficients(rate, beta1, beta2, eps, weight_decay, l2, l1, proximal, amsgrad, maximize, step,
                           scalars.grad_factor());
    return true;
  }
  __device__ __forceinline__ void apply(float (&x)[kLists], const AdamWCoefficients& c) const {
    float unused = 0.0f;
    float& max_exp_avg_sq = kLists == 5 ? x[kLists - 1] : unused;
    adamw_update(x[0], x[1], x[2], x[3], max_exp_avg_sq, c);
  }
};

// The step counts of up to kMaxSteps tensors, by value as the tables are.
struct StepTable {
  static constexpr int kMaxSteps = static_cast<int>(kTableBytes / sizeof(float*));
  float* steps[kMaxSteps];
};

__global__ void increment_steps_kernel(StepTable table, int count, const float* found_inf) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i >= count || (found_inf != nullptr && *found_inf != 0.0f)) return;
  *table.steps[i] += 1.0f;
}

// The weight averages of a call (check_averages has checked them): the
// tensors, empty without averaging, and the weights on the device.
struct CallAverages {
  std::vector<at::Tensor> tensors;
  const float* weights = nullptr;

  CallAverages(const c10::optional<at::TensorList>& averages, const c10::optional<at::Tensor>& average_weights) {
    if (!averages.has_value() || averages->empty()) return;
    tensors = averages->vec();
    weights = average_weights->const_data_ptr<float>();
  }
};

DeviceScalars device_scalars(const at::Tensor* lr, const StepExtras& extras) {
  auto pointer = [](const c10::optional<at::Tensor>& t) -> const float* {
    return t.has_value() ? t->const_data_ptr<float>() : nullptr;
  };
  return {lr != nullptr ? lr->const_data_ptr<float>() : nullptr, pointer(extras.grad_scale), pointer(extras.found_inf),
          pointer(extras.clip_coef)};
}

// One kernel per table, for an average of type average_t (NoAverage: none).
template <typename scalar_t, int kLists, typename average_t, typename Functor>
void launch_tables(const std::vector<at::TensorList>& lists, at::TensorList steps, const Functor& functor,
                   const int64_t* rounding, const float* average_weights) {
  constexpr int kTableLists = kLists + (std::is_same_v<average_t, NoAverage> ? 0 : 1);
  static_assert(sizeof(TensorTable<kTableLists>) + sizeof(Functor) + 2 * sizeof(void*) <= kArgumentBytes,
                "kernel arguments over 4 KB");
  constexpr bool k16Bit = sizeof(scalar_t) == 2;
  const auto stream = cuda::current_stream();
  for_each_table<kTableLists>(lists, steps, [&](const TensorTable<kTableLists>& table, int blocks, int64_t) {
    if (rounding != nullptr) {
      cuda::launch(multi_tensor_apply_kernel<scalar_t, kLists, k16Bit, average_t, Functor>, blocks, kThreads, 0,
                   stream, table, functor, rounding, average_weights);
    } else {
      cuda::launch(multi_tensor_apply_kernel<scalar_t, kLists, false, average_t, Functor>, blocks, kThreads, 0,
                   stream, table, functor, rounding, average_weights);
    }
    REGOPS_KERNEL_LAUNCH_CHECK();
  });
}

// rounding: the op's rounding tensor, or null (round to nearest even; also
// for float32, which the update already holds exactly). averages: appended
// to the lists as the table's last, float32 or scalar_t.
template <typename scalar_t, int kLists, typename Functor>
void launch(std::vector<at::TensorList> lists, at::TensorList steps, const Functor& functor,
            const c10::optional<at::Tensor>& rounding, const CallAverages& averages) {
  constexpr bool k16Bit = sizeof(scalar_t) == 2;
  const int64_t* rounding_data = k16Bit && rounding.has_value() ? rounding->const_data_ptr<int64_t>() : nullptr;
  if (averages.tensors.empty()) {
    launch_tables<scalar_t, kLists, NoAverage>(lists, steps, functor, rounding_data, nullptr);
    return;
  }
  lists.push_back(averages.tensors);
  if (k16Bit && averages.tensors[0].scalar_type() != at::kFloat) {
    launch_tables<scalar_t, kLists, scalar_t>(lists, steps, functor, rounding_data, averages.weights);
  } else {
    launch_tables<scalar_t, kLists, float>(lists, steps, functor, rounding_data, averages.weights);
  }
}

// The CUDA kernels of the step ops, on the arguments OptimizerEntries has
// checked; a tensor lr is read on the device.
struct CudaOptimizers {
  static constexpr const char* kKernel = "CUDA";

  static bool on_device(const at::Tensor& t) { return cuda::on_device(t); }

  static double host_lr(const char*, const at::Tensor&) { return 0.0; }

  static const at::Tensor* device_lr(const at::Tensor& lr) { return &lr; }

  static void sgd_step(const SGDStepArguments& a) {
    const cuda::DeviceGuard guard(a.params[0].device());
    const SGDCoefficients base = make_sgd_coefficients(a.lr, a.momentum, a.dampening, a.weight_decay, a.nesterov,
                                                       a.maximize, a.l1, a.proximal, a.first_step);
    const DeviceScalars scalars = device_scalars(a.lr_tensor, a.extras);
    const float proximal_l1 = a.proximal ? static_cast<float>(a.l1) : 0.0f;
    const CallAverages call_averages(a.extras.averages, a.extras.average_weights);
    dispatch_optimizer_dtype("sgd_step_", a.params[0].scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      if (a.momentum != 0.0) {
        launch<scalar_t, 3>({a.params, a.grads, a.momentum_buffers}, {}, SGDFunctor<3>{base, proximal_l1, scalars},
                            a.extras.rounding, call_averages);
      } else {
        launch<scalar_t, 2>({a.params, a.grads}, {}, SGDFunctor<2>{base, proximal_l1, scalars}, a.extras.rounding,
                            call_averages);
      }
    });
  }

  static void adamw_step(const AdamWStepArguments& a) {
    const cuda::DeviceGuard guard(a.params[0].device());
    const DeviceScalars scalars = device_scalars(a.lr_tensor, a.extras);
    const CallAverages call_averages(a.extras.averages, a.extras.average_weights);
    dispatch_optimizer_dtype("adamw_step_", a.params[0].scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      if (a.amsgrad) {
        launch<scalar_t, 5>({a.params, a.grads, a.exp_avgs, a.exp_avg_sqs, a.max_exp_avg_sqs}, a.state_steps,
                            AdamWFunctor<5>{a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.l2, a.l1, a.proximal,
                                            a.amsgrad, a.maximize, scalars}, a.extras.rounding, call_averages);
      } else {
        launch<scalar_t, 4>({a.params, a.grads, a.exp_avgs, a.exp_avg_sqs}, a.state_steps,
                            AdamWFunctor<4>{a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.l2, a.l1, a.proximal,
                                            a.amsgrad, a.maximize, scalars}, a.extras.rounding, call_averages);
      }
    });
    // Count the step after the update has read the old count (same stream).
    StepTable steps{};
    for (size_t first = 0; first < a.state_steps.size(); first += StepTable::kMaxSteps) {
      const int count = static_cast<int>(std::min<size_t>(StepTable::kMaxSteps, a.state_steps.size() - first));
      for (int i = 0; i < count; ++i) steps.steps[i] = a.state_steps[first + i].mutable_data_ptr<float>();
      cuda::launch(increment_steps_kernel, (count + 255) / 256, 256, 0, cuda::current_stream(), steps, count,
                   scalars.found_inf);
      REGOPS_KERNEL_LAUNCH_CHECK();
    }
  }
};

// --- multi_tensor_norm: per-block float32 partial sums, then one block sums
// them in block order, so the result does not depend on how many launches
// the partials took.

// The sum of every thread's value of a block of kThreads, in a fixed order
// (warp shuffles, then the warp sums in turn), valid in thread 0.
__device__ __forceinline__ float block_sum(float value) {
  REGOPS_SHARED_ARRAY(float, warp_sums, [kThreads / 32]);
  value = warp_sum(value);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = value;
  __syncthreads();
  float total = 0.0f;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
  }
  return total;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) sum_of_squares_kernel(TensorTable<1> table, float* partials) {
  const int tensor = table.block_tensor[blockIdx.x];
  const int64_t start = static_cast<int64_t>(table.block_chunk[blockIdx.x]) * kChunk;
  const int64_t n = min(kChunk, table.numels[tensor] - start);
  const scalar_t* x = static_cast<const scalar_t*>(table.addresses[0][tensor]) + start;
  constexpr int kVector = 16 / sizeof(scalar_t);
  using Vector = AlignedVector<scalar_t, kVector>;
  const int64_t vector_end = is_aligned<16>(x) ? n / kVector * kVector : 0;
  float sum = 0.0f;
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * kVector; i < vector_end;
       i += static_cast<int64_t>(blockDim.x) * kVector) {
    const Vector v = load_vector<Vector>(x + i);
#pragma unroll
    for (int e = 0; e < kVector; ++e) {
      const float value = static_cast<float>(v.value[e]);
      sum += value * value;
    }
  }
  for (int64_t i = vector_end + threadIdx.x; i < n; i += blockDim.x) {
    const float value = static_cast<float>(x[i]);
    sum += value * value;
  }
  const float total = block_sum(sum);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

// One block, fixed order: the result does not depend on scheduling.
__global__ void __launch_bounds__(kThreads) finish_norm_kernel(const float* partials, int64_t count, bool squared,
                                                               float* out) {
  float sum = 0.0f;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) sum += partials[i];
  const float total = block_sum(sum);
  if (threadIdx.x == 0) *out = squared ? total : sqrtf(total);
}

at::Tensor multi_tensor_norm_cuda(at::TensorList tensors, bool squared) {
  const std::vector<at::Tensor> dense = dense_norm_inputs(tensors);  // copies, if any, go to their tensor's device
  const cuda::DeviceGuard guard(dense[0].device());
  at::Tensor result = at::zeros({}, tensors[0].options().dtype(at::kFloat));
  const auto stream = cuda::current_stream();
  dispatch_optimizer_dtype("multi_tensor_norm", tensors[0].scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    int64_t blocks = 0;
    for (const at::Tensor& t : dense) blocks += (t.numel() + kChunk - 1) / kChunk;
    if (blocks == 0) return;
    at::Tensor partials = at::empty({blocks}, result.options());
    float* partial = partials.mutable_data_ptr<float>();
    for_each_table<1>({at::TensorList(dense)}, {}, [&](const TensorTable<1>& table, int table_blocks, int64_t first) {
      cuda::launch(sum_of_squares_kernel<scalar_t>, table_blocks, kThreads, 0, stream, table, partial + first);
      REGOPS_KERNEL_LAUNCH_CHECK();
    });
    cuda::launch(finish_norm_kernel, 1, kThreads, 0, stream, partials.const_data_ptr<float>(), blocks, squared,
                 result.mutable_data_ptr<float>());
    REGOPS_KERNEL_LAUNCH_CHECK();
  });
  return result;
}

}  // namespace

REGOPS_CUDA_LIBRARY_IMPL(m) {
  register_step_ops<CudaOptimizers>(m);
  m.impl("multi_tensor_norm", &multi_tensor_norm_cuda);
}

}  // namespace regops
