"""Routing-side kernels: each op has a Triton implementation and a torch fallback with the same outputs.

On CUDA tensors the Triton kernel runs; on CPU the torch fallback runs, unless ``TRITON_INTERPRET=1``
is set, in which case the Triton kernel runs in Triton's interpreter (for tests).
"""
