// The one place where regops' operator schemas are defined. Backend files
// (cpu/*.cpp, cuda/*.cu) only add implementations with TORCH_LIBRARY_IMPL;
// Python adds fake kernels and autograd (regops/ops/*.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing regops._C loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(regops, m) {
  // Dropout. seed is a one-element int64 tensor on the input's device (or the
  // CPU) so that a seed drawn from the device generator needs no host sync;
  // mask is one bit per element (see csrc/include/regops/philox.h).
  m.def("dropout_forward(Tensor input, float p, Tensor seed, int offset, bool store_mask) -> (Tensor, Tensor)");
  m.def("dropout_forward_(Tensor(a!) input, float p, Tensor seed, int offset, bool store_mask) -> Tensor");
  m.def("dropout_backward(Tensor grad, Tensor mask, float p) -> Tensor");
  // The raw generator, for known-answer tests: counter (N, 4) and key (N, 2)
  // hold uint32 words in int64; returns the (N, 4) output words.
  m.def("philox4x32_10(Tensor counter, Tensor key) -> Tensor");

  // Optimizers (regops/optim/, csrc/include/regops/optim.h): one call updates
  // every tensor of a (device, dtype) group in place. grad_scale (GradScaler's
  // scale: gradients are divided by it), found_inf (nonzero: skip the step,
  // steps are not counted) and clip_coef (multiplies the gradients) are
  // one-element float32 tensors on the parameters' device, read by the kernel
  // so that nothing waits for the host. lr comes as a float or, in the
  // .tensor_lr overloads, as a one-element tensor (changing it then needs no
  // recompilation under torch.compile). first_step: the momentum buffers are
  // new and take the gradient as is (torch's first step). adamw_step_
  // increments state_steps (float32, one element each) unless found_inf.
  m.def("sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, float lr, float momentum, "
        "float dampening, float weight_decay, bool nesterov, bool maximize, float l1, bool proximal, bool first_step, "
        "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? clip_coef=None) -> ()");
  m.def("sgd_step_.tensor_lr(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor lr, "
        "float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, float l1, bool proximal, "
        "bool first_step, Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? clip_coef=None) -> ()");
  m.def("adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, float lr, float beta1, float beta2, float eps, "
        "float weight_decay, float l2, float l1, bool proximal, bool amsgrad, bool maximize, "
        "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? clip_coef=None) -> ()");
  m.def("adamw_step_.tensor_lr(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, Tensor lr, float beta1, float beta2, float eps, "
        "float weight_decay, float l2, float l1, bool proximal, bool amsgrad, bool maximize, "
        "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? clip_coef=None) -> ()");
  // The L2 norm (or, squared=True, its square) of all tensors together as a
  // float32 scalar on their device, accumulated in float32 in one pass.
  m.def("multi_tensor_norm(Tensor[] tensors, bool squared=False) -> Tensor");
}
