"""Crop, resize and flip on the device, in JAX: the augmentation half of the GPU input path (gpu_decode.py decodes
the JPEGs on the GPU; this turns the decoded images into the training batch). Plain JAX, so it runs (and is
tested) on CPU too.

Each output is the crop box [y0, y1) x [x0, x1) of its image resized to size x size with the filter
`transforms.resize` uses on the host: bilinear with half-pixel centres (or, with antialias, the triangle filter
widened by the reduction factor), edges clamped at the box: as `jax.image.scale_and_translate` (TF's
ScaleAndTranslate) would on the box alone. Where the host decodes a large box at 1/r (DCT scaling, r = 2, 4, 8),
the device, which decodes at full size, averages r x r blocks first: what the scaled inverse DCT amounts to, near
enough (a few grey levels apart). So for the same boxes and flips the result equals the host path's
`train_pixels` before its rounding to uint8 where r = 1 (tests/test_input_fast_decode.py).

Two programs, because decoded images come in as many shapes as the dataset has image sizes (ImageNet-like
sizes, synthetic_jpegs: 32,741 distinct in 200,000 draws), and XLA compiles one program per input shape:
- `window`, per image: the box's window of the image at 1/r, into a fixed canvas (canvas_size x canvas_size,
  zero beyond the window). It gathers the canvas's pixels by their flat index in the buffer the image was
  decoded into (`Decoded`: height, width and row pitch are arguments, not shapes), so it compiles per buffer
  shape and r: gpu_decode decodes into buffers of five sizes. No dot, so nothing for XLA's GPU autotuner to
  time. On a 2-core Zen 4's CPU it compiles in 0.06-0.08 s and runs in 0.7 ms at r = 1 (a 1 MiB buffer, canvas
  608); at r = 2, 4 and 8 it reads the canvas's r x r blocks whatever the box: 17, 53 and 258 ms there (2.8% of
  ImageNet-like train boxes take r = 2, 0.7% r = 4, 0.0015% r = 8). The design before it sliced the image's own
  shape, 0.3 ms at r = 1, but compiled once per image size: a first pass over 168 sizes ran at 29-30 images/s
  against 148 with this one (gpu_decode_benchmark, CPU backend).
- `resize_windows`, once per batch shape: the windows' resize and flip, vmapped over the batch. Each output pixel
  reads only its filter's taps (gathers, K per axis), not a dense (size x canvas) matrix: its work does not grow
  with the canvas. It takes 0.67 ms per image on that CPU, where a per-image dense resize took 3.7 ms.
The canvas holds any window the host path would decode: the host picks r so that the box's shorter side is under
2 * min_size at 1/r (for r < 8), and Inception boxes have aspect ratios within 3:4..4:3, so both sides fit in
8/3 * min_size. A box that does not fit (a whole-image fallback crop of a panorama, a box 8x min_size at 1/8) is
averaged at the next power of two that fits: a smoother input than the host's, for those rare boxes only.
Evaluation with antialias is torchvision's transform (transforms.torchvision_eval_pixels), whose filter reads past
its crop: the host sends the window the filter reads as the box, and the crop's scale and origin (`crops`); the
window is taken at full scale where the canvas holds it (at 224, 256: shorter sides up to ~1,350 px), and the resize
samples the crop from it.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from resnext_jax.datasets.dct_scaling import dct_scale, decode_min_size


def canvas_size(size: int, antialias: bool) -> int:
  """The side of the fixed canvas each window is put on: 8/3 * min_size (see the module docstring), to 16 pixels."""
  return -(-8 * decode_min_size(size, antialias) // 48) * 16


def plan(box, size: int, antialias: bool, full_scale: bool = False) -> tuple[int, tuple[int, int], tuple[int, int]]:
  """(r, origin, extent) for a box (y0, x0, y1, x1) in full-size pixels: the image is averaged over r x r blocks,
  and the window [origin, origin + extent) of that 1/r image is the box as the host decodes it (snapped outward
  to the r-grid, transforms.snap_window; its last row or column partial where the box reaches the image's edge).
  full_scale: r = 1 wherever the canvas holds the box (the host decodes torchvision's eval crop at full scale)."""
  y0, x0, y1, x1 = (int(v) for v in box)
  canvas = canvas_size(size, antialias)
  r = 1 if full_scale else dct_scale(y1 - y0, x1 - x0, decode_min_size(size, antialias))
  while -(-y1 // r) - y0 // r > canvas or -(-x1 // r) - x0 // r > canvas:
    r *= 2
  origin = (y0 // r, x0 // r)
  return r, origin, (-(-y1 // r) - origin[0], -(-x1 // r) - origin[1])


class Decoded(NamedTuple):
  """A decoded image inside a buffer of any shape: its pixel (y, x, c) is the buffer's flat element
  y * pitch + x * channels + c. `window` compiles for the buffer's shape, not the image's: gpu_decode decodes into
  buffers of a few fixed sizes, so that images of every size share a handful of programs."""
  buffer: jax.Array
  height: int
  width: int
  pitch: int
  channels: int = 3

  @classmethod
  def of(cls, image) -> "Decoded":
    """An (H, W, C) array as a Decoded (its buffer is its own shape: one window program per image size)."""
    if isinstance(image, cls):
      return image
    h, w, channels = image.shape
    return cls(image, h, w, w * channels, channels)

  def pixels(self) -> jax.Array:
    """The (height, width, channels) image (for checks: a program per image size)."""
    rows = self.buffer.reshape(-1)[:self.height * self.pitch]
    if rows.shape[0] < self.height * self.pitch:  # a buffer that ends with the last row's last pixel
      rows = jnp.pad(rows, (0, self.height * self.pitch - rows.shape[0]))
    return rows.reshape(self.height, self.pitch)[:, :self.width * self.channels].reshape(
        self.height, self.width, self.channels)


@functools.partial(jax.jit, static_argnames=("r", "canvas", "channels"))
def window(buffer: jax.Array, geometry, *, r: int, canvas: int, channels: int) -> jax.Array:
  """A decoded image's 1/r version (r x r block means, rounded; a partial block at the bottom or right edge repeats
  the edge, as JPEG encoders pad) from an origin on, zero past its edge -> uint8 (canvas, canvas, channels).

  buffer: uint8, any shape, holding the image as Decoded says; geometry: int32 (height, width, pitch, origin row,
  origin column) in 1/r pixels for the origin, dynamic. Gathers the canvas's pixels (each block's r x r) by their
  flat index, so the program depends on the buffer's shape, r and the canvas only."""
  flat = buffer.reshape(-1)
  height, width, pitch = geometry[0], geometry[1], geometry[2]
  blocks_y, blocks_x = geometry[3] + jnp.arange(canvas), geometry[4] + jnp.arange(canvas)
  rows = jnp.minimum((blocks_y[:, None] * r + jnp.arange(r)).reshape(-1), height - 1)
  cols = jnp.minimum((blocks_x[:, None] * r + jnp.arange(r)).reshape(-1), width - 1)
  pixels = flat.at[rows[:, None, None] * pitch + cols[None, :, None] * channels + jnp.arange(channels)].get(
      mode="clip")
  if r > 1:
    blocks = pixels.reshape(canvas, r, canvas, r, channels).astype(jnp.float32).mean(axis=(1, 3))
    pixels = jnp.round(blocks).astype(jnp.uint8)
  inside = (blocks_y * r < height)[:, None, None] & (blocks_x * r < width)[None, :, None]
  return jnp.where(inside, pixels, jnp.zeros((), jnp.uint8))


def _taps(extent, out_size: int, canvas: int, antialias: bool, crop=None):
  """(indices, weights), each (out_size, K): the pixels of [0, extent) each output pixel reads and their weights,
  as `jax.image.scale_and_translate`'s triangle kernel (stretched by the reduction factor when antialiasing).
  The output spans [0, extent), or with crop = (scale, start) starts at `start` with `scale` output pixels per
  input pixel (taps still only inside [0, extent), their weights renormalised at its edges, as TF's and PIL's)."""
  # output pixels per input pixel, and where the output starts (adding 0.0 leaves the samples bit for bit)
  scale, start = (out_size / extent.astype(jnp.float32), 0.0) if crop is None else crop
  kernel_scale = jnp.maximum(1.0 / scale, 1.0) if antialias else 1.0
  taps = 2 * -(-canvas // out_size) + 2 if antialias else 3  # >= the kernel's support, 2 * kernel_scale + 1
  sample = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) / scale - 0.5 + start
  pixels = jnp.floor(sample - kernel_scale).astype(jnp.int32)[:, None] + 1 + jnp.arange(taps)[None, :]
  weights = jnp.maximum(0.0, 1.0 - jnp.abs(sample[:, None] - pixels) / kernel_scale)
  weights = jnp.where((pixels >= 0) & (pixels < extent), weights, 0.0)
  weights = weights / jnp.maximum(weights.sum(axis=1, keepdims=True), 1e-12)
  return jnp.clip(pixels, 0, canvas - 1), weights


def _resize_one(canvas, extent, flip, crop, *, size: int, antialias: bool):
  """Gathers from the uint8 canvas and converts after: converting the canvas first made XLA:CPU hold a float copy
  (antialiased, canvas 1200: 16.5 MB of temporaries per image, against 0.06 MB)."""
  rows_at, rows_w = _taps(extent[0], size, canvas.shape[0], antialias, None if crop is None else crop[0::2])
  rows = sum(rows_w[:, k, None, None] * canvas[rows_at[:, k]] for k in range(rows_at.shape[1]))  # uint8 -> float
  cols_at, cols_w = _taps(extent[1], size, canvas.shape[1], antialias, None if crop is None else crop[1::2])
  cols_at, cols_w = jnp.where(flip, cols_at[::-1], cols_at), jnp.where(flip, cols_w[::-1], cols_w)
  return sum(cols_w[None, :, k, None] * rows[:, cols_at[:, k]] for k in range(cols_at.shape[1]))


@functools.partial(jax.jit, static_argnames=("size", "antialias"))
def resize_windows(windows: jax.Array, extents: jax.Array, flips: jax.Array, crops: jax.Array | None = None, *,
                   size: int, antialias: bool = False) -> jax.Array:
  """windows (B, canvas, canvas, C) from `window`, extents (B, 2) int (the window's height and width), flips (B,)
  bool -> float32 (B, size, size, C) in the windows' value range (0..255), not rounded. Each window is resized
  whole, or with crops (B, 4) float32 (scale y, scale x, start y, start x; see _taps) a crop of it."""
  return jax.vmap(functools.partial(_resize_one, size=size, antialias=antialias))(windows, extents, flips, crops)


def crop_resize_flip(images, boxes, flips, *, size: int, antialias: bool = False, crops=None) -> jax.Array:
  """images: a sequence of Decoded images or (H, W, C) arrays, any sizes, or one (B, H, W, C) array; boxes (B, 4)
  int [y0, x0, y1, x1] in each image's pixels, inside it; flips (B,) bool -> float32 (B, size, size, C), not
  rounded. One `window` dispatch per image (the boxes are read on the host), one `resize_windows` for the batch.

  Each box is resized whole; or, with crops (B, 4) float (scale y, scale x, origin y, origin x: output pixels per
  image pixel, and the crop's origin in image pixels from the box's), the crop is resampled from its box, which
  is then what the filter reads, at full scale where the canvas holds it: torchvision's eval geometry, as
  transforms.torchvision_eval_crop computes it."""
  canvas = canvas_size(size, antialias)
  windows, extents, canvas_crops = [], [], []
  for i, (image, box) in enumerate(zip(images, np.asarray(boxes))):
    image = Decoded.of(image)
    r, origin, extent = plan(box, size, antialias, full_scale=crops is not None)
    geometry = np.array([image.height, image.width, image.pitch, *origin], np.int32)
    windows.append(window(image.buffer, geometry, r=r, canvas=canvas, channels=image.channels))
    extents.append(extent)
    if crops is not None:  # in the canvas's 1/r pixels
      scale, start = np.asarray(crops[i][:2], np.float64), np.asarray(crops[i][2:], np.float64)
      canvas_crops.append([*(scale * r), *((box[:2] + start) / r - origin)])
  crops = None if crops is None else jnp.asarray(canvas_crops, jnp.float32)
  return resize_windows(jnp.stack(windows), jnp.asarray(extents, jnp.int32), jnp.asarray(flips), crops, size=size,
                        antialias=antialias)
