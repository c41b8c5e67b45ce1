"""Optimisers, losses, learning-rate schedules and the one place where durations in epochs become steps.

The paper trains with SGD (momentum 0.9) and weight decay added to the gradient before momentum (L2 as in
fb.resnet.torch / PyTorch's `SGD(weight_decay=...)`), on every parameter; `weight_decay_bn_and_bias=False`
restricts the decay to conv and dense kernels, as later recipes do, for every optimiser. AdamW, LAMB and LARS
(optax's, with timm's choices where optax leaves one open) and gradient clipping serve the "ResNet strikes
back" recipes, as do the soft-target and binary cross-entropy losses (issue 15; see `create_optimizer`).
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


OPTIMIZERS = ("sgd", "adamw", "lamb", "lars")
LOSSES = ("softmax_cross_entropy", "bce")


def _check_optimizer_config(config):
  name = config.get("optimizer", "sgd")
  if name not in OPTIMIZERS:
    raise ConfigError(f"unknown config.optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")
  if config.weight_decay < 0 or not 0 <= config.momentum < 1:
    raise ConfigError(f"need weight_decay >= 0 and 0 <= momentum < 1 (got {config.weight_decay}, "
                      f"{config.momentum})")
  for key in ("adam_b1", "adam_b2"):
    if not 0 <= config.get(key, 0.9) < 1:
      raise ConfigError(f"config.{key} must be in [0, 1), got {config[key]}")
  if config.get("adam_eps", 1e-8) < 0:
    raise ConfigError(f"config.adam_eps must be >= 0, got {config.adam_eps}")
  if config.get("grad_clip_norm", 0.0) < 0:
    raise ConfigError(f"config.grad_clip_norm must be >= 0 (0 = off), got {config.grad_clip_norm}")
  return name


def create_optimizer(config, schedule: optax.Schedule) -> optax.GradientTransformation:
  """config.optimizer at the scheduled learning rate, with weight decay where `weight_decay_mask` says.

  - 'sgd' (the paper's): L2 weight decay added to the gradient, then SGD with (Nesterov) momentum.
  - 'adamw': optax.adamw (decoupled decay, lr * weight_decay * p, as torch's AdamW), betas adam_b1/adam_b2,
    eps adam_eps.
  - 'lamb': optax.lamb (Adam step + weight_decay * p, scaled per tensor by ||p|| / ||step||), betas and eps as
    adamw. As timm's Lamb (always_adapt=False), the layer adaptation applies only where weight decay does:
    everywhere with weight_decay_bn_and_bias, not to BN and biases without it, nowhere with weight_decay 0.
    timm's Lamb also clips the global gradient norm at 1.0 itself: here that is grad_clip_norm=1.0.
  - 'lars': optax.lars (weight decay, then the trust ratio 0.001 * ||p|| / ||g + wd * p||, then momentum), the
    adaptation masked as for lamb (timm's Lars, always_adapt=False).
  grad_clip_norm > 0 clips the gradient by its global norm before any of these (timm's --clip-grad, 'norm').
  With config.frozen_stages (fine-tuning), frozen parameters get no update at all: no decay, no momentum.
  """
  name = _check_optimizer_config(config)
  decay_all, wd = config.weight_decay_bn_and_bias, config.weight_decay
  decay_mask = lambda p: weight_decay_mask(p, decay_all)
  # timm's Lamb and Lars adapt only parameters whose weight decay is not 0 (always_adapt=False).
  adapt_mask = lambda p: jax.tree.map(lambda m: m and wd > 0, decay_mask(p))
  b1, b2, eps = config.get("adam_b1", 0.9), config.get("adam_b2", 0.999), config.get("adam_eps", 1e-8)
  if name == "sgd":
    tx = optax.chain(
        optax.add_decayed_weights(wd, mask=decay_mask),
        optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov),
    )
  elif name == "adamw":
    tx = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=decay_mask)
  elif name == "lamb":
    if decay_all and wd > 0:  # adapt every parameter: optax's lamb as it is
      tx = optax.lamb(schedule, b1=b1, b2=b2, eps=eps, weight_decay=wd, mask=decay_mask)
    else:  # optax.lamb's chain with the trust ratio masked
      tx = optax.chain(
          optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
          optax.add_decayed_weights(wd, mask=decay_mask),
          optax.masked(optax.scale_by_trust_ratio(), adapt_mask),
          optax.scale_by_learning_rate(schedule),
      )
  else:
    tx = optax.lars(schedule, weight_decay=wd, weight_decay_mask=decay_mask, trust_ratio_mask=adapt_mask,
                    momentum=config.momentum, nesterov=config.nesterov)
  if config.get("grad_clip_norm", 0.0) > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  if config.frozen_stages > 0:
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                               lambda p: frozen_labels(p, config.frozen_stages))
  return tx


def check_loss_config(config) -> str:
  """config.loss, checked (with config.bce_target_threshold, which only the "bce" loss reads)."""
  loss = config.get("loss", "softmax_cross_entropy")
  if loss not in LOSSES:
    raise ConfigError(f"unknown config.loss {loss!r}; choose one of {', '.join(LOSSES)}")
  if not 0 <= config.get("bce_target_threshold", 0.0) < 1:
    raise ConfigError(f"config.bce_target_threshold must be in [0, 1) (0 = none), got "
                      f"{config.bce_target_threshold}")
  return loss


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
  """Per-example softmax cross-entropy against (smoothed) one-hot labels, in float32."""
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing > 0:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def soft_target_cross_entropy(logits, targets):
  """timm's SoftTargetCrossEntropy per example: sum(-targets * log_softmax(logits)), in float32."""
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets.astype(jnp.float32))


def binary_cross_entropy(logits, targets, target_threshold: float = 0.0):
  """timm's BinaryCrossEntropy per example (its batch mean is timm's loss, reduction='mean'): the mean over
  classes of sigmoid cross-entropy against `targets` (soft, e.g. smoothed and mixed), which become
  (targets > target_threshold) where the threshold is > 0 (timm's target_threshold; 0 = none)."""
  targets = targets.astype(jnp.float32)
  if target_threshold > 0:
    targets = (targets > target_threshold).astype(jnp.float32)
  return optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets).mean(-1)


def ema_update(ema, new, decay: float):
  """ema <- decay * ema + (1 - decay) * new, leaf by leaf."""
  return jax.tree.map(lambda e, n: decay * e + (1.0 - decay) * n, ema, new)
