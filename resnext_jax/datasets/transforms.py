"""Per-example image transforms in TensorFlow: encoded bytes -> uint8 (size, size, 3) pixels.

Randomness is stateless: each example carries its own seed, so an example's augmentation depends only on
(config.seed, epoch, position), not on the thread that ran it or on where the stream was started.

Where the CPU time goes (docs/input_pipeline.md has the figures): entropy-decoding the JPEG is most of it and
cannot be skipped, so everything else is made cheap:
- the crop window is chosen from the JPEG header's size (`extract_jpeg_shape`), then only that window is decoded
  (`decode_and_crop_jpeg`: rows below it are never read, pixels beside it never inverse-transformed), its rows
  starting at the iMCU boundary left of it so that libjpeg writes them straight into the output;
- when the window is at least 2x, 4x or 8x the output size on both sides, it is decoded at 1/2, 1/4 or 1/8 scale
  (libjpeg-turbo's DCT scaling, as PIL's `Image.draft`), the window snapped outward to that scale's pixel grid
  (with antialias, only down to twice the output size, see `decode_min_size`);
- one bilinear resize from uint8 (half-pixel centres, as `jax.image.resize`; without antialiasing the remaining
  reduction is under 2x after DCT scaling; `antialias=True` applies PIL's / torchvision's triangle filter),
  rounded to uint8 and mirrored in one pass by our op where it builds (resize_op.py: the same pixels as TF's
  resize, round, cast and reverse, in ~40% of their time);
- the result stays uint8: normalisation happens on the device (`input_pipeline`), so the host does no float
  work per pixel beyond the resize and ships 4x fewer bytes.
Other formats (PNG, BMP, GIF) are decoded whole and then sliced. `legacy_transforms` keeps the previous
transforms (full-resolution crop, antialiased float resize, host normalisation) for comparison.
With `antialias=True`, evaluation is torchvision's own transform, to a grey level (`torchvision_eval_pixels`).
"""

import math

import tensorflow as tf

from resnext_jax.datasets import resize_op
from resnext_jax.datasets.dct_scaling import DCT_SCALES, decode_min_size
# The statistics and the normalisation formula live in a module without TensorFlow (the device side needs them).
from resnext_jax.datasets.normalization import (  # pylint: disable=unused-import
    CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, DIGITS_MEAN, DIGITS_STD, IMAGENET_MEAN, IMAGENET_STD,
    normalization, normalize_numpy)

AUGMENTATIONS = ("inception", "cifar", "none")


def decode(encoded: tf.Tensor) -> tf.Tensor:
  """Any JPEG/PNG/BMP/GIF (grey, RGB or RGBA) -> uint8 (H, W, 3)."""
  return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def image_shape(encoded: tf.Tensor) -> tf.Tensor:
  """(H, W, C) int32 from a JPEG's header without decoding it; other formats are decoded to find out."""
  return tf.cond(tf.io.is_jpeg(encoded), lambda: tf.image.extract_jpeg_shape(encoded),
                 lambda: tf.shape(decode(encoded)))


def dct_scale_index(h, w, min_size) -> tf.Tensor:
  """k such that DCT_SCALES[k] = r is the largest of 1, 2, 4, 8 with both sides of an h x w window >= r * min_size."""
  shorter = tf.minimum(h, w)
  k = tf.constant(0)
  for i, r in enumerate(DCT_SCALES[1:], 1):
    k = tf.where(shorter >= r * min_size, i, k)
  return k


def snap_window(window, shape, r):
  """(y, x, h, w) in the 1/r-scaled image (ceil(H/r) x ceil(W/r), as libjpeg decodes it): the window grown
  outward to whole scaled pixels, i.e. to the r-pixel grid of the original."""
  y, x, h, w = window
  ys, xs = y // r, x // r
  ye = tf.minimum((y + h + r - 1) // r, (shape[0] + r - 1) // r)
  xe = tf.minimum((x + w + r - 1) // r, (shape[1] + r - 1) // r)
  return ys, xs, ye - ys, xe - xs


def crop_box(window) -> tf.Tensor:
  """The window [y, x, h, w] as a box (y0, x0, y1, x1) in the original image's pixels. The device path snaps it to
  the DCT scale's grid itself (device_augment.plan), from these exact sides, as decode_window does."""
  y, x, h, w = window
  return tf.stack([y, x, y + h, x + w])


def decode_window(encoded: tf.Tensor, window_fn, min_size: int | None = None) -> tf.Tensor:
  """uint8 pixels of the window [y, x, h, w] = window_fn(shape (H, W, C)).

  JPEGs decode only the window; with `min_size`, at the smallest DCT scale 1/r that keeps both its sides at least
  min_size (then h/r x w/r pixels of the window snapped to the r-grid, see `snap_window`). Other formats decode
  whole, at full scale. The transforms resize `decode_window_columns`' pixels instead, in place.
  """
  pixels, columns = decode_window_columns(encoded, window_fn, min_size)
  return pixels[:, columns[0]:columns[0] + columns[1]]


# The widest iMCU of common JPEGs (4:2:0 and 4:2:2 chroma subsampling), in full-scale pixels: libjpeg can start a
# row's decode only at an iMCU boundary (jpeg_crop_scanline), 16 / r pixels apart at DCT scale 1 / r.
MCU_COLUMNS = 16


def decode_window_columns(encoded: tf.Tensor, window_fn, min_size: int | None = None):
  """(pixels, columns): rows of decode_window's window that start at an iMCU boundary at or left of the window, and
  int32 [first, count], the columns of them that are the window.

  Why: asked for a window whose left edge is not on an iMCU boundary, TF's JPEG decode writes each row to a
  scratch row and copies the window's part out; that copy was 9.5% of the eval transform's CPU profile (quiet
  2-core Zen 4). Starting at the boundary, libjpeg writes straight into the output, with the same pixels (the
  crop starts its decode at that boundary either way); the resize op reads the window in place.
  """

  def jpeg():
    shape = tf.image.extract_jpeg_shape(encoded)
    window = window_fn(shape)
    if min_size is None:
      return _decode_from_mcu_boundary(encoded, window, 1)
    k = dct_scale_index(window[2], window[3], min_size)
    return tf.switch_case(k, [lambda r=r: _decode_from_mcu_boundary(encoded, snap_window(window, shape, r), r)
                              for r in DCT_SCALES])

  def other():
    image = decode(encoded)
    y, x, h, w = window_fn(tf.shape(image))
    return image[y:y + h], tf.stack([x, w])

  return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)


def _decode_from_mcu_boundary(encoded, window, r):
  y, x, h, w = window
  first = x % (MCU_COLUMNS // r)
  pixels = tf.image.decode_and_crop_jpeg(encoded, tf.stack([y, x - first, h, w + first]), channels=3, ratio=r)
  return pixels, tf.stack([first, w])


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


def full_window(shape):
  return tf.constant(0), tf.constant(0), shape[0], shape[1]


def resize(image: tf.Tensor, size: int, antialias: bool = False) -> tf.Tensor:
  """uint8 or float (h, w, 3) -> float32 (size, size, 3) in [0, 255]: bilinear with half-pixel centres; with
  antialias, the triangle filter widened by the reduction factor (as PIL / torchvision), slower."""
  if antialias:
    hw = tf.cast(tf.shape(image)[:2], tf.float32)
    out = tf.raw_ops.ScaleAndTranslate(images=image[None], size=[size, size], scale=size / hw,
                                       translation=tf.zeros([2]), kernel_type="triangle", antialias=True)[0]
  else:
    out = tf.raw_ops.ResizeBilinear(images=image[None], size=[size, size], half_pixel_centers=True)[0]
  return tf.ensure_shape(out, (size, size, 3))


def to_uint8(image: tf.Tensor) -> tf.Tensor:
  return tf.saturate_cast(tf.round(image), tf.uint8)


def resize_to_uint8(image: tf.Tensor, size: int, antialias: bool = False, flip=None, columns=None) -> tf.Tensor:
  """uint8 (h, w, 3) -> uint8 (size, size, 3): to_uint8(resize(image)), mirrored where `flip` (a bool tensor).
  columns: int32 [first, count], the part of `image` to resize (decode_window_columns), default all of it.
  Bilinear resizes run as one op where resize_op builds it (bit-identical, faster), else as TF's ops."""
  if not antialias and image.dtype == tf.uint8:
    out = resize_op.resize_bilinear_u8(image, size, tf.constant(False) if flip is None else flip, columns)
    if out is not None:  # (size, size, 3) statically: the op's shape function says so
      return out
  if columns is not None:
    image = image[:, columns[0]:columns[0] + columns[1]]
  out = to_uint8(resize(image, size, antialias))
  return out if flip is None else tf.cond(flip, lambda: tf.reverse(out, [1]), lambda: out)


def normalize(pixels: tf.Tensor, mean, std) -> tf.Tensor:
  scale, offset = normalization(mean, std)
  return tf.cast(pixels, tf.float32) * scale + offset


def train_pixels(encoded, seed, *, augment: str, size: int, crop_ratio: float | None,
                 antialias: bool = False, auto_augment=None, pixels=None) -> tf.Tensor:
  """Training transform -> uint8 (size, size, 3); seed is a (2,) int tensor, augment one of AUGMENTATIONS.

  auto_augment: None, or an `augment.RandAugment` / `augment.TrivialAugment` policy applied last, on the uint8
  pixels (timm's and torchvision's order: crop, flip, auto-augment), see auto_augment_pixels.
  pixels: seedless_pixels(encoded, ...) made earlier (a cache of decoded images), used instead of `encoded`."""
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
  if augment not in AUGMENTATIONS:
    raise ValueError(f"Unknown augmentation {augment!r}; expected one of {AUGMENTATIONS}.")
  if augment == "inception":  # crop, resize and flip
    pixels, columns = decode_window_columns(encoded, inception_window(crop_seed), decode_min_size(size, antialias))
    image = resize_to_uint8(pixels, size, antialias, flip=flip_decision(flip_seed), columns=columns)
  else:
    if pixels is None:
      pixels = seedless_pixels(encoded, augment=augment, size=size, crop_ratio=crop_ratio, antialias=antialias)
    image = pixels
  if augment == "cifar":  # pad by size/8 (4 px at 32), random crop back, as in the ResNet/ResNeXt CIFAR recipe
    pad = size // 8
    image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    image = tf.image.stateless_random_crop(image, (size, size, 3), seed=crop_seed)
    image = tf.cond(flip_decision(flip_seed), lambda: tf.reverse(image, [1]), lambda: image)
  return image if auto_augment is None else auto_augment_pixels(image, seed, auto_augment)


# The augmentations that decode the whole image, so that their transform starts with a part no seed changes
# ('inception' decodes only its random window).
WHOLE_IMAGE_AUGMENTATIONS = ("cifar", "none")


def seedless_pixels(encoded, *, augment: str, size: int, crop_ratio: float | None,
                    antialias: bool = False) -> tf.Tensor:
  """The part of train_pixels that no seed changes, uint8 (size, size, 3), for WHOLE_IMAGE_AUGMENTATIONS
  ('cifar': the image at size x size, before padding and cropping; 'none': the final pixels). A cached split can
  keep these instead of the encoded bytes, so that later epochs do not decode again."""
  if augment == "cifar":
    return _resize_whole(decode(encoded), size, antialias)
  if augment == "none":
    return eval_pixels(encoded, size=size, crop_ratio=crop_ratio, antialias=antialias)
  raise ValueError(f"augment={augment!r} decodes no whole image; expected one of {WHOLE_IMAGE_AUGMENTATIONS}.")


def flip_decision(flip_seed) -> tf.Tensor:
  """Whether to mirror: the draw `tf.image.stateless_random_flip_left_right` makes (uniform < 0.5)."""
  return tf.random.stateless_uniform([], seed=flip_seed, minval=0, maxval=1.0) < 0.5


# Seeds of the augmentations beyond the paper (augment.py), folded out of the example's seed so that the crop's and
# the flip's seeds, and so the output with these options off, stay what they were.
AUTO_AUGMENT_STREAM = 15
ERASE_STREAM = 16


def auto_augment_pixels(image: tf.Tensor, seed, policy) -> tf.Tensor:
  """uint8 (H, W, 3) -> uint8: `policy(pixels, seed)` (augment.RandAugment / TrivialAugment, PIL) run on the host
  through tf.numpy_function, with a seed from the example's own, so the result depends on that seed only."""
  aug_seed = tf.random.experimental.stateless_fold_in(seed, AUTO_AUGMENT_STREAM)
  out = tf.numpy_function(policy, [image, aug_seed], tf.uint8, stateful=False, name="auto_augment")
  out.set_shape(image.shape)
  return out


def erase_key(seed) -> tf.Tensor:
  """uint32 (2,): the example's random-erasing key (a threefry key's data), from its seed; the device draws the
  boxes and the noise from it (augment.random_erase)."""
  erase_seed = tf.random.experimental.stateless_fold_in(seed, ERASE_STREAM)
  bits = tf.random.stateless_uniform([2], seed=erase_seed, minval=None, maxval=None, dtype=tf.int32)
  return tf.bitcast(bits, tf.uint32)


def train_box(encoded, seed):
  """(box int32 [y0, x0, y1, x1] in the original image's pixels, flip bool) of the Inception crop train_pixels
  takes for this seed, from the JPEG header alone: what a device-side decode and resize needs."""
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
  shape = image_shape(encoded)
  return crop_box(inception_window(crop_seed)(shape)), flip_decision(flip_seed)


def eval_box(encoded, *, crop_ratio: float | None):
  """The region eval_pixels resizes, as train_box (no flip)."""
  shape = image_shape(encoded)
  return crop_box((full_window if crop_ratio is None else center_window(crop_ratio))(shape))


def eval_pixels(encoded, *, size: int, crop_ratio: float | None, antialias: bool = False) -> tf.Tensor:
  """Evaluation transform -> uint8: center crop (crop_ratio) and resize, or a plain resize when crop_ratio is None.
  With antialias, torchvision's own (`torchvision_eval_pixels`)."""
  if antialias:
    return torchvision_eval_pixels(encoded, size=size, crop_ratio=crop_ratio)
  min_size = decode_min_size(size, antialias=False)
  if crop_ratio is None:
    return _resize_whole(decode_window(encoded, full_window, min_size), size, antialias=False)
  pixels, columns = decode_window_columns(encoded, center_window(crop_ratio), min_size)
  return resize_to_uint8(pixels, size, columns=columns)


def torchvision_eval_pixels(encoded, *, size: int, crop_ratio: float | None) -> tf.Tensor:
  """torchvision's evaluation transform on a PIL image -> uint8 (size, size, 3): Resize(floor(size / crop_ratio)),
  then CenterCrop(size) (256 and 224 for crop_ratio 0.875; timm's `crop_pct` rule), or Resize((size, size)) where
  crop_ratio is None.

  The same geometry (the long side's length floored, the crop's offsets rounded half to even, as torchvision
  computes them), the same filter (PIL's antialiased bilinear, which reads past the crop's edges), and PIL's JPEG
  decode (libjpeg's accurate integer IDCT, at full scale): so the pixels are torchvision's but for PIL's fixed-point
  rounding, 0.165 grey levels (of 255) mean and at most 1 on 120 ImageNet-like JPEGs at 224
  (benchmarks/torchvision_parity.py). A crop-first eval with this filter (the legacy transforms') is 6.65 apart:
  its window is up to a pixel off torchvision's crop, and its IDCT is the fast one. Only the rows and columns the
  filter reads are decoded."""
  (start, end), (scale, origin) = _torchvision_eval_geometry(encoded, size, crop_ratio)

  def jpeg():
    window = tf.concat([start, end - start], 0)
    return tf.image.decode_and_crop_jpeg(encoded, window, channels=3, dct_method="INTEGER_ACCURATE")

  pixels = tf.cond(tf.io.is_jpeg(encoded), jpeg,
                   lambda: decode(encoded)[start[0]:end[0], start[1]:end[1]])
  out = tf.raw_ops.ScaleAndTranslate(images=pixels[None], size=[size, size], scale=tf.cast(scale, tf.float32),
                                     translation=tf.cast(-scale * origin, tf.float32), kernel_type="triangle",
                                     antialias=True)[0]
  return tf.ensure_shape(to_uint8(out), (size, size, 3))


def torchvision_eval_crop(encoded, *, size: int, crop_ratio: float | None):
  """(box, crop) of torchvision_eval_pixels, for the device path (device_augment.crop_resize_flip): box int32
  [y0, x0, y1, x1], the pixels the filter reads; crop float32 [scale y, scale x, origin y, origin x], the resize's
  scale and the crop's origin in image pixels from the box's."""
  (start, end), (scale, origin) = _torchvision_eval_geometry(encoded, size, crop_ratio)
  return tf.concat([start, end], 0), tf.cast(tf.concat([scale, origin], 0), tf.float32)


def _torchvision_eval_geometry(encoded, size: int, crop_ratio: float | None):
  """((start, end) int32, (scale, origin) float64), each (y, x): the window the filter reads, torchvision's resize
  scale, and its crop's origin in image pixels from the window's start."""
  shape = image_shape(encoded)
  scale, offset = _torchvision_resize_and_crop(shape, size, crop_ratio)
  start, end = _filter_window(shape, scale, offset, size)
  return (start, end), (scale, offset / scale - tf.cast(start, tf.float64))


def _torchvision_resize_and_crop(shape, size: int, crop_ratio: float | None):
  """(scale, offset), float64 (y, x) each: torchvision's Resize scales the image by `scale`, and its CenterCrop
  starts at `offset` in the resized image (torchvision.transforms.functional: `_compute_resized_output_size`,
  `center_crop`)."""
  hw = tf.cast(shape[:2], tf.float64)
  if crop_ratio is None:
    return size / hw, tf.zeros([2], tf.float64)
  resize = tf.constant(math.floor(size / crop_ratio + 1e-6), tf.float64)  # + 1e-6: 160 / (160 / 232) < 232
  short, long = tf.reduce_min(hw), tf.reduce_max(hw)
  new_long = tf.floor(resize * long / short)  # torchvision: int(new_short * long / short)
  resized = tf.where(hw[1] <= hw[0], tf.stack([new_long, resize]), tf.stack([resize, new_long]))
  return resized / hw, tf.round((resized - size) / 2)  # tf.round rounds half to even, as Python's round


def _filter_window(shape, scale, offset, size: int):
  """(start, end), int32 (y, x) each: the source pixels the antialiased filter reads for the crop, plus 2 on each
  side (a cropped JPEG decode may upsample its last column differently), within the image."""
  support = tf.maximum(1.0 / scale, 1.0)  # the triangle's radius in source pixels: PIL widens it when reducing
  start = tf.maximum(tf.floor(offset / scale - support) - 2, 0.0)
  end = tf.minimum(tf.math.ceil((offset + size) / scale + support) + 2, tf.cast(shape[:2], tf.float64))
  return tf.cast(start, tf.int32), tf.cast(end, tf.int32)


def _resize_whole(image, size, antialias):
  """uint8 image at size x size; images already that size (CIFAR, digits) are passed through untouched."""
  same = tf.reduce_all(tf.shape(image)[:2] == size)
  return tf.ensure_shape(tf.cond(same, lambda: image, lambda: to_uint8(resize(image, size, antialias))),
                         (size, size, 3))


def train_image(encoded, seed, *, augment: str, size: int, crop_ratio: float | None, mean, std,
                antialias: bool = False) -> tf.Tensor:
  """train_pixels, normalised (float32)."""
  return normalize(train_pixels(encoded, seed, augment=augment, size=size, crop_ratio=crop_ratio,
                                antialias=antialias), mean, std)


def eval_image(encoded, *, size: int, crop_ratio: float | None, mean, std, antialias: bool = False) -> tf.Tensor:
  """eval_pixels, normalised (float32)."""
  return normalize(eval_pixels(encoded, size=size, crop_ratio=crop_ratio, antialias=antialias), mean, std)
