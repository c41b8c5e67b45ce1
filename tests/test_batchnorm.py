"""Our BatchNorm equals flax.linen.BatchNorm: variables, outputs, gradients, running statistics."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnext_jax.batchnorm import BatchNorm

KW = dict(momentum=0.9, epsilon=1e-5)


def _pair(**kw):
  return BatchNorm(**KW, **kw), nn.BatchNorm(**KW, **kw)


def _init(module, x):
  variables = module.init(jax.random.key(0), x)
  # Non-trivial scale, bias and running statistics, so that every term of the formulas matters.
  c = x.shape[-1]
  rng = np.random.default_rng(0)
  return {"params": {"scale": jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32),
                     "bias": jnp.asarray(rng.normal(size=c), jnp.float32)},
          "batch_stats": {"mean": jnp.asarray(rng.normal(size=c), jnp.float32),
                          "var": jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32)}}, variables


def test_same_variables_outputs_gradients_and_running_statistics():
  x = jax.random.normal(jax.random.key(1), (4, 5, 3, 8)) * 3 + 1
  ours, flax = _pair(use_running_average=False)
  variables, ours_init = _init(ours, x)
  assert jax.tree.map(jnp.shape, ours_init) == jax.tree.map(jnp.shape, flax.init(jax.random.key(0), x))

  def run(module, v, x):
    y, updates = module.apply(v, x, mutable=["batch_stats"])
    return y, updates["batch_stats"]

  (y, stats), (y_ref, stats_ref) = run(ours, variables, x), run(flax, variables, x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for k in ("mean", "var"):
    np.testing.assert_allclose(stats[k], stats_ref[k], rtol=1e-5, atol=1e-6)

  cotangent = jax.random.normal(jax.random.key(2), y.shape)
  loss = lambda m: lambda p, x: jnp.vdot(run(m, {**variables, "params": p}, x)[0], cotangent)
  grads = jax.grad(loss(ours), (0, 1))(variables["params"], x)
  grads_ref = jax.grad(loss(flax), (0, 1))(variables["params"], x)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_running_average_mode_and_bfloat16():
  x = jax.random.normal(jax.random.key(3), (2, 4, 4, 16))
  ours, flax = _pair(use_running_average=True)
  variables, _ = _init(ours, x)
  np.testing.assert_allclose(ours.apply(variables, x), flax.apply(variables, x), rtol=1e-5, atol=1e-5)
  for train in (False, True):
    ours16, flax16 = _pair(use_running_average=not train, dtype=jnp.bfloat16)
    xb = x.astype(jnp.bfloat16)
    y = ours16.apply(variables, xb, mutable=["batch_stats"])[0]
    y_ref = flax16.apply(variables, xb, mutable=["batch_stats"])[0]
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(y.astype(jnp.float32), y_ref.astype(jnp.float32), rtol=0.02, atol=0.05)


def test_initialization_leaves_statistics_untouched():
  x = jnp.full((2, 3, 3, 4), 5.0)
  stats = BatchNorm(**KW).init(jax.random.key(0), x)["batch_stats"]
  np.testing.assert_array_equal(stats["mean"], np.zeros(4))
  np.testing.assert_array_equal(stats["var"], np.ones(4))
