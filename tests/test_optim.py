"""Optimiser, schedules, duration conversion, weight-decay masks, label smoothing, gradient accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
from resnext_jax.configs import cifar10_resnext29_8x64d, imagenet_resnext50
from resnext_jax import errors
from resnext_jax import optim
from resnext_jax import train


def test_durations_epochs_to_steps_in_one_place():
  c = imagenet_resnext50.get_config()
  d = optim.durations(c, 1_281_167)
  assert d.steps_per_epoch == 5004
  assert d.num_train_steps == 500_400
  assert d.lr_boundaries == (5004 * 30, 5004 * 60, 5004 * 90)
  assert d.eval_every_steps == 5004 and d.warmup_steps == 0 and d.stop_after_steps == d.num_train_steps
  # Steps given explicitly win over epochs.
  c.num_train_steps, c.lr_step_steps, c.warmup_steps, c.eval_every_steps, c.stop_after_steps = 100, (50,), 5, 7, 60
  d = optim.durations(c, 1_281_167)
  assert (d.num_train_steps, d.lr_boundaries, d.warmup_steps, d.eval_every_steps, d.stop_after_steps) == (
      100, (50,), 5, 7, 60)


def test_paper_step_schedule_imagenet():
  c = imagenet_resnext50.get_config()
  c.batch_size = 512  # lr scales linearly: 0.1 x 512 / 256
  d = optim.durations(c, 1_281_167)
  lr = optim.learning_rate_schedule(c, d)
  b = d.lr_boundaries
  np.testing.assert_allclose([lr(0), lr(b[0] - 1), lr(b[0]), lr(b[1]), lr(b[2]), lr(d.num_train_steps - 1)],
                             [0.2, 0.2, 0.02, 0.002, 0.0002, 0.0002], rtol=1e-5)


def test_cifar_recipe():
  c = cifar10_resnext29_8x64d.get_config()
  assert (c.batch_size, c.weight_decay, c.num_epochs, tuple(c.lr_step_epochs), c.momentum) == (
      128, 5e-4, 300, (150, 225), 0.9)
  d = optim.durations(c, 50_000)
  lr = optim.learning_rate_schedule(c, d)
  assert d.lr_boundaries == (390 * 150, 390 * 225)
  np.testing.assert_allclose([lr(0), lr(390 * 150), lr(390 * 225)], [0.1, 0.01, 0.001], rtol=1e-5)


def test_cosine_with_linear_warmup():
  c = tiny_config(num_train_steps=100, warmup_steps=10, learning_rate=1.0, lr_schedule="cosine")
  lr = optim.learning_rate_schedule(c, optim.durations(c, 1000))
  np.testing.assert_allclose([lr(0), lr(4), lr(9), lr(10), lr(55), lr(100)],
                             [0.1, 0.5, 1.0, 1.0, 0.5, 0.0], atol=1e-6)
  c.lr_schedule = "linear"
  with pytest.raises(errors.ConfigError, match="lr_schedule"):
    optim.learning_rate_schedule(c, optim.durations(c, 1000))


def test_sgd_weight_decay_matches_pytorch_formula():
  """buf = m * buf + (g + wd * p); p -= lr * buf (Nesterov: p -= lr * (g' + m * buf)), as torch.optim.SGD."""
  params = {"conv": {"kernel": jnp.array([[1.0, -2.0]])}, "bn": {"scale": jnp.array([3.0]),
                                                                 "bias": jnp.array([0.5])}}
  grads = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)
  for nesterov in (False, True):
    for decay_all in (True, False):
      c = tiny_config(weight_decay=0.01, momentum=0.9, nesterov=nesterov, weight_decay_bn_and_bias=decay_all)
      tx = optim.create_optimizer(c, lambda step: 0.5)
      state, p, buf = tx.init(params), params, jax.tree.map(jnp.zeros_like, params)
      for _ in range(3):
        updates, state = tx.update(grads, state, p)
        new_p = optax.apply_updates(p, updates)
        decays = optim.weight_decay_mask(p, decay_all)
        g = jax.tree.map(lambda g_, p_, d_: g_ + (0.01 * p_ if d_ else 0.0), grads, p, decays)
        buf = jax.tree.map(lambda b, g_: 0.9 * b + g_, buf, g)
        step = jax.tree.map(lambda b, g_: g_ + 0.9 * b, buf, g) if nesterov else buf
        expected = jax.tree.map(lambda p_, s: p_ - 0.5 * s, p, step)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new_p, expected)
        p = new_p


def test_weight_decay_mask_skips_bn_and_bias_only_when_asked():
  params = {"conv1": {"kernel": jnp.ones((3, 3, 3, 8))}, "bn1": {"scale": jnp.ones(8), "bias": jnp.ones(8)},
            "fc": {"kernel": jnp.ones((8, 10)), "bias": jnp.ones(10)}}
  assert all(jax.tree.leaves(optim.weight_decay_mask(params, True)))
  mask = optim.weight_decay_mask(params, False)
  assert mask["conv1"]["kernel"] and mask["fc"]["kernel"]
  assert not (mask["bn1"]["scale"] or mask["bn1"]["bias"] or mask["fc"]["bias"])


def test_label_smoothing():
  logits = jnp.array([[2.0, 0.0, -1.0]])
  plain = optim.cross_entropy(logits, jnp.array([0]), 3)
  smooth = optim.cross_entropy(logits, jnp.array([0]), 3, label_smoothing=0.3)
  logp = jax.nn.log_softmax(logits[0])
  np.testing.assert_allclose(plain[0], -logp[0], rtol=1e-6)
  target = np.array([0.7 + 0.1, 0.1, 0.1])
  np.testing.assert_allclose(smooth[0], -(target * logp).sum(), rtol=1e-6)


def test_gradient_accumulation_equals_full_batch():
  """Mean of micro-batch gradients == full-batch gradient (mean loss); aux threaded in order."""
  w = jnp.array([0.3, -0.2, 0.5])
  batch = {"x": jax.random.normal(jax.random.key(0), (12, 3)), "y": jnp.arange(12) % 2}

  def loss_fn(params, aux, b):
    pred = b["x"] @ params
    return jnp.mean((pred - b["y"]) ** 2), (aux + 1, pred > 0.5)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  g1, l1, aux1, acc1 = train.accumulate_gradients(grad_fn, w, 0, batch, 1)
  g4, l4, aux4, acc4 = jax.jit(train.accumulate_gradients, static_argnums=(0, 4))(grad_fn, w, 0, batch, 4)
  np.testing.assert_allclose(g4, g1, rtol=1e-5)
  np.testing.assert_allclose(l4, l1, rtol=1e-5)
  np.testing.assert_allclose(acc4, acc1, rtol=1e-6)
  assert (aux1, int(aux4)) == (1, 4)


def test_ema_update():
  out = optim.ema_update({"a": jnp.array(1.0)}, {"a": jnp.array(3.0)}, 0.9)
  np.testing.assert_allclose(out["a"], 1.2, rtol=1e-6)
