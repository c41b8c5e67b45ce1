"""Max pooling whose gradient goes to each window's first maximum in row-major order, as in PyTorch.

Autodiff of `lax.reduce_window(max)` gives a variadic reduce-window over (value, index) pairs; on CPU that was
150 ms of a 3.1 s ResNeXt-50 train step for the stem's single 3x3/2 pool (docs/performance.md). Two
implementations of the same function:

- 'auto' on CPU (NHWC float32): our kernels (csrc/max_pool.cc), one pass forward and one backward.
- XLA ('xla', and 'auto' elsewhere): reduce-window forward; the backward is elementwise work: for each tap, a
  mask (input == output, no earlier tap taken) routes the output gradient back with a strided pad, and XLA
  fuses the taps into one pass.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from resnext_jax import cpu_kernels

IMPLS = ("auto", "xla")


def max_pool(x, window, strides, padding, impl="auto"):
  """NHWC max pooling; window/strides (h, w), padding ((top, bottom), (left, right)) of -inf."""
  if impl not in IMPLS:
    raise ValueError(f"unknown max-pool impl {impl!r}; choose one of {IMPLS}")
  args = (tuple(window), tuple(strides), tuple(map(tuple, padding)))
  if impl == "auto" and _kernel_applies(x, *args):
    return _max_pool_kernel(x, *args)
  return _max_pool(x, *args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, padding):
  return lax.reduce_window(x, -jnp.inf, lax.max, (1, *window, 1), (1, *strides, 1),
                           ((0, 0), *padding, (0, 0)))


def _max_pool_fwd(x, window, strides, padding):
  y = _max_pool(x, window, strides, padding)
  return y, (x, y)


def _max_pool_bwd(window, strides, padding, residuals, dy):
  x, y = residuals
  x_pad = jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-jnp.inf)
  _, ho, wo, _ = y.shape
  (sh, sw), (hp, wp) = strides, x_pad.shape[1:3]
  taken = jnp.zeros(y.shape, bool)
  dx_pad = jnp.zeros_like(x_pad)
  for i in range(window[0]):
    for j in range(window[1]):
      tap = x_pad[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
      first = (tap == y) & ~taken
      taken = taken | first
      routed = jnp.where(first, dy, jnp.zeros_like(dy))
      # Back to input positions: tap (i, j) of output (r, c) is padded-input pixel (r*sh + i, c*sw + j).
      dx_pad = dx_pad + lax.pad(routed, jnp.zeros((), dy.dtype),
                                ((0, 0, 0), (i, hp - i - sh * (ho - 1) - 1, sh - 1),
                                 (j, wp - j - sw * (wo - 1) - 1, sw - 1), (0, 0, 0)))
  (top, _), (left, _) = padding
  return (dx_pad[:, top:top + x.shape[1], left:left + x.shape[2]],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def _kernel_applies(x, window, strides, padding):
  """NHWC float32 on the CPU with every window overlapping the input (padding < window), kernels built."""
  return (x.ndim == 4 and x.dtype == jnp.float32 and jax.default_backend() == "cpu"
          and all(p < k for (p, _), k in zip(padding, window)) and cpu_kernels.available())


def _output_shape(x_shape, window, strides, padding):
  n, h, w, c = x_shape
  (pt, pb), (pl, pr) = padding
  return (n, (h + pt + pb - window[0]) // strides[0] + 1, (w + pl + pr - window[1]) // strides[1] + 1, c)


@functools.cache
def _kernel_op(name, out_rest, window, strides, padding):
  """The FFI op `name` ('forward' or 'backward') for one pooling geometry, batch-partitioned."""
  attrs = dict(kh=np.int64(window[0]), kw=np.int64(window[1]), sh=np.int64(strides[0]),
               sw=np.int64(strides[1]), pt=np.int64(padding[0][0]), pl=np.int64(padding[1][0]))
  if name == "forward":
    def call(x):
      out = jax.ShapeDtypeStruct((x.shape[0], *out_rest), jnp.float32)
      return jax.ffi.ffi_call(cpu_kernels.TARGETS["MaxPoolForward"], out, vmap_method="sequential")(x, **attrs)
    return cpu_kernels.batch_partitioned(call, "n h w c -> n oh ow c", 1)

  def call_backward(x, y, g):
    out = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    return jax.ffi.ffi_call(cpu_kernels.TARGETS["MaxPoolBackward"], out, vmap_method="sequential")(
        x, y, g, **attrs)
  return cpu_kernels.batch_partitioned(call_backward, "n h w c, n oh ow c, n oh ow c -> n h w c", 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_kernel(x, window, strides, padding):
  out_rest = _output_shape(x.shape, window, strides, padding)[1:]
  return _kernel_op("forward", out_rest, window, strides, padding)(x)


def _max_pool_kernel_fwd(x, window, strides, padding):
  y = _max_pool_kernel(x, window, strides, padding)
  return y, (x, y)


def _max_pool_kernel_bwd(window, strides, padding, residuals, g):
  x, y = residuals
  return (_kernel_op("backward", y.shape[1:], window, strides, padding)(x, y, g),)


_max_pool_kernel.defvjp(_max_pool_kernel_fwd, _max_pool_kernel_bwd)
