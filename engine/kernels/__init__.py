"""Triton kernels, one op per module: a private `@triton.jit` kernel and a typed launcher.

Each launcher checks its inputs and never synchronises with the host. The torch layers in
`engine/layers/` are the reference every kernel is tested against (on CPU under
`TRITON_INTERPRET=1`, on a GPU at real sizes). Importing this package does not import triton.
`gguf_cpu` is the exception: C++ CPU kernels for GGUF quantized weights, compiled on first use.
"""
