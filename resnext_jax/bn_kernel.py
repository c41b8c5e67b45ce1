"""Batch norm's CPU kernels (csrc/batch_norm.cc) as JAX ops on NHWC float32 activations.

Four one-pass ops: the per-channel sums of the forward (`stats`), normalise with optional residual add and
ReLU (`apply`), and the backward's sums (`grad_stats`) and input gradient (`grad_apply`). batchnorm.py builds
the differentiable layer from them. Each is batch-partitioned: per-image ops stay sharded over a sharded
batch; the sums are psum'd over it.
"""

import functools

import jax
import jax.numpy as jnp

from resnext_jax import cpu_kernels


def applies(x):
  """Whether these kernels serve activation `x`: NHWC float32 on the CPU, where the kernels build."""
  return (x.ndim == 4 and x.dtype == jnp.float32 and jax.default_backend() == "cpu"
          and cpu_kernels.available())


def _ffi(symbol, results, operands, **attrs):
  return jax.ffi.ffi_call(cpu_kernels.TARGETS[symbol], results, vmap_method="sequential")(*operands, **attrs)


def _channels(x, n=2):
  out = jax.ShapeDtypeStruct((x.shape[-1],), jnp.float32)
  return (out,) * n


@functools.cache
def _op(name, **attrs):
  """The partitioned op `name` with its attributes fixed."""
  def stats(x):
    return _ffi("BatchNormStats", _channels(x), (x,))

  def apply(x, shortcut, scale, shift):
    return _ffi("BatchNormApply", jax.ShapeDtypeStruct(x.shape, jnp.float32), (x, shortcut, scale, shift),
                **attrs)

  def grad_stats(g, y, x, mean):
    return _ffi("BatchNormGradStats", _channels(x), (g, y, x, mean), **attrs)

  def grad_apply(g, y, x, mean, a, b, k):
    full = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    return _ffi("BatchNormGradApply", (full, full), (g, y, x, mean, a, b, k), **attrs)

  fn, rule, batched, reduce = {
      "stats": (stats, "n h w c -> c, c", 1, True),
      "apply": (apply, "n h w c, n h w c, c, c -> n h w c", 2, False),
      "grad_stats": (grad_stats, "n h w c, n h w c, n h w c, c -> c, c", 3, True),
      "grad_apply": (grad_apply, "n h w c, n h w c, n h w c, c, c, c, c -> n h w c, n h w c", 3, False),
  }[name]
  return cpu_kernels.batch_partitioned(fn, rule, batched, reduce_batch=reduce)


def stats(x):
  """(sum of x, sum of x^2) per channel over N, H, W."""
  return _op("stats")(x)


def apply(x, scale, shift, shortcut=None, relu=False):
  """act(x * scale + shift [+ shortcut]) with per-channel scale and shift; act is ReLU or the identity."""
  add = shortcut is not None
  return _op("apply", relu=relu, add_shortcut=add)(x, shortcut if add else x, scale, shift)


def grad_stats(g, y, x, mean, relu):
  """(sum gm, sum gm * (x - mean)) per channel; gm is g where the ReLU's output y passed, or g without one."""
  return _op("grad_stats", relu=relu)(g, y if relu else g, x, mean)


def grad_apply(g, y, x, mean, a, b, k, relu, masked_grad):
  """(a * gm + b + k * (x - mean), gm if `masked_grad` else None), gm as in `grad_stats`."""
  dx, gm = _op("grad_apply", relu=relu, write_masked=masked_grad)(g, y if relu else g, x, mean, a, b, k)
  return dx, gm if masked_grad else None
