"""1x1 convolutions on our CPU GEMM kernel (csrc/matmul.cc) as a differentiable JAX op.

Forward and input gradient are one op (y = x w, dx = dy w^T); the kernel gradient (x^T dy) is the other,
summed over the batch. Built with our other CPU kernels (build.py); conv.py uses it for 1x1 convs on
CPU where `supported`, and XLA's dot ('matmul') elsewhere.
"""

import functools

import jax
import jax.numpy as jnp

from resnext_jax.cpu import build, partition

_LANES = 16


def supported(x_shape, kernel_shape, groups, padding, dtype=jnp.float32):
  """Whether the kernel computes this conv: 1x1, dense, unpadded, NHWC, in and out channels multiples of 16
  (the vector width of both products), and a dtype that float32 arithmetic serves."""
  kh, kw, cin, cout = kernel_shape
  return (len(x_shape) == 4 and (kh, kw) == (1, 1) and groups == 1 and x_shape[-1] == cin
          and cin % _LANES == 0 and cout % _LANES == 0 and all(p == 0 for pair in padding for p in pair)
          and jnp.dtype(dtype).itemsize <= 4 and jnp.issubdtype(dtype, jnp.floating))


def pointwise_conv(x, kernel, strides):
  """NHWC x (1, 1, I, O) convolution with `strides`, computed in float32 on the GEMM kernel."""
  if jax.default_backend() != "cpu":
    raise ValueError(f"conv impl 'kernel' is a CPU kernel; on {jax.default_backend()} use 'auto' or 'xla'")
  if not supported(x.shape, kernel.shape, 1, ((0, 0), (0, 0)), jnp.result_type(x, kernel)):
    raise ValueError(f"the 1x1-conv kernel does not support input {x.shape} with kernel {kernel.shape}")
  build.load()
  dtype = jnp.result_type(x, kernel)
  if tuple(strides) != (1, 1):
    x = x[:, ::strides[0], ::strides[1]]  # a 1x1 conv with stride s reads every s-th pixel
  y = _matmul(x.astype(jnp.float32), kernel[0, 0].astype(jnp.float32))
  return y.astype(dtype)


# Both ops are per pixel, so a batch sharded over devices stays sharded; the kernel gradient is a sum over
# the batch, psum'd over its mesh axes (partition.batch_partitioned).
@functools.cache
def _forward_op():
  def call(x, w):
    out = jax.ShapeDtypeStruct((*x.shape[:-1], w.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(build.target("MatMulForward"), out, vmap_method="sequential")(x, w)
  return partition.batch_partitioned(call, "n h w k, k c -> n h w c", 1)


@functools.cache
def _kernel_grad_op():
  def call(x, dy):
    out = jax.ShapeDtypeStruct((x.shape[-1], dy.shape[-1]), jnp.float32)
    return jax.ffi.ffi_call(build.target("MatMulKernelGrad"), out, vmap_method="sequential")(x, dy)
  return partition.batch_partitioned(call, "n h w k, n h w c -> k c", 2, reduce_batch=True)


@jax.custom_vjp
def _matmul(x, w):
  return _forward_op()(x, w)


def _matmul_fwd(x, w):
  return _matmul(x, w), (x, w)


def _matmul_bwd(residuals, dy):
  x, w = residuals
  return _forward_op()(dy, w.T), _kernel_grad_op()(x, dy)


_matmul.defvjp(_matmul_fwd, _matmul_bwd)
