"""Max pooling whose gradient goes to each window's first maximum in row-major order, as in PyTorch.

Autodiff of `lax.reduce_window(max)` gives a variadic reduce-window over (value, index) pairs; on CPU that was
150 ms of a 3.1 s ResNeXt-50 train step for the stem's single 3x3/2 pool (docs/performance.md). Two
implementations of the same function:

- 'auto' on CPU (NHWC float32), where they measure faster (cpu/autotune.py): our kernels (resnext_jax/cpu/max_pool.py), one pass forward and one backward.
- XLA ('xla', and 'auto' elsewhere): reduce-window forward; the backward is elementwise work: for each tap, a
  mask (input == output, no earlier tap taken) routes the output gradient back with a strided pad, and XLA
  fuses the taps into one pass.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp

from resnext_jax import cpu

IMPLS = ("auto", "xla")


def max_pool(x, window, strides, padding, impl="auto", backward=True):
  """NHWC max pooling; window/strides (h, w), padding ((top, bottom), (left, right)) of -inf. `backward=False`
  (eval): 'auto' times the forward alone."""
  if impl not in IMPLS:
    raise ValueError(f"unknown max-pool impl {impl!r}; choose one of {IMPLS}")
  args = (tuple(window), tuple(strides), tuple(map(tuple, padding)))
  if impl == "auto":
    fast = cpu.max_pool_op(x, *args)
    portable = lambda v: _max_pool(v, *args)
    candidates = {"xla": portable} if fast is None else {"kernel": fast, "xla": portable}
    if cpu.autotune.choose("max_pool", candidates, (x,), "kernel", backward=backward) == "kernel":
      return fast(x)
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
