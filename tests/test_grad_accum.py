"""Gradient accumulation with batch norm: what a step with grad_accum_steps=k equals, exactly (docs/training.md).

With BN in training mode each micro-batch is normalised with its own statistics, so the step is not the
full-batch update: it is the update from the mean of the micro-batches' gradients, each taken with the
micro-batch's own statistics (as if the batch were k batches of batch_size / k), and BN's running statistics
are updated once per micro-batch, in order. Where the loss does not depend on batch statistics (BN on its
running statistics: eval mode, frozen stages) the mean of the micro-batch gradients is the full-batch gradient.
"""

import functools

import jax
from jax.sharding import Mesh
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
from resnext_jax import models
from resnext_jax import optim
from resnext_jax import train

K = 2  # micro-batches


@pytest.fixture(scope="module")
def setup():
  config = tiny_config(grad_accum_steps=K, batch_size=16, nesterov=True, label_smoothing=0.1)
  overrides = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in config.model_overrides.items()}
  model = models.create_model("resnext11_4x16d", num_classes=10, conv_impl="xla", **overrides)
  schedule = optim.learning_rate_schedule(config, optim.durations(config, config.synthetic_num_examples))
  tx = optim.create_optimizer(config, schedule)
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  state, _ = train.create_train_state(config, model, tx, mesh, (8, 8, 3))
  rng = np.random.default_rng(0)
  # Two halves with different statistics: micro-batch statistics then differ from the full batch's.
  image = rng.standard_normal((16, 8, 8, 3)).astype(np.float32) * np.linspace(0.5, 3, 16)[:, None, None, None]
  batch = {"image": jnp.asarray(image), "label": jnp.asarray(rng.integers(0, 10, 16), jnp.int32)}
  return config, model, schedule, tx, state, batch


def _loss(model, label_smoothing, train_mode):
  def loss(params, batch_stats, batch):
    if train_mode:
      logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"], train=True,
                                    mutable=["batch_stats"])
      batch_stats = updates["batch_stats"]
    else:
      logits = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"], train=False)
    return optim.cross_entropy(logits, batch["label"], 10, label_smoothing).mean(), batch_stats
  return loss


def _close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=rtol, atol=atol), a, b)


def _max_relative_difference(a, b):
  return max(float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y))) for x, y in zip(jax.tree.leaves(a),
                                                                                   jax.tree.leaves(b)))


def test_train_mode_step_is_the_mean_of_micro_batch_gradients_with_their_own_statistics(setup):
  config, model, schedule, tx, state, batch = setup
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx, schedule=schedule,
                                   label_smoothing=config.label_smoothing, grad_accum_steps=K,
                                   rng_impl=config.rng_impl))
  new, metrics = step(state, batch)

  @jax.jit
  def by_hand(state, batch):
    """Micro-batch i = examples i, i + K, ...; BN statistics of the micro-batch; running statistics updated
    once per micro-batch, in order; the mean of the K gradients goes to the optimizer."""
    grad = jax.grad(_loss(model, config.label_smoothing, train_mode=True), has_aux=True)
    grads, batch_stats, losses = [], state.batch_stats, []
    for i in range(K):
      micro = jax.tree.map(lambda x, i=i: x[i::K], batch)
      g, batch_stats = grad(state.params, batch_stats, micro)
      grads.append(g)
      losses.append(_loss(model, config.label_smoothing, True)(state.params, state.batch_stats, micro)[0])
    mean = jax.tree.map(lambda *g: sum(g) / K, *grads)
    updates, _ = tx.update(mean, state.opt_state, state.params)
    full = grad(state.params, state.batch_stats, batch)[0]
    return optax.apply_updates(state.params, updates), batch_stats, sum(losses) / K, mean, full

  params, batch_stats, loss, mean_grad, full_batch_grad = by_hand(state, batch)
  _close(new.params, params)
  _close(new.batch_stats, batch_stats)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
  np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(mean_grad), rtol=1e-5)
  # ... which is not the full-batch gradient: one batch's statistics are not two half-batches'.
  assert _max_relative_difference(mean_grad, full_batch_grad) > 1e-2


def test_without_batch_statistics_the_mean_of_micro_batch_gradients_is_the_full_batch_gradient(setup):
  config, model, _, _, state, batch = setup
  loss = _loss(model, config.label_smoothing, train_mode=False)  # BN on its running statistics

  def grad_fn(params, batch_stats, micro):
    (value, batch_stats), grads = jax.value_and_grad(loss, has_aux=True)(params, batch_stats, micro)
    return (value, (batch_stats, jnp.zeros(micro["label"].shape))), grads

  accumulate = jax.jit(train.accumulate_gradients, static_argnums=(0, 4))
  grads_k, loss_k, _, _ = accumulate(grad_fn, state.params, state.batch_stats, batch, K)
  grads_1, loss_1, _, _ = accumulate(grad_fn, state.params, state.batch_stats, batch, 1)
  _close(grads_k, grads_1)
  np.testing.assert_allclose(loss_k, loss_1, rtol=1e-6)
