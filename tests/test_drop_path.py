"""Stochastic depth (drop path): no parameters of its own, the plain model at rate 0 and in eval mode, timm's
per-example semantics (the branch zeroed or scaled by 1 / keep, its expectation unchanged), timm's linear rate
over the blocks, none in frozen stages, finite gradients, and the config wiring."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from resnext_jax import errors
from resnext_jax import models

# resnext11_4x16d has 3 blocks (layer1_0, layer2_0, layer3_0): rates 0, rate / 2, rate.
SMALL = dict(planes=(8, 16, 16), stem_width=8, base_width=32, conv_impl="xla")
BLOCKS = ("layer1_0", "layer2_0", "layer3_0")


def _model(rate=0.0, **kw):
  return models.create_model("resnext11_4x16d", num_classes=10, drop_path_rate=rate, **{**SMALL, **kw})


@pytest.fixture(scope="module")
def setup():
  x = jax.random.normal(jax.random.key(1), (8, 8, 8, 3))
  variables = jax.jit(_model().init)(jax.random.key(0), x)
  return x, variables


def _train_apply(model, variables, x, key, intermediates=False):
  mutable = ["batch_stats", "intermediates"] if intermediates else ["batch_stats"]
  return model.apply(variables, x, train=True, mutable=mutable, rngs={"dropout": key})


def test_no_parameters_and_rate_zero_is_the_plain_model(setup):
  x, variables = setup
  # Same parameter and statistics names, shapes and values whatever the rate (init runs in eval mode).
  for rate in (0.3, 0.9):
    other = jax.jit(_model(rate).init)(jax.random.key(0), x)
    assert jax.tree.structure(other) == jax.tree.structure(variables)
    jax.tree.map(np.testing.assert_array_equal, other, variables)
  # Rate 0 needs no RNG and draws nothing: the same output with or without a 'dropout' key, no random op traced.
  plain = _model()
  apply = lambda v, x: plain.apply(v, x, train=True, mutable=["batch_stats"])
  without_rng = jax.jit(apply)(variables, x)
  with_rng = jax.jit(functools.partial(_train_apply, plain))(variables, x, jax.random.key(3))
  jax.tree.map(np.testing.assert_array_equal, without_rng, with_rng)
  assert "random" not in str(jax.make_jaxpr(apply)(variables, x))
  assert "random_bits" in str(jax.make_jaxpr(functools.partial(_train_apply, _model(0.5)))(
      variables, x, jax.random.key(3)))


def test_eval_output_unchanged(setup):
  x, variables = setup
  want = jax.jit(functools.partial(_model().apply, train=False))(variables, x)
  got = jax.jit(functools.partial(_model(0.8).apply, train=False))(variables, x)
  np.testing.assert_array_equal(got, want)


def test_branch_dropped_per_example_and_unbiased(setup):
  """Each example's residual branch is 0 or branch / keep; over many keys its mean is the branch (5 sigma), and
  the block's output is relu(dropped branch + shortcut)."""
  x, variables = setup
  rate, num_keys = 0.5, 400
  model = _model(rate, stage_sizes=(1, 1))  # 2 blocks: rates 0 and 0.5 (layer2_0)
  variables = jax.jit(model.init)(jax.random.key(0), x)

  @jax.jit
  def run(keys):
    def one(key):
      out, state = model.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"],
                               capture_intermediates=True, rngs={"dropout": key})
      inter = state["intermediates"]
      block = inter["layer2_0"]
      return block["drop_path"][0], block["bn3"]["__call__"][0], block["downsample_1"]["__call__"][0], \
          block["__call__"][0], out
    return jax.vmap(one)(keys)

  dropped, branch, shortcut, block_out, _ = run(jax.random.split(jax.random.key(7), num_keys))
  assert "drop_path" not in jax.jit(lambda k: _train_apply(model, variables, x, k, True))(
      jax.random.key(0))[1]["intermediates"].get("layer1_0", {})  # block 0: rate 0
  dropped, branch = np.asarray(dropped), np.asarray(branch)
  # The branch before the drop does not depend on the key (nothing random precedes it).
  assert np.all(branch == branch[:1])
  branch, keep = branch[0], 1.0 - rate
  kept = np.abs(dropped).reshape(num_keys, x.shape[0], -1).max(-1) > 0
  np.testing.assert_allclose(dropped, np.where(kept[:, :, None, None, None], branch / keep, 0.0), rtol=1e-6,
                             atol=1e-7)
  # Per example, not per batch: almost every batch drops some examples and keeps others.
  assert np.mean(np.any(kept, 1) & ~np.all(kept, 1)) > 0.9
  assert abs(kept.mean() - keep) < 5 * np.sqrt(keep * (1 - keep) / kept.size)
  mean = dropped.mean(0)
  sigma = np.sqrt((1 - keep) / keep / num_keys) * np.abs(branch)
  assert np.all(np.abs(mean - branch) <= 5 * sigma + 1e-6)
  np.testing.assert_allclose(block_out, jax.nn.relu(dropped + np.asarray(shortcut)), rtol=1e-6, atol=1e-6)


def test_rate_linear_over_blocks_and_none_in_frozen_stages(setup):
  x, variables = setup
  rate, num_keys = 0.6, 300

  def drop_fraction(model):
    @jax.jit
    def run(keys):
      def one(key):
        inter = _train_apply(model, variables, x, key, True)[1]["intermediates"]
        return {b: jnp.abs(inter[b]["drop_path"][0]).reshape(x.shape[0], -1).max(-1) == 0
                for b in BLOCKS if "drop_path" in inter.get(b, {})}
      return jax.vmap(one)(keys)
    return {b: float(v.mean()) for b, v in run(jax.random.split(jax.random.key(2), num_keys)).items()}

  fractions = drop_fraction(_model(rate))
  assert set(fractions) == {"layer2_0", "layer3_0"}  # block 0 of N: rate * 0 / (N - 1)
  n = num_keys * x.shape[0]
  for block, expected in (("layer2_0", rate / 2), ("layer3_0", rate)):
    assert abs(fractions[block] - expected) < 5 * np.sqrt(expected * (1 - expected) / n), (block, fractions)
  # frozen_stages=3 freezes the stem, layer1 and layer2: only layer3 drops.
  assert set(drop_fraction(_model(rate, frozen_stages=3))) == {"layer3_0"}


def test_gradients_finite_and_random_per_step(setup):
  x, variables = setup
  model = _model(0.5)
  labels = jnp.arange(8) % 10

  def loss(params, key):
    logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"],
                            rngs={"dropout": key})
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  grad = jax.jit(jax.value_and_grad(loss))
  (l1, g1), (l2, _) = grad(variables["params"], jax.random.key(0)), grad(variables["params"], jax.random.key(1))
  assert np.isfinite(l1) and all(np.all(np.isfinite(g)) for g in jax.tree.leaves(g1))
  assert l1 != l2  # a different key drops differently
  # bfloat16 compute: finite too.
  bf16 = _model(0.5, dtype=jnp.bfloat16)
  logits, _ = jax.jit(functools.partial(_train_apply, bf16))(variables, x, jax.random.key(0))
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))


def test_config_wiring():
  c = tiny_config()
  assert "drop_path_rate" not in models.config_overrides(c)  # the plain recipe's meta is unchanged
  assert models.from_config(c, 10).drop_path_rate == 0.0
  c.drop_path_rate = 0.05
  assert models.config_overrides(c)["drop_path_rate"] == 0.05
  assert models.from_config(c, 10).drop_path_rate == 0.05
  c.model_overrides.drop_path_rate = 0.2  # model_overrides wins, as for block_form
  assert models.from_config(c, 10).drop_path_rate == 0.2
  for bad in (-0.1, 1.0):
    c = tiny_config(drop_path_rate=bad)
    with pytest.raises(errors.ConfigError, match="drop_path_rate"):
      models.from_config(c, 10)
