"""config.optimizer (sgd, adamw, lamb, lars), gradient clipping and weight-decay masks: each step against optax's
own optimiser and against the update written out in numpy (timm's semantics where they choose), frozen stages
with each, invalid values, and a run resumed from its checkpoint ending bit for bit as the uninterrupted one."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
from resnext_jax import errors
from resnext_jax import optim
from resnext_jax import train
from test_resume import _digits, _final_state

OPTIMIZERS = ("sgd", "adamw", "lamb", "lars")
WD, MOMENTUM, B1, B2, EPS = 0.05, 0.9, 0.8, 0.95, 1e-6


def schedule(step):
  return 0.05 / (1.0 + step)  # changes every step: momentum after the learning rate (lars) shows


def _params():
  rng = np.random.default_rng(0)
  block = lambda: {"conv1": {"kernel": rng.standard_normal((1, 1, 4, 4))},
                   "bn1": {"scale": 1 + 0.1 * rng.standard_normal(4), "bias": 0.1 * rng.standard_normal(4)}}
  tree = {"conv1": {"kernel": rng.standard_normal((3, 3, 3, 4))},
          "bn1": {"scale": 1 + 0.1 * rng.standard_normal(4), "bias": 0.1 * rng.standard_normal(4)},
          "layer1_0": block(), "layer2_0": block(),
          "fc": {"kernel": rng.standard_normal((4, 3)), "bias": 0.1 * rng.standard_normal(3)}}
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def _grads(params, step, scale=1.0):
  keys = jax.random.split(jax.random.key(step), len(jax.tree.leaves(params)))
  leaves = [scale * jax.random.normal(k, p.shape) for k, p in zip(keys, jax.tree.leaves(params))]
  return jax.tree.unflatten(jax.tree.structure(params), leaves)


def _config(optimizer, decay_all=True, **kw):
  return tiny_config(optimizer=optimizer, weight_decay=WD, momentum=MOMENTUM, adam_b1=B1, adam_b2=B2, adam_eps=EPS,
                     weight_decay_bn_and_bias=decay_all, **kw)


def _run(tx, params, steps=3, scale=1.0):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(steps):
    updates, state = update(_grads(params, t, scale), state, params)
    params = optax.apply_updates(params, updates)
  return params


def _numpy_reference(name, params, decay_all, steps=3, scale=1.0, clip=0.0, nesterov=False):
  """The update rules written out per tensor (float64), as torch/timm state them."""
  leaves, treedef = jax.tree.flatten(params)
  p = [np.asarray(x, np.float64) for x in leaves]
  decay = [decay_all or x.ndim > 1 for x in p]
  adapt = [d and WD > 0 for d in decay]  # timm's Lamb/Lars: layer adaptation only where weight decay applies
  m, v = [np.zeros_like(x) for x in p], [np.zeros_like(x) for x in p]
  for t in range(steps):
    g = [np.asarray(x, np.float64) for x in jax.tree.leaves(_grads(params, t, scale))]
    if clip > 0:
      norm = np.sqrt(sum(np.sum(x * x) for x in g))
      g = [x * min(1.0, clip / norm) for x in g]
    lr = schedule(t)
    for i in range(len(p)):
      wd = WD * p[i] if decay[i] else 0.0
      if name == "sgd":  # torch.optim.SGD: L2 in the gradient, then momentum
        m[i] = MOMENTUM * m[i] + g[i] + wd
        step = g[i] + wd + MOMENTUM * m[i] if nesterov else m[i]
        p[i] = p[i] - lr * step
      elif name in ("adamw", "lamb"):
        m[i] = B1 * m[i] + (1 - B1) * g[i]
        v[i] = B2 * v[i] + (1 - B2) * g[i] ** 2
        u = (m[i] / (1 - B1 ** (t + 1))) / (np.sqrt(v[i] / (1 - B2 ** (t + 1))) + EPS) + wd
        if name == "lamb" and adapt[i]:
          pn, un = np.linalg.norm(p[i]), np.linalg.norm(u)
          u = u * (pn / un if pn > 0 and un > 0 else 1.0)
        p[i] = p[i] - lr * u  # adamw: p - lr * wd * p - lr * adam, as torch.optim.AdamW
      else:  # lars, optax's order: decay, trust ratio 0.001 * |p| / |g + wd p|, learning rate, then momentum
        u = g[i] + wd
        if adapt[i]:
          pn, un = np.linalg.norm(p[i]), np.linalg.norm(u)
          u = u * (0.001 * pn / un if pn > 0 and un > 0 else 1.0)
        m[i] = lr * u + MOMENTUM * m[i]
        p[i] = p[i] - (lr * u + MOMENTUM * m[i] if nesterov else m[i])
  return jax.tree.unflatten(treedef, p)


def _close(a, b, rtol=2e-5, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("decay_all", [True, False])
def test_steps_equal_the_written_out_update(name, decay_all):
  params = _params()
  got = _run(optim.create_optimizer(_config(name, decay_all), schedule), params)
  _close(got, _numpy_reference(name, params, decay_all))
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params))]
  assert all(changed)


def test_steps_equal_optax_reference():
  """Decaying every parameter, each is optax's optimiser with the same hyperparameters, bit for bit."""
  params = _params()
  references = {
      "sgd": optax.chain(optax.add_decayed_weights(WD), optax.sgd(schedule, momentum=MOMENTUM)),
      "adamw": optax.adamw(schedule, b1=B1, b2=B2, eps=EPS, weight_decay=WD),
      "lamb": optax.lamb(schedule, b1=B1, b2=B2, eps=EPS, weight_decay=WD),
      "lars": optax.lars(schedule, weight_decay=WD, momentum=MOMENTUM),
  }
  for name, reference in references.items():
    jax.tree.map(np.testing.assert_array_equal, _run(optim.create_optimizer(_config(name), schedule), params),
                 _run(reference, params))
  # Masks (BN and biases excluded): optax's own mask arguments.
  mask = lambda p: optim.weight_decay_mask(p, False)
  jax.tree.map(np.testing.assert_array_equal, _run(optim.create_optimizer(_config("adamw", False), schedule), params),
               _run(optax.adamw(schedule, b1=B1, b2=B2, eps=EPS, weight_decay=WD, mask=mask), params))
  jax.tree.map(np.testing.assert_array_equal, _run(optim.create_optimizer(_config("lars", False), schedule), params),
               _run(optax.lars(schedule, weight_decay=WD, weight_decay_mask=mask, trust_ratio_mask=mask,
                               momentum=MOMENTUM), params))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_gradient_clipping_by_global_norm(name):
  params = _params()
  got = _run(optim.create_optimizer(_config(name, grad_clip_norm=0.5), schedule), params, scale=3.0)
  _close(got, _numpy_reference(name, params, True, scale=3.0, clip=0.5))
  # A bound above the gradient's norm changes nothing (to XLA's rounding: a different program fuses differently).
  loose = _run(optim.create_optimizer(_config(name, grad_clip_norm=1e6), schedule), params)
  _close(loose, _run(optim.create_optimizer(_config(name), schedule), params), rtol=1e-6, atol=1e-8)


def test_nesterov_sgd_and_lars():
  params = _params()
  for name in ("sgd", "lars"):
    got = _run(optim.create_optimizer(_config(name, nesterov=True), schedule), params)
    _close(got, _numpy_reference(name, params, True, nesterov=True))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_frozen_stages_with_each_optimizer(name):
  """frozen_stages=2: the stem and layer1 keep their values exactly; the rest moves as the optimiser alone on
  the trained parameters would move it (the model gives frozen parameters zero gradients)."""
  params = _params()
  frozen = lambda path: path[0] in ("conv1", "bn1", "layer1_0")
  tx = optim.create_optimizer(_config(name, False, frozen_stages=2, grad_clip_norm=0.5), schedule)
  state = tx.init(params)
  p = params
  for t in range(3):
    g = jax.tree_util.tree_map_with_path(lambda path, x: x * 0 if frozen([k.key for k in path]) else x,
                                         _grads(params, t, 3.0))
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
  for name_ in ("conv1", "bn1", "layer1_0"):
    jax.tree.map(np.testing.assert_array_equal, p[name_], params[name_])
  trained = {k: params[k] for k in ("layer2_0", "fc")}
  alone = optim.create_optimizer(_config(name, False, grad_clip_norm=0.5), schedule)
  s = alone.init(trained)
  q = trained
  for t in range(3):
    g = _grads(params, t, 3.0)
    updates, s = alone.update({k: g[k] for k in trained}, s, q)
    q = optax.apply_updates(q, updates)
  _close({k: p[k] for k in trained}, q, rtol=1e-6, atol=1e-7)
  assert not np.array_equal(p["fc"]["kernel"], params["fc"]["kernel"])


def test_sgd_default_is_unchanged():
  """The default optimiser is today's chain: same state structure (checkpoints) and numbers."""
  config = tiny_config()
  assert config.optimizer == "sgd" and config.grad_clip_norm == 0.0
  params = _params()
  mask = lambda p: optim.weight_decay_mask(p, config.weight_decay_bn_and_bias)
  today = optax.chain(optax.add_decayed_weights(config.weight_decay, mask=mask),
                      optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov))
  tx = optim.create_optimizer(config, schedule)
  assert jax.tree.structure(tx.init(params)) == jax.tree.structure(today.init(params))
  jax.tree.map(np.testing.assert_array_equal, _run(tx, params), _run(today, params))


def test_invalid_values_name_the_key():
  for key, value in (("optimizer", "adam"), ("adam_b1", 1.0), ("adam_b2", -0.1), ("adam_eps", -1.0),
                     ("grad_clip_norm", -1.0), ("weight_decay", -1.0)):
    with pytest.raises(errors.ConfigError, match=key):
      optim.create_optimizer(tiny_config(**{key: value}), schedule)


# About 80 s each on 2 loaded cores: LAMB (the RSB recipes' optimiser, with BCE) runs in CI, AdamW and LARS with
# the slow tests (`-m slow`); SGD's is tests/test_resume.py.
@pytest.mark.parametrize("name", [pytest.param("adamw", marks=pytest.mark.slow), "lamb",
                                  pytest.param("lars", marks=pytest.mark.slow)])
def test_resumed_run_ends_bit_identical_with_each_optimizer(name, tmp_path, digits_dir, capsys):
  """tests/test_resume.py's digits run with each optimiser, clipping, masks, Mixup/CutMix and drop path (whose
  draws come from the checkpointed RNG): stopped one step into epoch 1 and resumed, it ends bit for bit as the
  uninterrupted run (parameters, BN statistics, EMA, optimiser state, step, RNG)."""
  def config(**kw):
    c = _digits(digits_dir, optimizer=name, weight_decay=0.05, weight_decay_bn_and_bias=False,
                grad_clip_norm=1.0, drop_path_rate=0.1, mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1,
                loss="bce" if name == "lamb" else "softmax_cross_entropy",
                bce_target_threshold=0.2 if name == "lamb" else 0.0, learning_rate=0.01, **kw)
    c.num_train_steps = 7  # epoch 0 is steps 0-4; stopped at 6, one step into epoch 1
    return c

  straight, sliced = str(tmp_path / "straight"), str(tmp_path / "sliced")
  full = train.train_and_evaluate(config(), straight)
  assert train.train_and_evaluate(config(stop_after_steps=6), sliced) is None
  assert sorted(os.listdir(os.path.join(sliced, "checkpoints"))) == ["6"]
  assert train.train_and_evaluate(config(), sliced) == full
  want, got = _final_state(straight), _final_state(sliced)
  assert int(want["train"]["step"]) == 7
  assert jax.tree.structure(want) == jax.tree.structure(got)
  jax.tree.map(np.testing.assert_array_equal, want, got)
  capsys.readouterr()
