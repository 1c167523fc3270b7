// Penalized SGD and AdamW on CUDA: a multi-tensor apply. All tensors of a
// (device, dtype) group go to one kernel launch: the host packs a table of
// data pointers, element counts, step-count pointers and, for every CUDA
// block, which tensor and which chunk of kChunk elements it updates; the
// table travels in one asynchronous copy from pinned memory (no host sync,
// no per-tensor launches, no limit on the number of tensors). Each block
// moves its chunk as 16-byte vectors when every list's pointer is aligned,
// with a scalar path for the tail and unaligned tensors. The element update
// is regops/optim.h, shared with the CPU kernel.
//
// Bytes per parameter (element size e): SGD 3e (5e with momentum), AdamW 7e
// (9e with amsgrad); the table adds 16 bytes per block of kChunk elements.
// lr (tensor overload), GradScaler's grad_scale and found_inf and the clip
// coefficient are read on the device.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "regops/cuda_utils.cuh"
#include "regops/optim.h"
#include "regops/optim_host.h"

namespace regops {
namespace {

constexpr int kThreads = 512;
constexpr int64_t kChunk = 1 << 16;  // elements per block: 128 per thread, so the 16-byte table read is noise

// Device views of the packed table (int64 words; pointers as integers).
struct TensorTable {
  const int64_t* addresses;     // [tensor][list]
  const int64_t* numels;        // [tensor]
  const int64_t* steps;         // [tensor]: float* of the step count, or 0
  const int64_t* block_tensor;  // [block]
  const int64_t* block_start;   // [block]
};

__device__ __forceinline__ bool aligned16(const void* pointer) {
  return reinterpret_cast<uintptr_t>(pointer) % 16 == 0;
}

// kLists lists; list 1 (the gradients) is read only. Functor:
//   using Coefficients = ...;
//   __device__ bool prepare(const TensorTable&, int64_t tensor, Coefficients&) const  (false: skip)
//   __device__ void apply(float (&x)[kLists], const Coefficients&) const
template <typename scalar_t, int kLists, typename Functor>
__global__ void __launch_bounds__(kThreads) multi_tensor_apply_kernel(TensorTable table, Functor functor) {
  const int64_t tensor = table.block_tensor[blockIdx.x];
  const int64_t start = table.block_start[blockIdx.x];
  const int64_t n = min(kChunk, table.numels[tensor] - start);
  typename Functor::Coefficients coefficients;
  if (!functor.prepare(table, tensor, coefficients)) return;
  scalar_t* lists[kLists];
  bool aligned = true;
#pragma unroll
  for (int l = 0; l < kLists; ++l) {
    lists[l] = reinterpret_cast<scalar_t*>(table.addresses[tensor * kLists + l]) + start;
    aligned = aligned && aligned16(lists[l]);
  }
  constexpr int kVector = 16 / sizeof(scalar_t);
  using Vector = AlignedVector<scalar_t, kVector>;
  const int64_t vector_end = aligned ? n / kVector * kVector : 0;
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * kVector; i < vector_end;
       i += static_cast<int64_t>(blockDim.x) * kVector) {
    Vector loaded[kLists];
#pragma unroll
    for (int l = 0; l < kLists; ++l) loaded[l] = load_vector<Vector>(lists[l] + i);
#pragma unroll
    for (int e = 0; e < kVector; ++e) {
      float x[kLists];
#pragma unroll
      for (int l = 0; l < kLists; ++l) x[l] = static_cast<float>(loaded[l].value[e]);
      functor.apply(x, coefficients);
#pragma unroll
      for (int l = 0; l < kLists; ++l) loaded[l].value[e] = static_cast<scalar_t>(x[l]);
    }
#pragma unroll
    for (int l = 0; l < kLists; ++l) {
      if (l != 1) store_vector(lists[l] + i, loaded[l]);
    }
  }
  for (int64_t i = vector_end + threadIdx.x; i < n; i += blockDim.x) {
    float x[kLists];
#pragma unroll
    for (int l = 0; l < kLists; ++l) x[l] = static_cast<float>(lists[l][i]);
    functor.apply(x, coefficients);
#pragma unroll
    for (int l = 0; l < kLists; ++l) {
      if (l != 1) lists[l][i] = static_cast<scalar_t>(x[l]);
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

  __device__ bool prepare(const TensorTable&, int64_t, SGDCoefficients& c) const {
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
  __device__ bool prepare(const TensorTable& table, int64_t tensor, AdamWCoefficients& c) const {
    if (scalars.skip()) return false;
    const double step = static_cast<double>(*reinterpret_cast<const float*>(table.steps[tensor])) + 1.0;
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

__global__ void increment_steps_kernel(const int64_t* steps, int64_t count, const float* found_inf) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count || (found_inf != nullptr && *found_inf != 0.0f)) return;
  *reinterpret_cast<float*>(steps[i]) += 1.0f;
}

// The table for `lists` (all of one device), on that device. Layout in int64
// words: addresses, numels, steps, block_tensor, block_start.
struct PackedTable {
  at::Tensor storage;  // keeps the device copy alive until the launch is queued
  TensorTable table;
  int64_t blocks;
};

PackedTable pack_table(const std::vector<at::TensorList>& lists, at::TensorList steps) {
  const at::TensorList params = lists[0];
  const int64_t tensors = static_cast<int64_t>(params.size());
  const int64_t num_lists = static_cast<int64_t>(lists.size());
  std::vector<int64_t> block_tensor, block_start;
  for (int64_t t = 0; t < tensors; ++t) {
    for (int64_t start = 0; start < params[t].numel(); start += kChunk) {
      block_tensor.push_back(t);
      block_start.push_back(start);
    }
  }
  const int64_t blocks = static_cast<int64_t>(block_tensor.size());
  const int64_t words = tensors * (num_lists + 2) + 2 * blocks;
  at::Tensor host = at::empty({words}, at::TensorOptions().dtype(at::kLong).pinned_memory(cuda::kPinnedStaging));
  int64_t* w = host.mutable_data_ptr<int64_t>();
  for (int64_t t = 0; t < tensors; ++t) {
    for (int64_t l = 0; l < num_lists; ++l) w[t * num_lists + l] = reinterpret_cast<int64_t>(lists[l][t].data_ptr());
  }
  int64_t* numels = w + tensors * num_lists;
  int64_t* step_pointers = numels + tensors;
  int64_t* tensor_of_block = step_pointers + tensors;
  int64_t* start_of_block = tensor_of_block + blocks;
  for (int64_t t = 0; t < tensors; ++t) {
    numels[t] = params[t].numel();
    step_pointers[t] = steps.empty() ? 0 : reinterpret_cast<int64_t>(steps[t].data_ptr());
  }
  std::copy(block_tensor.begin(), block_tensor.end(), tensor_of_block);
  std::copy(block_start.begin(), block_start.end(), start_of_block);
  // The caching host allocator keeps the pinned buffer until the copy is done.
  at::Tensor device = host.to(params[0].device(), /*non_blocking=*/true);
  const int64_t* d = device.const_data_ptr<int64_t>();
  TensorTable table{d, d + tensors * num_lists, d + tensors * (num_lists + 1), d + tensors * (num_lists + 2),
                    d + tensors * (num_lists + 2) + blocks};
  return {device, table, blocks};
}

void check_cuda(const char* op, at::TensorList params) {
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(cuda::on_device(params[i]), "regops ", op, ": the CUDA kernel got params[", i, "] on ", params[i].device());
  }
}

DeviceScalars device_scalars(const at::Tensor* lr, const c10::optional<at::Tensor>& grad_scale,
                             const c10::optional<at::Tensor>& found_inf, const c10::optional<at::Tensor>& clip_coef) {
  auto pointer = [](const c10::optional<at::Tensor>& t) -> const float* {
    return t.has_value() ? t->const_data_ptr<float>() : nullptr;
  };
  return {lr != nullptr ? lr->const_data_ptr<float>() : nullptr, pointer(grad_scale), pointer(found_inf),
          pointer(clip_coef)};
}

template <typename scalar_t, int kLists, typename Functor>
void launch(const std::vector<at::TensorList>& lists, at::TensorList steps, const Functor& functor) {
  PackedTable packed = pack_table(lists, steps);
  if (packed.blocks == 0) return;
  cuda::launch(multi_tensor_apply_kernel<scalar_t, kLists, Functor>, packed.blocks, kThreads, 0, cuda::current_stream(),
               packed.table, functor);
  REGOPS_KERNEL_LAUNCH_CHECK();
}

void sgd_step(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, double lr,
              const at::Tensor* lr_tensor, double momentum, double dampening, double weight_decay, bool nesterov,
              bool maximize, double l1, bool proximal, bool first_step, const c10::optional<at::Tensor>& grad_scale,
              const c10::optional<at::Tensor>& found_inf, const c10::optional<at::Tensor>& clip_coef) {
  constexpr const char* op = "sgd_step_";
  check_sgd_arguments(params, grads, momentum_buffers, lr, momentum, weight_decay, l1);
  if (params.empty()) return;
  check_cuda(op, params);
  check_amp_and_clip(op, grad_scale, found_inf, clip_coef, params[0].device());
  if (lr_tensor != nullptr) check_scalar_tensor(op, "lr", *lr_tensor, params[0].device());
  const cuda::DeviceGuard guard(params[0].device());
  const SGDCoefficients base = make_sgd_coefficients(lr, momentum, dampening, weight_decay, nesterov, maximize, l1,
                                                     proximal, first_step);
  const DeviceScalars scalars = device_scalars(lr_tensor, grad_scale, found_inf, clip_coef);
  const float proximal_l1 = proximal ? static_cast<float>(l1) : 0.0f;
  dispatch_optimizer_dtype(op, params[0].scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    if (momentum != 0.0) {
      launch<scalar_t, 3>({params, grads, momentum_buffers}, {}, SGDFunctor<3>{base, proximal_l1, scalars});
    } else {
      launch<scalar_t, 2>({params, grads}, {}, SGDFunctor<2>{base, proximal_l1, scalars});
    }
  });
}

void sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, double lr,
                   double momentum, double dampening, double weight_decay, bool nesterov, bool maximize, double l1,
                   bool proximal, bool first_step, const c10::optional<at::Tensor>& grad_scale,
                   const c10::optional<at::Tensor>& found_inf, const c10::optional<at::Tensor>& clip_coef) {
  sgd_step(params, grads, momentum_buffers, lr, nullptr, momentum, dampening, weight_decay, nesterov, maximize, l1,
           proximal, first_step, grad_scale, found_inf, clip_coef);
}

void sgd_step_tensor_lr_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                             const at::Tensor& lr, double momentum, double dampening, double weight_decay,
                             bool nesterov, bool maximize, double l1, bool proximal, bool first_step,
                             const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf,
                             const c10::optional<at::Tensor>& clip_coef) {
  sgd_step(params, grads, momentum_buffers, 0.0, &lr, momentum, dampening, weight_decay, nesterov, maximize, l1,
           proximal, first_step, grad_scale, found_inf, clip_coef);
}

void adamw_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList max_exp_avg_sqs, at::TensorList state_steps, double lr, const at::Tensor* lr_tensor,
                double beta1, double beta2, double eps, double weight_decay, double l2, double l1, bool proximal,
                bool amsgrad, bool maximize, const c10::optional<at::Tensor>& grad_scale,
                const c10::optional<at::Tensor>& found_inf, const c10::optional<at::Tensor>& clip_coef) {
  constexpr const char* op = "adamw_step_";
  check_adamw_arguments(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2, eps,
                        weight_decay, l2, l1, amsgrad);
  if (params.empty()) return;
  check_cuda(op, params);
  check_amp_and_clip(op, grad_scale, found_inf, clip_coef, params[0].device());
  if (lr_tensor != nullptr) check_scalar_tensor(op, "lr", *lr_tensor, params[0].device());
  const cuda::DeviceGuard guard(params[0].device());
  const DeviceScalars scalars = device_scalars(lr_tensor, grad_scale, found_inf, clip_coef);
  dispatch_optimizer_dtype(op, params[0].scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    if (amsgrad) {
      launch<scalar_t, 5>({params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs}, state_steps,
                          AdamWFunctor<5>{lr, beta1, beta2, eps, weight_decay, l2, l1, proximal, amsgrad, maximize,
                                          scalars});
    } else {
      launch<scalar_t, 4>({params, grads, exp_avgs, exp_avg_sqs}, state_steps,
                          AdamWFunctor<4>{lr, beta1, beta2, eps, weight_decay, l2, l1, proximal, amsgrad, maximize,
                                          scalars});
    }
  });
  // Count the step after the update has read the old count (same stream).
  PackedTable steps = pack_table({state_steps}, {});
  const int64_t count = static_cast<int64_t>(state_steps.size());
  cuda::launch(increment_steps_kernel, (count + 255) / 256, 256, 0, cuda::current_stream(),
      steps.table.addresses, count, scalars.found_inf);
  REGOPS_KERNEL_LAUNCH_CHECK();
}

void adamw_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                     double lr, double beta1, double beta2, double eps, double weight_decay, double l2, double l1,
                     bool proximal, bool amsgrad, bool maximize, const c10::optional<at::Tensor>& grad_scale,
                     const c10::optional<at::Tensor>& found_inf, const c10::optional<at::Tensor>& clip_coef) {
  adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, nullptr, beta1, beta2, eps,
             weight_decay, l2, l1, proximal, amsgrad, maximize, grad_scale, found_inf, clip_coef);
}

void adamw_step_tensor_lr_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                               at::TensorList state_steps, const at::Tensor& lr, double beta1, double beta2,
                               double eps, double weight_decay, double l2, double l1, bool proximal, bool amsgrad,
                               bool maximize, const c10::optional<at::Tensor>& grad_scale,
                               const c10::optional<at::Tensor>& found_inf,
                               const c10::optional<at::Tensor>& clip_coef) {
  adamw_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, 0.0, &lr, beta1, beta2, eps,
             weight_decay, l2, l1, proximal, amsgrad, maximize, grad_scale, found_inf, clip_coef);
}

// --- multi_tensor_norm: per-block float32 partial sums, then one block sums them.

// The sum of every thread's value of a block of kThreads, in a fixed order
// (warp shuffles, then the warp sums in turn), valid in thread 0.
__device__ __forceinline__ float block_sum(float value) {
  REGOPS_SHARED_ARRAY(float, warp_sums, [kThreads / 32]);
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xFFFFFFFFu, value, offset);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = value;
  __syncthreads();
  float total = 0.0f;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
  }
  return total;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) sum_of_squares_kernel(TensorTable table, float* partials) {
  const int64_t tensor = table.block_tensor[blockIdx.x];
  const int64_t start = table.block_start[blockIdx.x];
  const int64_t n = min(kChunk, table.numels[tensor] - start);
  const scalar_t* x = reinterpret_cast<const scalar_t*>(table.addresses[tensor]) + start;
  constexpr int kVector = 16 / sizeof(scalar_t);
  using Vector = AlignedVector<scalar_t, kVector>;
  const int64_t vector_end = aligned16(x) ? n / kVector * kVector : 0;
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
    PackedTable packed = pack_table({at::TensorList(dense)}, {});
    if (packed.blocks == 0) return;
    at::Tensor partials = at::empty({packed.blocks}, result.options());
    cuda::launch(sum_of_squares_kernel<scalar_t>, packed.blocks, kThreads, 0, stream, packed.table,
                 partials.mutable_data_ptr<float>());
    REGOPS_KERNEL_LAUNCH_CHECK();
    cuda::launch(finish_norm_kernel, 1, kThreads, 0, stream, partials.const_data_ptr<float>(), packed.blocks, squared,
                 result.mutable_data_ptr<float>());
    REGOPS_KERNEL_LAUNCH_CHECK();
  });
  return result;
}

}  // namespace

REGOPS_CUDA_LIBRARY_IMPL(m) {
  m.impl("sgd_step_", &sgd_step_cuda);
  m.impl("sgd_step_.tensor_lr", &sgd_step_tensor_lr_cuda);
  m.impl("adamw_step_", &adamw_step_cuda);
  m.impl("adamw_step_.tensor_lr", &adamw_step_tensor_lr_cuda);
  m.impl("multi_tensor_norm", &multi_tensor_norm_cuda);
}

}  // namespace regops
