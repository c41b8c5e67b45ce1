"""Optimiser, learning-rate schedules and the one place where durations in epochs become steps.

The paper trains with SGD (momentum 0.9) and weight decay added to the gradient before momentum (L2 as in
fb.resnet.torch / PyTorch's `SGD(weight_decay=...)`), on every parameter; `weight_decay_bn_and_bias=False`
restricts the decay to conv and dense kernels, as later recipes do.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from resnext_jax import models
from resnext_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Durations:
  """Every duration of a run, in optimiser steps (one step = one global batch of config.batch_size)."""
  steps_per_epoch: int
  num_train_steps: int
  warmup_steps: int
  lr_boundaries: tuple[int, ...]
  eval_every_steps: int       # 0: only at the end
  stop_after_steps: int       # the step this run stops at (num_train_steps unless time-sliced)


def durations(config, num_train_examples: int) -> Durations:
  """Converts the config's epoch-or-step fields into steps (a field given in steps wins)."""
  if config.batch_size <= 0:
    raise ConfigError(f"config.batch_size must be positive, got {config.batch_size}")
  steps_per_epoch = max(1, num_train_examples // config.batch_size)

  def steps(epochs):
    return int(math.ceil(epochs * steps_per_epoch))

  total = config.num_train_steps if config.num_train_steps > 0 else steps(config.num_epochs)
  if total <= 0:
    raise ConfigError(f"training needs num_epochs > 0 or num_train_steps > 0 (got num_epochs="
                      f"{config.num_epochs}, num_train_steps={config.num_train_steps})")
  warmup = config.warmup_steps if config.warmup_steps >= 0 else steps(config.warmup_epochs)
  boundaries = (tuple(config.lr_step_steps) if config.lr_step_steps
                else tuple(steps(e) for e in config.lr_step_epochs))
  if config.eval_every_steps > 0:
    eval_every = config.eval_every_steps
  else:
    eval_every = steps(config.eval_every_epochs) if config.eval_every_epochs > 0 else 0
  stop = min(total, config.stop_after_steps) if config.stop_after_steps > 0 else total
  return Durations(steps_per_epoch=steps_per_epoch, num_train_steps=total, warmup_steps=min(warmup, total),
                   lr_boundaries=tuple(sorted(boundaries)), eval_every_steps=eval_every, stop_after_steps=stop)


def peak_learning_rate(config) -> float:
  """learning_rate x batch_size / lr_base_batch_size (the paper's linear scaling); base 0 disables it."""
  if config.lr_base_batch_size > 0:
    return config.learning_rate * config.batch_size / config.lr_base_batch_size
  return config.learning_rate


def learning_rate_schedule(config, d: Durations) -> optax.Schedule:
  """'step' (divide by 1/lr_decay_factor at each boundary) or 'cosine' (to 0), after a linear warm-up."""
  peak = peak_learning_rate(config)
  if config.lr_schedule == "step":
    # Boundaries count from step 0 (not from the end of warm-up), as the paper's epochs do; the step at a
    # boundary already has the lower rate (optax.piecewise_constant_schedule would change one step later).
    boundaries, factor = jnp.asarray(d.lr_boundaries or (d.num_train_steps + 1,)), config.lr_decay_factor
    after = lambda step: peak * factor ** jnp.sum(step >= boundaries)
  elif config.lr_schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, max(1, d.num_train_steps - d.warmup_steps))
  else:
    raise ConfigError(f"unknown config.lr_schedule {config.lr_schedule!r}; choose 'step' or 'cosine'")
  if d.warmup_steps <= 0:
    return after
  w = d.warmup_steps
  warmup = lambda step: peak * (step + 1) / w  # reaches the peak on the last warm-up step
  if config.lr_schedule == "step":
    # The step schedule is a function of the absolute step, so it is not shifted by the warm-up.
    return lambda step: jnp.where(step < w, warmup(step), after(step))
  return optax.join_schedules([warmup, after], [w])


def weight_decay_mask(params, decay_bn_and_bias: bool):
  """True where weight decay applies: everything (the paper), or only conv/dense kernels (ndim > 1)."""
  return jax.tree.map(lambda p: bool(decay_bn_and_bias) or p.ndim > 1, params)


def frozen_labels(params, frozen_stages: int):
  """'frozen' for the parameters of the stem and layer1..layer{frozen_stages-1}, 'train' elsewhere."""
  return {name: jax.tree.map(lambda _, f=models.stage_index(name) < frozen_stages: "frozen" if f else "train", sub)
          for name, sub in params.items()}


def create_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """L2 weight decay on the gradient, then SGD with (Nesterov) momentum at the scheduled learning rate.

  With config.frozen_stages (fine-tuning), frozen parameters get no update at all: no decay, no momentum.
  """
  if config.weight_decay < 0 or not 0 <= config.momentum < 1:
    raise ConfigError(f"need weight_decay >= 0 and 0 <= momentum < 1 (got {config.weight_decay}, "
                      f"{config.momentum})")
  decay_all = config.weight_decay_bn_and_bias
  tx = optax.chain(
      optax.add_decayed_weights(config.weight_decay, mask=lambda p: weight_decay_mask(p, decay_all)),
      optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov),
  )
  if config.frozen_stages > 0:
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                               lambda p: frozen_labels(p, config.frozen_stages))
  return tx


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
  """Per-example softmax cross-entropy against (smoothed) one-hot labels, in float32."""
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing > 0:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def ema_update(ema, new, decay: float):
  """ema <- decay * ema + (1 - decay) * new, leaf by leaf."""
  return jax.tree.map(lambda e, n: decay * e + (1.0 - decay) * n, ema, new)
