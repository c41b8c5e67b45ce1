"""Paper Fig. 3: (a) split-transform-sum, (b) split-transform-concat and (c) grouped convolution are the
same function. All three share one parameter layout, so one set of variables runs in each form."""

import jax
import jax.numpy as jnp
import numpy as np

from resnext_jax import models


def tiny(block_form, cardinality):
  """Two stages (the second downsamples), cardinality 4 with groups of 8 channels."""
  return models.create_model("resnext29_8x64d", num_classes=6, stage_sizes=(1, 1), cardinality=cardinality,
                             base_width=16, planes=(32, 64), stem_width=16, block_form=block_form)


def test_three_forms_compute_the_same_function(cardinality=4):
  x = jax.random.normal(jax.random.key(1), (3, 37, 37, 3))  # odd size: the stride-2 paths too
  grouped = tiny("grouped", cardinality)
  variables = jax.jit(grouped.init)(jax.random.key(0, impl="rbg"), x)
  train = lambda m: jax.jit(lambda v: m.apply(v, x, train=True, mutable=["batch_stats"]))(variables)
  for form in ("concat", "split_sum"):
    other = tiny(form, cardinality)
    assert jax.tree.structure(jax.eval_shape(other.init, jax.random.key(0, impl="rbg"), x)) == jax.tree.structure(variables)
    np.testing.assert_allclose(jax.jit(other.apply)(variables, x), jax.jit(grouped.apply)(variables, x),
                               rtol=2e-5, atol=2e-5)
    (out_g, upd_g), (out_o, upd_o) = train(grouped), train(other)
    np.testing.assert_allclose(out_o, out_g, rtol=2e-5, atol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5), upd_o, upd_g)


def test_forms_differ_from_a_different_cardinality():
  """Guards the test above: the same kernels read with the wrong grouping give another function."""
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = jax.jit(tiny("grouped", 4).init)(jax.random.key(0, impl="rbg"), x)
  wrong = jax.tree.map(lambda a: a, variables)
  # cardinality 4 vs 8 have different kernel shapes, so instead permute a grouped kernel's groups.
  k = wrong["params"]["layer1_0"]["conv2"]["kernel"]
  wrong["params"]["layer1_0"]["conv2"]["kernel"] = jnp.roll(k, k.shape[-1] // 4, axis=-1)
  out = jax.jit(tiny("split_sum", 4).apply)(wrong, x)
  assert not np.allclose(out, jax.jit(tiny("grouped", 4).apply)(variables, x), atol=1e-4)


def test_split_sum_gradients_match_grouped():
  x = jax.random.normal(jax.random.key(1), (2, 21, 21, 3))
  variables = jax.jit(tiny("grouped", 4).init)(jax.random.key(0, impl="rbg"), x)
  loss = lambda m: jax.jit(jax.grad(lambda p: jnp.sum(m.apply({**variables, "params": p}, x) ** 2)))(
      variables["params"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               loss(tiny("split_sum", 4)), loss(tiny("grouped", 4)))
