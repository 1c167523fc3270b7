"""Public op entry points: argument checks, backend choice, fake kernels and
autograd for the registered operators (one module per op family)."""
