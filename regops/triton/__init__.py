"""Triton kernels, registered as torch custom ops with torch.library.triton_op."""
