// csrc/cuda/layer_norm.cu compiled by the host compiler against the SIMT layer
// (REGOPS_CUDA_SIM): the kernels run on CPU tensors as regops_cuda_sim ops.
#include "../cuda/layer_norm.cu"
