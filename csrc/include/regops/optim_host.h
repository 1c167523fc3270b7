// Host-side pieces of the optimizer ops shared by the CPU and CUDA launchers:
// argument checks and the per-call coefficients of optim.h.
#pragma once

#include <torch/library.h>

#include "regops/aten.h"
#include <c10/util/Optional.h>

#include <cmath>
#include <string>
#include <vector>

#include "regops/optim.h"

namespace regops {

// Every list is empty or has one tensor per parameter, on the parameter's
// device, of its dtype, shape and strides, dense, so that a kernel can treat
// each tensor as numel() consecutive elements at data_ptr().
inline void check_tensor_list(const char* op, const char* name, at::TensorList list, at::TensorList params,
                              bool may_be_empty) {
  if (may_be_empty && list.empty()) return;
  TORCH_CHECK(list.size() == params.size(), "regops ", op, ": ", name, " must have one tensor per parameter (",
              params.size(), "), got ", list.size());
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    const at::Tensor& p = params[i];
    TORCH_CHECK(t.defined(), "regops ", op, ": ", name, "[", i, "] is undefined");
    TORCH_CHECK(t.device() == params[0].device(), "regops ", op, ": ", name, "[", i, "] is on ", t.device(),
                " but params[0] is on ", params[0].device());
    TORCH_CHECK(t.scalar_type() == params[0].scalar_type(), "regops ", op, ": ", name, "[", i, "] has dtype ",
                t.scalar_type(), " but params[0] has ", params[0].scalar_type(), " (one call per dtype)");
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), "regops ", op, ": ", name, "[", i,
                "] must be floating point, got ", t.scalar_type());
    TORCH_CHECK(t.layout() == at::kStrided, "regops ", op, ": ", name, "[", i, "] must be a dense tensor, got layout ",
                t.layout(), " (sparse gradients are not supported)");
    TORCH_CHECK(t.sizes() == p.sizes(), "regops ", op, ": ", name, "[", i, "] has shape ", t.sizes(),
                " but params[", i, "] has ", p.sizes());
    TORCH_CHECK(t.numel() <= 1 || (t.is_non_overlapping_and_dense() && t.strides() == p.strides()), "regops ",
                op, ": ", name, "[", i, "] must be dense with the strides of params[", i, "]");
  }
}

// The kernels of a backend run on tensors of one device type; on_device
// says whether a tensor is there (the CPU kernels: is_cpu; the CUDA ones:
// cuda::on_device, which is the CPU under the simulation).
template <typename OnDevice>
inline void check_kernel_device(const char* op, const char* kernel, at::TensorList params, OnDevice on_device) {
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(on_device(params[i]), "regops ", op, ": the ", kernel, " kernel got params[", i, "] on ",
                params[i].device());
  }
}

inline void check_params(const char* op, at::TensorList params) {
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].defined() && params[i].layout() == at::kStrided, "regops ", op, ": params[", i,
                "] must be a dense tensor");
    TORCH_CHECK(params[i].numel() <= 1 || params[i].is_non_overlapping_and_dense(), "regops ", op, ": params[", i,
                "] must be non-overlapping and dense");
  }
  check_tensor_list(op, "params", params, params, true);
}

inline void check_scalar_tensor(const char* op, const char* name, const c10::optional<at::Tensor>& t,
                                const at::Device& device) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->numel() == 1, "regops ", op, ": ", name, " must have one element, got ", t->numel());
  TORCH_CHECK(t->scalar_type() == at::kFloat, "regops ", op, ": ", name, " must be float32, got ",
              t->scalar_type());
  TORCH_CHECK(t->device() == device, "regops ", op, ": ", name, " is on ", t->device(), " but the parameters are on ",
              device);
}

inline void check_amp_and_clip(const char* op, const c10::optional<at::Tensor>& grad_scale,
                               const c10::optional<at::Tensor>& found_inf, const c10::optional<at::Tensor>& clip_coef,
                               const at::Device& device) {
  check_scalar_tensor(op, "grad_scale", grad_scale, device);
  check_scalar_tensor(op, "found_inf", found_inf, device);
  check_scalar_tensor(op, "clip_coef", clip_coef, device);
}

inline void check_state_steps(const char* op, at::TensorList steps, at::TensorList params) {
  TORCH_CHECK(steps.size() == params.size(), "regops ", op, ": state_steps must have one tensor per parameter (",
              params.size(), "), got ", steps.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    TORCH_CHECK(steps[i].numel() == 1 && steps[i].scalar_type() == at::kFloat, "regops ", op, ": state_steps[", i,
                "] must be a one-element float32 tensor, got ", steps[i].scalar_type(), " with ", steps[i].numel(),
                " elements");
    TORCH_CHECK(steps[i].device() == params[0].device(), "regops ", op, ": state_steps[", i, "] is on ",
                steps[i].device(), " but the parameters are on ", params[0].device());
  }
}

// The stochastic rounding argument: int64 [seed, group, step, then each
// tensor's index in its param group], contiguous, on the parameters' device.
// The random rule numbers blocks of 8 elements with 32 bits, so a tensor
// holds fewer than 2^35 elements.
inline void check_rounding(const char* op, const c10::optional<at::Tensor>& rounding, at::TensorList params) {
  if (!rounding.has_value()) return;
  const at::Tensor& r = *rounding;
  TORCH_CHECK(r.scalar_type() == at::kLong && r.dim() == 1 && r.is_contiguous(), "regops ", op,
              ": rounding must be a contiguous 1-D int64 tensor, got ", r.scalar_type(), " of shape ", r.sizes());
  TORCH_CHECK(r.numel() == static_cast<int64_t>(params.size()) + 3, "regops ", op,
              ": rounding must hold [seed, group, step] and one tensor index per parameter (",
              params.size() + 3, " elements), got ", r.numel());
  if (params.empty()) return;
  TORCH_CHECK(r.device() == params[0].device(), "regops ", op, ": rounding is on ", r.device(),
              " but the parameters are on ", params[0].device());
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK(params[i].numel() < (int64_t{1} << 35), "regops ", op, ": stochastic rounding supports tensors of "
                "fewer than 2^35 elements, params[", i, "] has ", params[i].numel());
  }
}

// The weight averages: empty, or one per parameter, of its shape and
// strides, float32 or the parameters' dtype (one for all), with a float32
// weight per parameter; all on the parameters' device.
inline void check_averages(const char* op, const c10::optional<at::TensorList>& optional_averages,
                           const c10::optional<at::Tensor>& weights, at::TensorList params) {
  if (!optional_averages.has_value() || optional_averages->empty()) return;
  const at::TensorList averages = *optional_averages;
  TORCH_CHECK(averages.size() == params.size(), "regops ", op, ": averages must have one tensor per parameter (",
              params.size(), "), got ", averages.size());
  TORCH_CHECK(weights.has_value() && weights->scalar_type() == at::kFloat && weights->dim() == 1 &&
                  weights->numel() == static_cast<int64_t>(params.size()) && weights->is_contiguous(),
              "regops ", op, ": average_weights must be a contiguous float32 tensor of one weight per parameter");
  for (size_t i = 0; i < averages.size(); ++i) {
    const at::Tensor& a = averages[i];
    const at::Tensor& p = params[i];
    TORCH_CHECK((a.scalar_type() == p.scalar_type() || a.scalar_type() == at::kFloat) &&
                    a.scalar_type() == averages[0].scalar_type(),
                "regops ", op, ": averages[", i, "] has dtype ", a.scalar_type(),
                " but must be float32 or the parameters' dtype, one for all");
    TORCH_CHECK(a.device() == p.device() && weights->device() == p.device(), "regops ", op, ": averages[", i,
                "] and average_weights must be on the parameters' device ", p.device());
    TORCH_CHECK(a.sizes() == p.sizes(), "regops ", op, ": averages[", i, "] has shape ", a.sizes(), " but params[",
                i, "] has ", p.sizes());
    TORCH_CHECK(a.numel() <= 1 || a.strides() == p.strides(), "regops ", op, ": averages[", i,
                "] must be dense with the strides of params[", i, "]");
  }
}

inline void check_hyperparameters(const char* op, double lr, double weight_decay, double l2, double l1) {
  TORCH_CHECK(lr >= 0.0, "regops ", op, ": lr must be >= 0, got ", lr);
  TORCH_CHECK(weight_decay >= 0.0, "regops ", op, ": weight_decay must be >= 0, got ", weight_decay);
  TORCH_CHECK(l2 >= 0.0, "regops ", op, ": l2 must be >= 0, got ", l2);
  TORCH_CHECK(l1 >= 0.0, "regops ", op, ": l1 must be >= 0, got ", l1);
}

// The checks every backend runs at the entry of sgd_step_ and adamw_step_,
// before its own device check; lr is a float or, with the tensor_lr
// overloads, 0 (the tensor is checked by the backend).
inline void check_sgd_arguments(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                                double lr, double momentum, double weight_decay, double l1) {
  constexpr const char* op = "sgd_step_";
  check_params(op, params);
  check_tensor_list(op, "grads", grads, params, false);
  check_tensor_list(op, "momentum_buffers", momentum_buffers, params, momentum == 0.0);
  TORCH_CHECK(momentum == 0.0 || !momentum_buffers.empty(), "regops sgd_step_: momentum ", momentum,
              " needs momentum_buffers");
  check_hyperparameters(op, lr, weight_decay, 0.0, l1);
}

inline void check_adamw_arguments(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                  at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                                  at::TensorList state_steps, double lr, double beta1, double beta2, double eps,
                                  double weight_decay, double l2, double l1, bool amsgrad) {
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
}

// What both step ops take after their own arguments: AMP's gradient scale
// and skip flag, the clipping coefficient, the stochastic rounding key and
// the weight averages.
struct StepExtras {
  const c10::optional<at::Tensor>& grad_scale;
  const c10::optional<at::Tensor>& found_inf;
  const c10::optional<at::Tensor>& clip_coef;
  const c10::optional<at::Tensor>& rounding;
  const c10::optional<at::TensorList>& averages;
  const c10::optional<at::Tensor>& average_weights;
};

// The checks of sgd_step_ and adamw_step_ that follow the op's own
// (check_sgd_arguments, check_adamw_arguments) on every backend: rounding
// and averages and, with parameters, the kernel's device (on_device, as in
// check_kernel_device), the AMP and clipping scalars and a tensor lr (null
// where the kernel takes lr as a float).
template <typename OnDevice>
inline void check_step_call(const char* op, const char* kernel, OnDevice on_device, at::TensorList params,
                            const at::Tensor* lr_tensor, const StepExtras& extras) {
  check_rounding(op, extras.rounding, params);
  check_averages(op, extras.averages, extras.average_weights, params);
  if (params.empty()) return;
  check_kernel_device(op, kernel, params, on_device);
  check_amp_and_clip(op, extras.grad_scale, extras.found_inf, extras.clip_coef, params[0].device());
  if (lr_tensor != nullptr) check_scalar_tensor(op, "lr", *lr_tensor, params[0].device());
}

// The arguments of sgd_step_ and adamw_step_ (either overload) as a
// backend's kernels take them: lr is the float lr, or 0 with lr_tensor where
// the kernels read a tensor lr on the device.
struct SGDStepArguments {
  at::TensorList params, grads, momentum_buffers;
  double lr;
  const at::Tensor* lr_tensor;
  double momentum, dampening, weight_decay;
  bool nesterov, maximize;
  double l1;
  bool proximal, first_step;
  StepExtras extras;
};

struct AdamWStepArguments {
  at::TensorList params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps;
  double lr;
  const at::Tensor* lr_tensor;
  double beta1, beta2, eps, weight_decay, l2, l1;
  bool proximal, amsgrad, maximize;
  StepExtras extras;
};

// The registered functions of sgd_step_ and adamw_step_, written once for
// every backend; Lr is double, or const at::Tensor& for the tensor_lr
// overloads. Each checks its arguments and calls Backend::sgd_step or
// Backend::adamw_step with them when there are parameters. Backend has
// kKernel (its name in errors), on_device (where its kernels run), and
// host_lr and device_lr: a tensor lr as the float the kernels take (checked,
// read on the host) or as the tensor they read (null).
template <typename Backend>
struct OptimizerEntries {
  template <typename Lr>
  static void sgd_step(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, Lr lr,
                       double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                       double l1, bool proximal, bool first_step, const c10::optional<at::Tensor>& grad_scale,
                       const c10::optional<at::Tensor>& found_inf, const c10::optional<at::Tensor>& clip_coef,
                       const c10::optional<at::Tensor>& rounding, const c10::optional<at::TensorList>& averages,
                       const c10::optional<at::Tensor>& average_weights) {
    constexpr const char* op = "sgd_step_";
    const SGDStepArguments a{params, grads, momentum_buffers, host_lr(op, lr), device_lr(lr), momentum, dampening,
                             weight_decay, nesterov, maximize, l1, proximal, first_step,
                             StepExtras{grad_scale, found_inf, clip_coef, rounding, averages, average_weights}};
    check_sgd_arguments(a.params, a.grads, a.momentum_buffers, a.lr, a.momentum, a.weight_decay, a.l1);
    check_step_call(op, Backend::kKernel, Backend::on_device, a.params, a.lr_tensor, a.extras);
    if (!a.params.empty()) Backend::sgd_step(a);
  }

  template <typename Lr>
  static void adamw_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                         at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList state_steps,
                         Lr lr, double beta1, double beta2, double eps, double weight_decay, double l2, double l1,
                         bool proximal, bool amsgrad, bool maximize, const c10::optional<at::Tensor>& grad_scale,
                         const c10::optional<at::Tensor>& found_inf, const c10::optional<at::Tensor>& clip_coef,
                         const c10::optional<at::Tensor>& rounding, const c10::optional<at::TensorList>& averages,
                         const c10::optional<at::Tensor>& average_weights) {
    constexpr const char* op = "adamw_step_";
    const AdamWStepArguments a{params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, host_lr(op, lr),
                               device_lr(lr), beta1, beta2, eps, weight_decay, l2, l1, proximal, amsgrad, maximize,
                               StepExtras{grad_scale, found_inf, clip_coef, rounding, averages, average_weights}};
    check_adamw_arguments(a.params, a.grads, a.exp_avgs, a.exp_avg_sqs, a.max_exp_avg_sqs, a.state_steps, a.lr,
                          a.beta1, a.beta2, a.eps, a.weight_decay, a.l2, a.l1, a.amsgrad);
    check_step_call(op, Backend::kKernel, Backend::on_device, a.params, a.lr_tensor, a.extras);
    if (!a.params.empty()) Backend::adamw_step(a);
  }

 private:
  static double host_lr(const char*, double lr) { return lr; }
  static double host_lr(const char* op, const at::Tensor& lr) { return Backend::host_lr(op, lr); }
  static const at::Tensor* device_lr(double) { return nullptr; }
  static const at::Tensor* device_lr(const at::Tensor& lr) { return Backend::device_lr(lr); }
};

// The step ops' registrations with Backend's kernels, for the backend's
// TORCH_LIBRARY_IMPL block.
template <typename Backend>
void register_step_ops(torch::Library& m) {
  using Entries = OptimizerEntries<Backend>;
  m.impl("sgd_step_", &Entries::template sgd_step<double>);
  m.impl("sgd_step_.tensor_lr", &Entries::template sgd_step<const at::Tensor&>);
  m.impl("adamw_step_", &Entries::template adamw_step<double>);
  m.impl("adamw_step_.tensor_lr", &Entries::template adamw_step<const at::Tensor&>);
}

// multi_tensor_norm's inputs: one device and dtype, strided. Returns them
// ready for a kernel that reads each as numel() consecutive elements: a
// non-dense view (rare for gradients) is replaced by a contiguous copy.
inline std::vector<at::Tensor> dense_norm_inputs(at::TensorList tensors) {
  TORCH_CHECK(!tensors.empty(), "regops multi_tensor_norm: tensors must not be empty");
  std::vector<at::Tensor> dense;
  dense.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device() == tensors[0].device(), "regops multi_tensor_norm: tensors[", i, "] is on ", t.device(),
                " but tensors[0] is on ", tensors[0].device());
    TORCH_CHECK(t.scalar_type() == tensors[0].scalar_type(),
                "regops multi_tensor_norm: all tensors must have one dtype (one call per dtype), got ",
                tensors[0].scalar_type(), " and ", t.scalar_type(), " at ", i);
    TORCH_CHECK(t.layout() == at::kStrided, "regops multi_tensor_norm: tensors[", i, "] must be dense");
    dense.push_back(t.numel() <= 1 || t.is_non_overlapping_and_dense() ? t : t.contiguous());
  }
  return dense;
}

template <typename Real = float>
inline SGDCoefficientsT<Real> make_sgd_coefficients(double lr, double momentum, double dampening,
                                                    double weight_decay, bool nesterov, bool maximize, double l1,
                                                    bool proximal, bool first_step) {
  SGDCoefficientsT<Real> c;
  c.gradient = gradient_transform<Real>(weight_decay, l1, proximal, maximize, 1.0f);
  c.lr = static_cast<Real>(lr);
  c.momentum = static_cast<Real>(momentum);
  c.has_momentum = momentum != 0.0;
  c.one_minus_dampening = static_cast<Real>(1.0 - dampening);
  c.l1_threshold = proximal ? static_cast<Real>(lr * l1) : Real(0);
  c.nesterov = nesterov;
  c.first_step = first_step;
  return c;
}

// Calls fn(scalar_t{}) for the parameter dtypes the optimizers support. The
// CUDA kernels' math is float32, so float64 parameters, which would silently
// lose precision there, are for the CPU kernels only (kWithDouble), whose
// float64 math is float64.
template <bool kWithDouble = false, typename Fn>
void dispatch_optimizer_dtype(const char* op, at::ScalarType dtype, Fn fn) {
  switch (dtype) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(at::Half{}); break;
    case at::kBFloat16: fn(at::BFloat16{}); break;
    case at::kDouble:
      if constexpr (kWithDouble) {
        fn(double{});
        break;
      }
      [[fallthrough]];
    default:
      TORCH_CHECK(false, "regops ", op, ": parameters must be float32, ", kWithDouble ? "float64, " : "",
                  "float16 or bfloat16, got ", dtype);
  }
}

}  // namespace regops
