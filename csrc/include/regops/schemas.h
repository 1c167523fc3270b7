// regops' operator schemas, written once: the regops library (csrc/regops.cpp)
// and the CUDA simulation's regops_cuda_sim library (csrc/simt/library.cpp)
// both define them with this function, so the simulated ops take exactly the
// arguments of the real ones.
#pragma once

#include <torch/library.h>

namespace regops {

inline void define_schemas(torch::Library& m) {
  // Dropout. seed is a one-element int64 tensor on the input's device (or the
  // CPU) so that a seed drawn from the device generator needs no host sync;
  // mask is one bit per element (see csrc/include/regops/dropout.h).
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
  // rounding (stochastic rounding of 16-bit values, csrc/include/regops/
  // stochastic_rounding.h) is an int64 tensor on the parameters' device:
  // [seed, group, step, then each tensor's index in its param group]; absent,
  // values are rounded to nearest even. averages (float32 or the parameters'
  // dtype, one per parameter) become lerp(average, new parameter, weight)
  // with the float32 average_weights (one per parameter, on the device),
  // right after the parameter's update (regops/optim/averaging.py).
  m.def("sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, float lr, float momentum, "
        "float dampening, float weight_decay, bool nesterov, bool maximize, float l1, bool proximal, bool first_step, "
        "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? clip_coef=None, Tensor? rounding=None, Tensor(f!)[]? averages=None, "
        "Tensor? average_weights=None) -> ()");
  m.def("sgd_step_.tensor_lr(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor lr, "
        "float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, float l1, bool proximal, "
        "bool first_step, Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? clip_coef=None, Tensor? rounding=None, Tensor(f!)[]? averages=None, "
        "Tensor? average_weights=None) -> ()");
  m.def("adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, float lr, float beta1, float beta2, float eps, "
        "float weight_decay, float l2, float l1, bool proximal, bool amsgrad, bool maximize, "
        "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? clip_coef=None, Tensor? rounding=None, Tensor(f!)[]? averages=None, "
        "Tensor? average_weights=None) -> ()");
  m.def("adamw_step_.tensor_lr(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, Tensor lr, float beta1, float beta2, float eps, "
        "float weight_decay, float l2, float l1, bool proximal, bool amsgrad, bool maximize, "
        "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? clip_coef=None, Tensor? rounding=None, Tensor(f!)[]? averages=None, "
        "Tensor? average_weights=None) -> ()");
  // The L2 norm (or, squared=True, its square) of all tensors together as a
  // float32 scalar on their device, accumulated in float32 in one pass.
  m.def("multi_tensor_norm(Tensor[] tensors, bool squared=False) -> Tensor");
  // Batch normalization (csrc/include/regops/batch_norm.h has the formulas).
  // input is (N, C, ...), contiguous or channels_last / channels_last_3d;
  // mean, invstd, weight, bias, running statistics and the per-channel sums
  // are (C,) float32 (float64 for float64 inputs); relu fuses a ReLU after the
  // affine transform, its backward mask recomputed from the forward value.
  // The fused pair: training normalizes with the batch statistics and also
  // returns the biased batch variance (the caller moves its running buffers
  // towards save_mean and it, so momentum may be a traced tensor under
  // torch.compile); eval normalizes with running_mean and running_var and
  // returns batch_var empty. The backward is one reduction pass and one
  // elementwise pass. residual (the input's shape and dtype, any layout) is
  // added before the ReLU: output = act(bn(input) + residual), the ResNet
  // bottleneck's tail; the backward recomputes the mask from input and
  // residual and returns grad_residual (the masked grad_out; empty without a
  // residual), written by its reduction pass.
  m.def("batch_norm_forward(Tensor input, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
        "bool training, float eps, bool relu, Tensor? residual=None) -> (Tensor output, Tensor save_mean, "
        "Tensor save_invstd, Tensor batch_var)");
  m.def("batch_norm_backward(Tensor grad_out, Tensor input, Tensor? weight, Tensor? bias, Tensor save_mean, "
        "Tensor save_invstd, bool training, bool relu, Tensor? residual=None) -> (Tensor grad_input, "
        "Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)");
  // The pieces of a synchronized batch norm, which sums per-rank statistics
  // and gradient sums across ranks between them: mean and biased variance;
  // the normalization; the per-channel gradient sums; and grad_input, where
  // count is the element count per channel over all ranks.
  m.def("batch_norm_stats(Tensor input) -> (Tensor mean, Tensor var)");
  m.def("batch_norm_elementwise(Tensor input, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, "
        "bool relu) -> Tensor");
  m.def("batch_norm_backward_reduce(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, Tensor? weight, "
        "Tensor? bias, bool relu) -> (Tensor sum_dy, Tensor sum_dy_xmu)");
  m.def("batch_norm_backward_elementwise(Tensor grad_out, Tensor input, Tensor mean, Tensor invstd, Tensor? weight, "
        "Tensor? bias, Tensor sum_dy, Tensor sum_dy_xmu, int count, bool relu) -> Tensor");
  // Layer normalization and RMSNorm over the last dimension of a (rows,
  // hidden) input, optionally after dropout and a residual add
  // (csrc/include/regops/layer_norm.h has the formulas): h = dropout(input) +
  // residual, output = norm(h) * weight + bias. Dropout runs when seed is
  // given, its mask bit i the dropout random rule's for flat element i of the
  // row-major input (the mask of dropout_forward on a contiguous input).
  // weight and bias are (hidden,) float32 (float64 for float64 inputs); mean
  // (LayerNorm only, else empty) and rstd are (rows,) in that dtype. h, kept
  // when store_h (else empty), is float32 when residual_in_fp32 (float64
  // for float64), else residual's dtype (input's without a residual); a
  // residual is of the input's dtype or float32. The backward reads h (the
  // input itself when nothing was added or dropped), the saved mask or
  // regenerates it from seed, adds grad_h (the gradient of a returned h) and
  // returns grad_input (input's dtype), grad_residual (h's dtype, empty
  // unless has_residual), and grad_weight and grad_bias summed over rows in
  // a fixed order (empty without weight, or unless has_bias).
  m.def("layer_norm_forward(Tensor input, Tensor? residual, Tensor? weight, Tensor? bias, float p, Tensor? seed, "
        "int offset, float eps, bool rms, bool store_mask, bool store_h, bool residual_in_fp32) -> "
        "(Tensor output, Tensor h, Tensor mean, Tensor rstd, Tensor mask)");
  m.def("layer_norm_backward(Tensor grad_out, Tensor? grad_h, Tensor h, Tensor? weight, Tensor mean, Tensor rstd, "
        "Tensor? mask, Tensor? seed, float p, int offset, bool rms, bool has_residual, bool has_bias) -> "
        "(Tensor grad_input, Tensor grad_residual, Tensor grad_weight, Tensor grad_bias)");
}

}  // namespace regops
