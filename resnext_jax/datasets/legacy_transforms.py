"""The transforms as they were before the fast path (kept to measure against: `input_pipeline_benchmark.py --legacy`).

Decodes the full-resolution crop window (`decode_and_crop_jpeg`), resizes it with TF's antialiased bilinear
filter in float32 and normalises on the host: 2-3x more CPU per image than `transforms.py` (see
docs/input_pipeline.md). Not used by training.
"""

import tensorflow as tf

from resnext_jax.datasets.transforms import AUGMENTATIONS

def decode(encoded: tf.Tensor) -> tf.Tensor:
  """Any JPEG/PNG/BMP/GIF (grey, RGB or RGBA) -> uint8 (H, W, 3)."""
  return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def decode_window(encoded: tf.Tensor, window_fn) -> tf.Tensor:
  """Decodes only the window [y, x, h, w] = window_fn(shape (H, W, C)) of the image."""

  def jpeg():
    window = window_fn(tf.image.extract_jpeg_shape(encoded))
    return tf.image.decode_and_crop_jpeg(encoded, tf.stack(window), channels=3)

  def other():
    image = decode(encoded)
    y, x, h, w = window_fn(tf.shape(image))
    return image[y:y + h, x:x + w]

  return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)


def inception_window(seed, *, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """Window function for an Inception-style random resized crop (area and aspect ratio ranges)."""

  def window_fn(shape):
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=(1, 1, 4)), seed=seed,
        min_object_covered=0.1, aspect_ratio_range=ratio, area_range=scale, max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    return begin[0], begin[1], size[0], size[1]

  return window_fn


def center_window(crop_ratio: float):
  """Central square of side crop_ratio * shorter side: resized to S, this equals 'resize the shorter side to
  S / crop_ratio, then center-crop S' (256 -> 224 for crop_ratio 0.875), with a smaller decode."""

  def window_fn(shape):
    h, w = shape[0], shape[1]
    side = tf.cast(tf.round(crop_ratio * tf.cast(tf.minimum(h, w), tf.float32)), tf.int32)
    return (h - side + 1) // 2, (w - side + 1) // 2, side, side

  return window_fn


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """Bilinear with antialiasing (as PIL / torchvision) to (size, size, 3) float32 in [0, 255]."""
  image = tf.image.resize(image, (size, size), method="bilinear", antialias=True)
  return tf.ensure_shape(image, (size, size, 3))


def normalize(image: tf.Tensor, mean, std) -> tf.Tensor:
  return (image / 255.0 - tf.constant(mean)) / tf.constant(std)


def train_image(encoded, seed, *, augment: str, size: int, crop_ratio: float, mean, std) -> tf.Tensor:
  """Training transform; seed is a (2,) int tensor, augment one of AUGMENTATIONS."""
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
  if augment == "inception":
    image = resize(decode_window(encoded, inception_window(crop_seed)), size)
  elif augment == "cifar":  # pad by size/8 (4 px at 32), random crop back, as in the ResNet/ResNeXt CIFAR recipe
    pad = size // 8
    image = tf.pad(resize(decode(encoded), size), [[pad, pad], [pad, pad], [0, 0]])
    image = tf.image.stateless_random_crop(image, (size, size, 3), seed=crop_seed)
  elif augment == "none":
    return eval_image(encoded, size=size, crop_ratio=crop_ratio, mean=mean, std=std)
  else:
    raise ValueError(f"Unknown augmentation {augment!r}; expected one of {AUGMENTATIONS}.")
  image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
  return normalize(image, mean, std)


def eval_image(encoded, *, size: int, crop_ratio: float | None, mean, std) -> tf.Tensor:
  """Evaluation transform: center crop (crop_ratio) and resize, or a plain resize when crop_ratio is None."""
  if crop_ratio is None:
    image = decode(encoded)
  else:
    image = decode_window(encoded, center_window(crop_ratio))
  return normalize(resize(image, size), mean, std)
