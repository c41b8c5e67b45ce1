"""Batch normalisation with flax.linen.BatchNorm's parameters and statistics, and a hand-written backward.

The layer also takes the ReLU and the residual add that follow it in a ResNeXt block, act(BN(x) + shortcut),
so that one pass over memory does all three. Two implementations:

- 'auto' on CPU (NHWC float32), where they measure faster for the layer (cpu/autotune.py): our kernels
  (resnext_jax/cpu/batch_norm.py): one pass for the statistics, one to apply; in
  the backward one for the two sums and one for the input gradient. In XLA each sum is its own reduction and
  the elementwise chains are recomputed inside every consumer; batch norm then cost more than the 1x1
  convolutions' gradients in a train step (docs/performance.md).
- XLA ('xla', and 'auto' elsewhere): the closed-form backward, which needs two per-channel sums, sum(dy) and
  sum(dy * x_hat), and one elementwise pass, where autodiff of flax's BatchNorm takes several passes.

Same variables as nn.BatchNorm ('scale', 'bias'; batch_stats 'mean', 'var'), so checkpoints are
interchangeable; arithmetic in float32 at least, whatever the compute dtype.
"""

import contextlib
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnext_jax import cpu

IMPLS = ("auto", "xla")


class BatchNorm(nn.Module):
  """nn.BatchNorm over all but the last axis (NHWC), biased batch variance, flax's momentum convention;
  optionally followed by a residual add and a ReLU."""
  use_running_average: bool = False
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  scale_init: Any = nn.initializers.ones
  bias_init: Any = nn.initializers.zeros
  impl: str = "auto"

  @nn.compact
  def __call__(self, x, shortcut=None, relu=False):
    """act(BN(x) [+ shortcut]), act = ReLU if `relu` else the identity."""
    if self.impl not in IMPLS:
      raise ValueError(f"unknown batch norm impl {self.impl!r}; choose one of {IMPLS}")
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
    scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
    bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
    dtype = self.dtype or jnp.result_type(x, scale)
    fast = self._kernels(x, scale, bias, shortcut, relu) if self.impl == "auto" else None
    if self.use_running_average:
      f = _compute_dtype(x)
      inv = jax.lax.rsqrt(ra_var.value.astype(f) + self.epsilon) * scale.astype(f)
      shift = bias.astype(f) - ra_mean.value.astype(f) * inv
      if fast is not None:
        return fast.apply_running(x, inv, shift, shortcut, relu).astype(dtype)
      return _activate((x.astype(f) * inv + shift).astype(dtype), shortcut, relu)
    if fast is not None:
      y, mean, var = fast.normalize(x, scale, bias, shortcut, self.epsilon, relu)
      y = y.astype(dtype)
    else:
      y, mean, var = _normalize(x, scale, bias, self.epsilon)
      y = _activate(y.astype(dtype), shortcut, relu)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y

  def _kernels(self, x, scale, bias, shortcut, relu):
    """Our CPU kernels (cpu/batch_norm.py) where they apply and measure faster than XLA for this layer."""
    fast = cpu.batch_norm_ops(x, scale, bias, shortcut)
    train, eps = not self.use_running_average, self.epsilon
    op = f"batch_norm {'train' if train else 'eval'} relu={relu}"
    args = (x, scale, bias) + (() if shortcut is None else (shortcut,))
    if fast is None:
      cpu.autotune.choose(op, {"xla": None}, args, "xla")  # recorded for --explain
      return None
    if train:
      kernel = lambda x, s, b, *sc: fast.normalize(x, s, b, sc[0] if sc else None, eps, relu)[0]
      xla = lambda x, s, b, *sc: _activate(_normalize(x, s, b, eps)[0], sc[0] if sc else None, relu)
    else:
      kernel = lambda x, s, b, *sc: fast.apply_running(x, s, b, sc[0] if sc else None, relu)
      xla = lambda x, s, b, *sc: _activate(x * s + b, sc[0] if sc else None, relu)
    with contextlib.nullcontext() if not self.is_initializing() else cpu.autotune.using_table():
      choice = cpu.autotune.choose(op, {"kernel": kernel, "xla": xla}, args, "kernel", batched=(0, 3),
                                   backward=train)
    return fast if choice == "kernel" else None


def _activate(y, shortcut, relu):
  y = y if shortcut is None else y + shortcut
  return jax.nn.relu(y) if relu else y


def _compute_dtype(x):
  """float32, or float64 for float64 inputs: flax's promotion for BatchNorm's arithmetic."""
  return jnp.promote_types(x.dtype, jnp.float32)


def _stats(x):
  """Per-channel mean and biased variance, at least float32 (E[x^2] - E[x]^2, as flax's fast variance)."""
  x = x.astype(_compute_dtype(x))
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axes)
  var = jnp.maximum(jnp.mean(x * x, axes) - mean * mean, 0.0)
  return mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _normalize(x, scale, bias, epsilon):
  """(normalised x, batch mean, batch variance); the statistics carry no gradient (running averages)."""
  return _normalize_fwd(x, scale, bias, epsilon)[0]


def _normalize_fwd(x, scale, bias, epsilon):
  mean, var = _stats(x)
  inv = jax.lax.rsqrt(var + epsilon)
  f = _compute_dtype(x)
  y = (x.astype(f) - mean) * (inv * scale.astype(f)) + bias.astype(f)
  return (y.astype(x.dtype), mean, var), (x, scale, bias, mean, inv)


def _normalize_bwd(epsilon, residuals, cotangents):
  del epsilon
  x, scale, bias, mean, inv = residuals
  f = _compute_dtype(x)
  dy = cotangents[0].astype(f)  # cotangents of the statistics are ignored: they feed running averages only
  axes = tuple(range(x.ndim - 1))
  n = x.size // x.shape[-1]
  x_hat = (x.astype(f) - mean) * inv
  dbias = jnp.sum(dy, axes)
  dscale = jnp.sum(dy * x_hat, axes)
  k = scale.astype(f) * inv / n
  dx = k * (n * dy - dbias - x_hat * dscale)
  return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


_normalize.defvjp(_normalize_fwd, _normalize_bwd)
