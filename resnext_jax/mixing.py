"""Mixup and CutMix on the device, inside the train step, with the semantics of timm's `Mixup` (mode 'batch').

timm (timm/data/mixup.py) draws one set of parameters per batch and mixes the batch with its own reverse
(x.flip(0)): with probability `prob` the batch is mixed at all; when both alphas are set, CutMix is chosen with
probability `switch_prob`, else Mixup; lam ~ Beta(alpha, alpha) of the chosen one. Mixup is
lam * x + (1 - lam) * x.flip(0). CutMix pastes a box of the reversed batch into every image: the box has sides
cut_h = int(H * sqrt(1 - lam)) and cut_w = int(W * sqrt(1 - lam)), rows cy - cut_h // 2 to cy + (cut_h + 1) // 2
(timm 1.0.31's rand_bbox; older timm ended it at cy + cut_h // 2, one row short for odd sides) around a centre
uniform over the image, clipped to it; lam is then corrected to the fraction of the image outside the clipped box (correct_lam=True). The targets are
timm's `mixup_target`: label smoothing folded into the one-hot vectors (off = smoothing / num_classes,
on = 1 - smoothing + off), lam * y + (1 - lam) * y.flip(0).

Here the draws come from a JAX key (the train step's key for the step), so a run is reproducible and resumes
exactly; under jit over a sharded batch, x.flip(0) is the reverse of the global batch, as timm reverses its batch.
An odd batch is allowed (the middle example is mixed with itself; timm asserts an even batch).
The pure parts (`mixup_target`, `cutmix_box`, `mix_images`) take lam and the box centre explicitly, so they
can be compared with timm's functions on pinned values; `sample_params` draws what timm's `_params_per_batch`
and `rand_bbox` draw.
"""

import dataclasses

import jax
import jax.numpy as jnp

from resnext_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Mixup:
  """timm's Mixup(mixup_alpha, cutmix_alpha, prob, switch_prob, mode='batch', correct_lam=True,
  label_smoothing, num_classes). Hashable: a static argument of the jitted step."""
  num_classes: int
  mixup_alpha: float = 0.0
  cutmix_alpha: float = 0.0
  prob: float = 1.0
  switch_prob: float = 0.5
  label_smoothing: float = 0.0

  def __post_init__(self):
    for key, value in (("mixup_alpha", self.mixup_alpha), ("cutmix_alpha", self.cutmix_alpha)):
      if value < 0:
        raise ConfigError(f"config.{key} must be >= 0 (0 = off), got {value}")
    if self.mixup_alpha <= 0 and self.cutmix_alpha <= 0:
      raise ConfigError("Mixup needs config.mixup_alpha > 0 or config.cutmix_alpha > 0")
    _check_probabilities(self.prob, self.switch_prob)
    if not 0 <= self.label_smoothing < 1:
      raise ConfigError(f"config.label_smoothing must be in [0, 1), got {self.label_smoothing}")
    if self.num_classes < 1:
      raise ConfigError(f"Mixup needs num_classes >= 1, got {self.num_classes}")


def from_config(config, num_classes: int) -> Mixup | None:
  """The config's Mixup/CutMix (config.mixup_alpha, cutmix_alpha, mix_prob, mix_switch_prob, label_smoothing),
  or None where both alphas are 0 (the default: the train step does not mix, and draws nothing)."""
  mixup_alpha, cutmix_alpha = config.get("mixup_alpha", 0.0), config.get("cutmix_alpha", 0.0)
  prob, switch_prob = config.get("mix_prob", 1.0), config.get("mix_switch_prob", 0.5)
  if mixup_alpha == 0 and cutmix_alpha == 0:
    _check_probabilities(prob, switch_prob)  # checked even while off, so a typo does not wait for mixing
    return None
  return Mixup(num_classes=num_classes, mixup_alpha=float(mixup_alpha), cutmix_alpha=float(cutmix_alpha),
               prob=float(prob), switch_prob=float(switch_prob),
               label_smoothing=float(config.get("label_smoothing", 0.0)))


def _check_probabilities(prob, switch_prob):
  for key, value in (("mix_prob", prob), ("mix_switch_prob", switch_prob)):
    if not 0 <= value <= 1:
      raise ConfigError(f"config.{key} must be in [0, 1], got {value}")


# --- Pure functions of lam and the box (timm's formulas). ---


def one_hot(labels, num_classes: int, on_value=1.0, off_value=0.0):
  """timm's one_hot: off_value everywhere, on_value at the label (float32)."""
  return jnp.where(jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_), jnp.float32(on_value),
                   jnp.float32(off_value))


def mixup_target(labels, num_classes: int, lam=1.0, smoothing: float = 0.0):
  """timm's mixup_target: smoothed one-hot targets mixed with those of the reversed batch, (B, num_classes)."""
  off_value = smoothing / num_classes
  on_value = 1.0 - smoothing + off_value
  y1 = one_hot(labels, num_classes, on_value, off_value)
  y2 = one_hot(jnp.flip(labels, 0), num_classes, on_value, off_value)
  lam = jnp.asarray(lam, jnp.float32)
  return y1 * lam + y2 * (1.0 - lam)


def cutmix_box(lam, cy, cx, height: int, width: int):
  """timm's rand_bbox (margin 0, timm 1.0.31) given the centre (cy, cx), then cutmix_bbox_and_lam's correction:
  ((yl, yh, xl, xh), lam corrected to 1 - box area / image area)."""
  ratio = jnp.sqrt(1.0 - jnp.asarray(lam, jnp.float32))
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  yl = jnp.clip(cy - cut_h // 2, 0, height)
  yh = jnp.clip(cy + (cut_h + 1) // 2, 0, height)
  xl = jnp.clip(cx - cut_w // 2, 0, width)
  xh = jnp.clip(cx + (cut_w + 1) // 2, 0, width)
  area = (yh - yl) * (xh - xl)
  return (yl, yh, xl, xh), 1.0 - area.astype(jnp.float32) / float(height * width)


def mix_images(images, lam, use_cutmix, box):
  """timm's _mix_batch given its draws: NHWC `images` mixed with images.flip(0), by Mixup (lam) or, where
  `use_cutmix`, by pasting `box` = (yl, yh, xl, xh) of the reversed batch. Both are x * w + flip * (1 - w) with
  w = lam (Mixup) or w = 0 inside the box and 1 outside (CutMix: exactly x or flip, for finite inputs)."""
  height, width = images.shape[1], images.shape[2]
  lam = jnp.asarray(lam, jnp.float32)
  w = lam
  if box is not None:
    yl, yh, xl, xh = box
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    inside = (rows >= yl) & (rows < yh) & (cols >= xl) & (cols < xh)
    w = jnp.where(use_cutmix, jnp.where(inside, 0.0, 1.0), lam)[None, :, :, None]
  w = w.astype(images.dtype)
  return images * w + jnp.flip(images, 0) * (1 - w)


# --- The random draws. ---


def sample_params(key, spec: Mixup, height: int, width: int):
  """timm's _params_per_batch and rand_bbox, from `key`: (lam drawn, use_cutmix, (cy, cx)).

  lam is 1 (no mixing) with probability 1 - prob. Only the draws the config needs are made.
  """
  k_apply, k_switch, k_mixup, k_cutmix, k_cy, k_cx = jax.random.split(key, 6)
  apply = jax.random.uniform(k_apply) < spec.prob
  if spec.mixup_alpha > 0 and spec.cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(k_switch) < spec.switch_prob
  else:
    use_cutmix = jnp.asarray(spec.cutmix_alpha > 0)
  lam = jnp.float32(1.0)
  if spec.mixup_alpha > 0:
    lam = jax.random.beta(k_mixup, spec.mixup_alpha, spec.mixup_alpha)
  if spec.cutmix_alpha > 0:
    lam_cutmix = jax.random.beta(k_cutmix, spec.cutmix_alpha, spec.cutmix_alpha)
    lam = jnp.where(use_cutmix, lam_cutmix, lam)
  lam = jnp.where(apply, lam, 1.0).astype(jnp.float32)
  centre = (jax.random.randint(k_cy, (), 0, height), jax.random.randint(k_cx, (), 0, width))
  return lam, use_cutmix & apply, centre


def mix_batch(key, spec: Mixup, images, labels):
  """timm's Mixup.__call__ (mode 'batch') on a global NHWC batch: (mixed images, soft targets, lam of the
  targets). Without an application (probability 1 - prob) the images are unchanged and the targets are the
  smoothed one-hot labels."""
  height, width = images.shape[1], images.shape[2]
  lam, use_cutmix, (cy, cx) = sample_params(key, spec, height, width)
  box = None
  if spec.cutmix_alpha > 0:
    box, lam_box = cutmix_box(lam, cy, cx, height, width)
    lam = jnp.where(use_cutmix, lam_box, lam)
  images = mix_images(images, lam, use_cutmix, box)
  return images, mixup_target(labels, spec.num_classes, lam, spec.label_smoothing), lam
