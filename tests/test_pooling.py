"""The stem's max pooling: flax's values and gradients, and PyTorch's rule for ties (first maximum)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnext_jax.layers import pooling


@pytest.mark.parametrize("shape,window,strides,padding", [
    ((2, 12, 10, 5), (3, 3), (2, 2), ((1, 1), (1, 1))),   # the ResNeXt stem's pool, even size
    ((2, 9, 11, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),    # odd sizes
    ((1, 7, 7, 4), (2, 3), (1, 2), ((0, 1), (1, 0))),     # unequal window, stride and padding
])
def test_matches_flax_max_pool(shape, window, strides, padding):
  x = jax.random.normal(jax.random.key(0), shape)        # continuous values: no ties
  ours = lambda x: pooling.max_pool(x, window, strides, padding)
  flax = lambda x: nn.max_pool(x, window, strides=strides, padding=padding)
  y, vjp = jax.vjp(ours, x)
  want, want_vjp = jax.vjp(flax, x)
  np.testing.assert_array_equal(y, want)
  dy = jax.random.normal(jax.random.key(1), y.shape)
  np.testing.assert_allclose(jax.jit(vjp)(dy)[0], want_vjp(dy)[0], rtol=1e-6, atol=1e-6)


def test_ties_route_the_gradient_to_the_first_maximum_like_pytorch():
  """PyTorch's max_pool2d sends a window's gradient to its first maximum in row-major order; all four 3x3/2
  windows of this 4x4 input contain (1, 1), and those reaching (1, 2) see (1, 1) first."""
  x = jnp.zeros((1, 4, 4, 1)).at[0, 1, 1, 0].set(1.0).at[0, 1, 2, 0].set(1.0)
  dx = jax.grad(lambda x: jnp.sum(pooling.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))))(x)[0, :, :, 0]
  want = np.zeros((4, 4))
  want[1, 1] = 4.0
  np.testing.assert_array_equal(dx, want)
  # An all-equal window (zeros after a ReLU): its gradient goes to the top-left element of the window.
  dz = jax.grad(lambda z: jnp.sum(pooling.max_pool(z, (2, 2), (2, 2), ((0, 0), (0, 0)))))(jnp.zeros((1, 2, 2, 1)))
  np.testing.assert_array_equal(dz[0, :, :, 0], [[1.0, 0.0], [0.0, 0.0]])


def test_bfloat16():
  x = jax.random.normal(jax.random.key(2), (1, 8, 8, 2)).astype(jnp.bfloat16)
  y, vjp = jax.vjp(lambda x: pooling.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1))), x)
  assert y.dtype == jnp.bfloat16 and vjp(jnp.ones_like(y))[0].dtype == jnp.bfloat16
  np.testing.assert_array_equal(y, nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))))


# 5: below one vector (16, 8 or 4 floats by ISA) but for 4-wide ones; 50 = 3 x 16 + 2 = 6 x 8 + 2 = 12 x 4 + 2:
# vectors and a 2-channel scalar tail at every vector width.
@pytest.mark.parametrize("channels", [5, 50])
def test_cpu_kernel_equals_xla_formulation(channels):
  """impl 'auto' on CPU is our kernel (a custom call); same values and gradient as 'xla', ties included."""
  x = jnp.round(jax.random.normal(jax.random.key(3), (3, 11, 10, channels)) * 2) / 2  # many ties
  results = {}
  for impl in ("auto", "xla"):
    f = jax.jit(lambda x, impl=impl: pooling.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)), impl=impl))
    y, vjp = jax.vjp(f, x)
    dx = vjp(jax.random.normal(jax.random.key(4), y.shape))[0]
    hlo = jax.jit(jax.grad(lambda x: jnp.vdot(f(x), y))).lower(x).compile().as_text()
    assert ("resnext_jax_max_pool_forward" in hlo and "resnext_jax_max_pool_backward" in hlo) == (impl == "auto")
    results[impl] = (y, dx)
  np.testing.assert_array_equal(results["auto"][0], results["xla"][0])
  np.testing.assert_allclose(results["auto"][1], results["xla"][1], rtol=1e-6, atol=1e-6)


def test_rejects_unknown_impl():
  with pytest.raises(ValueError, match="unknown max-pool impl"):
    pooling.max_pool(jnp.zeros((1, 4, 4, 1)), (3, 3), (2, 2), ((1, 1), (1, 1)), impl="nope")
