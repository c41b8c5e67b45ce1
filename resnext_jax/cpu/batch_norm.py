"""Batch norm's CPU kernels (csrc/batch_norm.cc) as JAX ops on NHWC float32 activations.

Four one-pass ops: the per-channel sums of the forward (`stats`), normalise with optional residual add and
ReLU (`apply`), and the backward's sums (`grad_stats`) and input gradient (`grad_apply`). `normalize` and
`apply_running` are the differentiable layer on them, which layers/batchnorm.py calls. Each op is
batch-partitioned: per-image ops stay sharded over a sharded batch; the sums are psum'd over it.
"""

import functools

import jax
import jax.numpy as jnp

from resnext_jax.cpu import build, partition


def _ffi(symbol, results, operands, **attrs):
  return jax.ffi.ffi_call(build.target(symbol), results, vmap_method="sequential")(*operands, **attrs)


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
  return partition.batch_partitioned(fn, rule, batched, reduce_batch=reduce)


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


# The differentiable layer on these ops (float32 NHWC on CPU). `add` (static) says whether `shortcut` is an
# array or None.


def normalize(x, scale, bias, shortcut, epsilon, relu):
  """(act(batch-normalised x [+ shortcut]), batch mean, batch variance); the statistics carry no gradient."""
  return _normalize_kernel(x, scale, bias, shortcut, epsilon, relu, shortcut is not None)


def apply_running(x, scale, shift, shortcut, relu):
  """act(x * scale + shift [+ shortcut]): inference with the running statistics, still differentiable."""
  return _apply_kernel(x, scale, shift, shortcut, relu, shortcut is not None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _normalize_kernel(x, scale, bias, shortcut, epsilon, relu, add):
  """(act(normalised x [+ shortcut]), batch mean, batch variance); the statistics carry no gradient."""
  return _normalize_kernel_fwd(x, scale, bias, shortcut, epsilon, relu, add)[0]


def _normalize_kernel_fwd(x, scale, bias, shortcut, epsilon, relu, add):
  del add
  n = x.size // x.shape[-1]
  total, total_sq = stats(x)
  mean = total / n
  var = jnp.maximum(total_sq / n - mean * mean, 0.0)
  inv = jax.lax.rsqrt(var + epsilon)
  k = scale * inv
  y = apply(x, k, bias - mean * k, shortcut, relu)
  return (y, mean, var), (x, y, scale, mean, inv)


def _normalize_kernel_bwd(epsilon, relu, add, residuals, cotangents):
  del epsilon
  x, y, scale, mean, inv = residuals
  g = cotangents[0]
  n = x.size // x.shape[-1]
  dbias, centered = grad_stats(g, y, x, mean, relu)  # centered = sum(gm * (x - mean))
  a = scale * inv
  dx, gm = grad_apply(g, y, x, mean, a, -a * dbias / n, -a * inv * inv * centered / n, relu,
                                masked_grad=add and relu)
  dshortcut = (gm if relu else g) if add else None
  return dx, centered * inv, dbias, dshortcut


_normalize_kernel.defvjp(_normalize_kernel_fwd, _normalize_kernel_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _apply_kernel(x, scale, shift, shortcut, relu, add):
  """act(x * scale + shift [+ shortcut]): inference with the running statistics, still differentiable."""
  del add
  return apply(x, scale, shift, shortcut, relu)


def _apply_kernel_fwd(x, scale, shift, shortcut, relu, add):
  y = _apply_kernel(x, scale, shift, shortcut, relu, add)
  return y, (x, y, scale)


def _apply_kernel_bwd(relu, add, residuals, g):
  x, y, scale = residuals
  gm = jnp.where(y > 0, g, 0.0) if relu else g
  axes = tuple(range(x.ndim - 1))
  return gm * scale, jnp.sum(gm * x, axes), jnp.sum(gm, axes), gm if add else None


_apply_kernel.defvjp(_apply_kernel_fwd, _apply_kernel_bwd)
