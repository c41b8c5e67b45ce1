"""Crop, resize and flip on the device, in JAX: the augmentation half of the GPU input path (gpu_decode.py decodes
the JPEGs on the GPU; this turns the decoded images into the training batch). Plain JAX, so it runs (and is
tested) on CPU too.

Images of different sizes can share one zero-padded canvas (B, H, W, C): only the pixels inside each image's crop
box are read. Each output is the crop box [y0, y1) x [x0, x1) of its image resized to size x size with the
filter `transforms.resize` uses on the host: bilinear with half-pixel centres (or, with antialias, the triangle
filter widened by the reduction factor), edges clamped at the box, not the canvas: as
`jax.image.scale_and_translate` (TF's ScaleAndTranslate) would on the box alone. So for the same boxes and flips
the result equals the host path's `train_pixels` before its rounding to uint8 (tests/test_input_fast_decode.py).
Where the host decodes a large window at 1/r (DCT scaling, r = 2, 4, 8), the device, which decodes at full size,
averages r x r blocks first: what the scaled inverse DCT amounts to, near enough (a few grey levels apart).

The resize is two dense contractions with per-image weight matrices (size x H and size x W), vmapped over the
batch: the formulation `jax.image.scale_and_translate` uses, here with the box and the valid size per image.
"""

import functools

import jax
import jax.numpy as jnp


def dct_scale(h, w, min_size):
  """The DCT scale r (1, 2, 4 or 8) the host decodes an h x w window at (transforms.dct_scale_index)."""
  shorter = jnp.minimum(h, w)
  return jnp.select([shorter >= 8 * min_size, shorter >= 4 * min_size, shorter >= 2 * min_size], [8.0, 4.0, 2.0], 1.0)


def _weights(in_size: int, lo, hi, out_size: int, r, antialias: bool, flip=False) -> jax.Array:
  """(out_size, in_size) float32 weights resampling the window [lo, hi) of a row (traced, whole pixels) as the host
  does: average r x r blocks (what decoding at 1/r does, near enough), then the triangle kernel on that grid,
  stretched by the remaining reduction when antialiasing (plain bilinear when r = 1 and antialias is off)."""
  scale = out_size * r / (hi - lo)  # output pixels per 1/r-scaled pixel
  kernel_scale = jnp.maximum(1.0 / scale, 1.0) if antialias else 1.0
  sample = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) / scale + lo / r - 0.5  # in 1/r-scaled pixels
  pixels = jnp.arange(in_size, dtype=jnp.float32)
  block = jnp.floor(pixels / r)  # the 1/r-scaled pixel each input pixel falls in
  w = jnp.maximum(0.0, 1.0 - jnp.abs(sample[:, None] - block[None, :]) / kernel_scale)
  w = jnp.where((pixels >= lo) & (pixels < hi), w, 0.0)  # only the window: edges clamp at the box
  w = w / jnp.maximum(w.sum(axis=1, keepdims=True), 1e-12)
  return jnp.where(flip, w[::-1], w)


def _one(image, box, flip, *, size: int, antialias: bool):
  y0, x0, y1, x1 = (box[k].astype(jnp.float32) for k in range(4))
  r = dct_scale(y1 - y0, x1 - x0, 2 * size if antialias else size)  # transforms.decode_min_size
  wy = _weights(image.shape[0], y0, y1, size, r, antialias)
  wx = _weights(image.shape[1], x0, x1, size, r, antialias, flip)
  rows = jnp.einsum("oh,hwc->owc", wy, image.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum("pw,owc->opc", wx, rows, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames=("size", "antialias"))
def crop_resize_flip(images: jax.Array, boxes: jax.Array, flips: jax.Array, *, size: int,
                     antialias: bool = False) -> jax.Array:
  """images (B, H, W, C) any dtype; boxes (B, 4) int [y0, x0, y1, x1] inside each image's valid pixels; flips (B,)
  bool -> float32 (B, size, size, C) in the images' value range (0..255 for uint8), not rounded."""
  return jax.vmap(functools.partial(_one, size=size, antialias=antialias))(images, boxes, flips)


@functools.partial(jax.jit, static_argnames=("size", "antialias"))
def augment_and_normalize(images, boxes, flips, scale, offset, *, size: int, antialias: bool = False):
  """crop_resize_flip, then (pixels * scale + offset) per channel: the normalised training batch."""
  return crop_resize_flip(images, boxes, flips, size=size, antialias=antialias) * scale + offset
