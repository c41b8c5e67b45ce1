"""The stem's max pool as CPU kernels (csrc/max_pool.cc): one pass forward, one backward that routes each
window's gradient to its first maximum (PyTorch's rule), as layers/pooling.py's portable formulation does.

XLA's reduce-window and the elementwise backward took ~70 ms of a ResNeXt-50 train step; these ~10 ms.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from resnext_jax.cpu import build, partition


def applies(x, window, strides, padding):
  """NHWC float32 on the CPU with every window overlapping the input (padding < window)."""
  return (x.ndim == 4 and x.dtype == jnp.float32 and jax.default_backend() == "cpu"
          and all(p < k for (p, _), k in zip(padding, window)))


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
      return jax.ffi.ffi_call(build.target("MaxPoolForward"), out, vmap_method="sequential")(x, **attrs)
    return partition.batch_partitioned(call, "n h w c -> n oh ow c", 1)

  def call_backward(x, y, g):
    out = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    return jax.ffi.ffi_call(build.target("MaxPoolBackward"), out, vmap_method="sequential")(
        x, y, g, **attrs)
  return partition.batch_partitioned(call_backward, "n h w c, n oh ow c, n oh ow c -> n h w c", 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x, window, strides, padding):
  out_rest = _output_shape(x.shape, window, strides, padding)[1:]
  return _kernel_op("forward", out_rest, window, strides, padding)(x)


def _max_pool_kernel_fwd(x, window, strides, padding):
  y = max_pool(x, window, strides, padding)
  return y, (x, y)


def _max_pool_kernel_bwd(window, strides, padding, residuals, g):
  x, y = residuals
  return (_kernel_op("backward", y.shape[1:], window, strides, padding)(x, y, g),)


max_pool.defvjp(_max_pool_kernel_fwd, _max_pool_kernel_bwd)
