"""The fast input path: DCT-scaled window decoding, uint8 pixels normalised on the device, the device-side crop
and resize against the host's, pre-resized storage, the legacy transforms, the ImageNet-like JPEGs and the
pipeline benchmark. (TensorFlow kept out of the step, the compilation cache and the end-to-end benchmark:
test_input_end_to_end.py.)"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from conftest import REPO, last_json, process_env, require_nvimgcodec, run_main
from test_torch_weights import require_torch
from resnext_jax import errors
from resnext_jax import input_pipeline
from resnext_jax.datasets import dct_scaling
from resnext_jax.datasets import device_augment
from resnext_jax.datasets import legacy_transforms
from resnext_jax.datasets import normalization
from resnext_jax.datasets import synthetic_jpegs
from resnext_jax.datasets import transforms
from resnext_jax.configs import default

_RAW = dict(mean=(0.0,) * 3, std=(1 / 255,) * 3)  # normalisation that leaves pixel values in 0..255


def _photo(h, w, seed=0):
  return synthetic_jpegs.photo_like(np.random.default_rng(seed), h, w)


def _mesh():
  return Mesh(np.array(jax.devices()), ("data",))


@pytest.mark.parametrize("shorter,size,scale", [(100, 48, 2), (200, 48, 4), (400, 48, 8), (90, 48, 1)])
def test_dct_scale_decodes_at_the_smallest_sufficient_size(shorter, size, scale):
  """The center window (crop_ratio 1: the whole square) is decoded at 1/r, r the largest with side/r >= size."""
  encoded = tf.constant(synthetic_jpegs.encode_jpeg(_photo(shorter, shorter + 20)))
  image = transforms.decode_window(encoded, transforms.center_window(1.0), size)
  assert image.dtype == tf.uint8 and min(image.shape[:2]) == -(-shorter // scale)
  assert min(image.shape[:2]) >= size
  # The device's window for the same box: the host's, snapped to the same r-grid, still the whole square.
  r, _, extent = device_augment.plan(transforms.eval_box(encoded, crop_ratio=1.0).numpy(), size, False)
  assert (r, extent) == (scale, tuple(image.shape[:2]))


def test_the_device_picks_the_hosts_dct_scale():
  """dct_scaling.dct_scale (plain Python, the device path's) is the rule transforms.dct_scale_index applies as TF
  ops (the host's)."""
  for h, w in ((10, 10), (47, 400), (48, 95), (96, 96), (191, 700), (192, 192), (383, 390), (384, 500), (3000, 400)):
    assert dct_scaling.dct_scale(h, w, 48) == transforms.DCT_SCALES[int(transforms.dct_scale_index(h, w, 48))]


def test_the_device_plans_a_window_at_the_hosts_dct_scale_near_a_threshold():
  """A window 894 rows high (1/2 at min_size 224) grows to 896 when snapped to the 1/2 grid, where 1/4 would
  start: the device picks r from the window's own sides, as the host's decode does, not from the snapped box."""
  encoded = tf.constant(synthetic_jpegs.encode_jpeg(_photo(1200, 1600)))
  window = (179, 631, 894, 942)
  image = transforms.decode_window(encoded, lambda shape: tuple(tf.constant(v) for v in window), 224)
  r, _, extent = device_augment.plan(transforms.crop_box(window).numpy(), 224, False)  # the box train_box sends
  assert (r, extent) == (2, tuple(image.shape[:2])) == (2, (448, 472))


@pytest.mark.parametrize("subsampling,mode", [(2, "RGB"), (1, "RGB"), (0, "RGB"), (0, "L")])
def test_decoding_from_the_mcu_boundary_gives_the_windows_exact_pixels(subsampling, mode):
  """decode_window_columns starts each row at an iMCU boundary left of the window: the window's columns of it are
  TF's own decode_and_crop_jpeg of the window, bit for bit, for 4:2:0, 4:2:2, 4:4:4 and grey JPEGs, at every DCT
  scale (fancy upsampling reads chroma beside a pixel, so a decode started elsewhere could differ)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  import io  # pylint: disable=import-outside-toplevel
  buffer = io.BytesIO()
  Image.fromarray(_photo(333, 517, seed=subsampling)).convert(mode).save(buffer, format="JPEG", quality=90,
                                                                          subsampling=subsampling)
  encoded = tf.constant(buffer.getvalue())
  rng = np.random.default_rng(subsampling)
  firsts = set()
  for _ in range(40):
    h, w = (int(v) for v in rng.integers(1, 300, 2))
    y, x = int(rng.integers(0, 333 - h + 1)), int(rng.integers(0, 517 - w + 1))
    min_size = int(rng.choice([8, 16, 32, 64, 1000]))  # 1000: full scale
    window_fn = lambda shape, window=(y, x, h, w): tuple(tf.constant(v) for v in window)
    pixels, columns = transforms.decode_window_columns(encoded, window_fn, min_size)
    first, count = columns.numpy()
    firsts.add(int(first))
    r = transforms.DCT_SCALES[int(transforms.dct_scale_index(h, w, min_size))]
    snapped = [int(v) for v in transforms.snap_window((y, x, h, w), (333, 517), r)]
    expected = tf.image.decode_and_crop_jpeg(encoded, snapped, channels=3, ratio=r).numpy()
    np.testing.assert_array_equal(pixels.numpy()[:, first:first + count], expected, err_msg=f"{(y, x, h, w)} 1/{r}")
    np.testing.assert_array_equal(transforms.decode_window(encoded, window_fn, min_size).numpy(), expected)
  assert len(firsts) > 3  # windows off the boundary, decoded from left of them


def test_other_formats_give_the_windows_columns_of_the_whole_image():
  image = _photo(90, 130)
  window = (tf.constant(7), tf.constant(19), tf.constant(50), tf.constant(61))
  pixels, columns = transforms.decode_window_columns(tf.io.encode_png(image), lambda shape: window, 32)
  np.testing.assert_array_equal(columns.numpy(), [19, 61])
  np.testing.assert_array_equal(pixels.numpy()[:, 19:80], image[7:57, 19:80])


def test_fast_transforms_stay_close_to_the_legacy_ones():
  """Same windows (same seeds) and flips; the differences are the resize filter, DCT scaling and uint8 rounding:
  small next to the difference another window makes. (Eval with antialias is torchvision's transform, tested
  against torchvision below; the legacy eval crops first.)"""
  kwargs = dict(augment="inception", size=96, crop_ratio=0.875, **_RAW)
  for h, w in ((375, 500), (900, 1200)):
    encoded = tf.constant(synthetic_jpegs.encode_jpeg(_photo(h, w)))
    old = [legacy_transforms.train_image(encoded, tf.constant([1, s], tf.int64), **kwargs).numpy() for s in range(4)]
    for s in range(4):
      new = transforms.train_image(encoded, tf.constant([1, s], tf.int64), **kwargs).numpy()
      same = np.abs(new - old[s]).mean()
      other = min(np.abs(new - old[t]).mean() for t in range(4) if t != s)
      assert same < 0.4 * other, (h, w, s, same, other)


# Sizes that exercise torchvision's geometry (at 64): landscape, portrait and square, long sides that floor, crop
# offsets of x.5 (rounded half to even: 375 x 500, 256 x 300), filter windows clamped at the image's edges (40 x 900,
# whole-image resizes), an image over 4x the output (the default transform would decode it at 1/2), a PNG.
_TORCHVISION_EVAL_IMAGES = ((375, 500), (500, 333), (256, 300), (257, 257), (300, 401), (1100, 1500), (40, 900))


def _torchvision_eval_cases():
  rng = np.random.default_rng(7)
  files = [synthetic_jpegs.encode_jpeg(synthetic_jpegs.photo_like(rng, h, w)) for h, w in _TORCHVISION_EVAL_IMAGES]
  return files + [tf.io.encode_png(synthetic_jpegs.photo_like(rng, 90, 70)).numpy()]


def _decoded_as_pil_does(encoded) -> tf.Tensor:
  """The whole image, JPEGs with libjpeg's accurate IDCT (PIL's, and torchvision_eval_pixels')."""
  if tf.io.is_jpeg(encoded):
    return tf.io.decode_jpeg(encoded, channels=3, dct_method="INTEGER_ACCURATE")
  return tf.io.decode_image(encoded, channels=3, expand_animations=False)


_TORCHVISION_EVAL = """
import sys
import numpy as np
sys.path.insert(0, "benchmarks")
from torchvision_parity import torchvision_eval
assert "tensorflow" not in sys.modules
files, size = np.load(sys.argv[1], allow_pickle=True)["files"], int(sys.argv[2])
out = {ratio: np.stack([torchvision_eval(f, size, None if ratio == "None" else float(ratio)) for f in files])
       for ratio in sys.argv[3:]}
np.savez(sys.argv[1] + ".out.npz", **out)
"""


def test_antialiased_eval_is_torchvisions_eval_transform(tmp_path):
  """config.antialias=True evaluates with torchvision's transform (Resize(floor(size / crop_ratio)), CenterCrop(size),
  PIL's decode and filter), run by torchvision itself in a child process (torch must not share a process with
  TensorFlow): every pixel within one grey level, the mean within PIL's fixed-point rounding."""
  require_torch("torchvision")
  files, size, ratios = _torchvision_eval_cases(), 64, ("0.875", str(224 / 232), "None")
  path = str(tmp_path / "files.npz")
  np.savez(path, files=np.array(files, dtype=object))
  result = subprocess.run([sys.executable, "-c", _TORCHVISION_EVAL, path, str(size), *ratios], env=process_env(1),
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  reference = np.load(path + ".out.npz")
  for ratio in ratios:
    crop_ratio = None if ratio == "None" else float(ratio)
    ours = np.stack([transforms.eval_pixels(tf.constant(f), size=size, crop_ratio=crop_ratio, antialias=True).numpy()
                     for f in files])
    diff = np.abs(ours.astype(int) - reference[ratio].astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.25, (ratio, diff.max(), diff.reshape(len(files), -1).mean(1))


def test_torchvision_parity_benchmark():
  """benchmarks/torchvision_parity.py, whose figures docs/input_pipeline.md gives, runs and says the same."""
  require_torch("torchvision")
  result = subprocess.run([sys.executable, "benchmarks/torchvision_parity.py", "--num_images", "3", "--image_size",
                           "64"], env=process_env(1), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  figures = last_json(result.stdout)
  assert figures["antialias_vs_torchvision"] < 0.25 and figures["antialias_vs_torchvision_max"] <= 1, figures
  assert figures["legacy_vs_torchvision"] > 4 * figures["antialias_vs_torchvision"], figures


def test_antialiased_eval_decodes_only_what_the_filter_reads():
  """The window decode (rows and columns the filter reads, plus a margin) gives the pixels of the whole image's
  resize with torchvision's geometry, to float rounding."""
  size = 64
  for encoded in _torchvision_eval_cases():
    image = _decoded_as_pil_does(encoded)
    h, w = image.shape[:2]
    resize = int(size / 0.875)  # 73
    new = (resize * h // w, resize) if w <= h else (resize, resize * w // h)
    offset = [round((n - size) / 2) for n in new]
    whole = tf.raw_ops.ScaleAndTranslate(images=image[None], size=[size, size], scale=[new[0] / h, new[1] / w],
                                         translation=[-float(offset[0]), -float(offset[1])], kernel_type="triangle",
                                         antialias=True)[0]
    ours = transforms.eval_pixels(tf.constant(encoded), size=size, crop_ratio=0.875, antialias=True).numpy()
    diff = np.abs(ours.astype(int) - transforms.to_uint8(whole).numpy().astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01, ((h, w), diff.max(), diff.mean())


def test_device_augment_takes_torchvisions_eval_crop():
  """decode_on_device's eval with antialias: the host's crop (torchvision_eval_crop) resampled on the device from
  the image decoded as the host decodes it equals the host's torchvision_eval_pixels to its uint8 rounding; a
  window larger than the device's canvas (rare: large images, whole-image resizes) is averaged over r x r blocks
  first, a little smoother."""
  size, averaged = 64, 0
  for encoded in _torchvision_eval_cases():
    image = _decoded_as_pil_does(encoded)
    for crop_ratio in (0.875, None):
      box, crop = transforms.torchvision_eval_crop(tf.constant(encoded), size=size, crop_ratio=crop_ratio)
      device = device_augment.crop_resize_flip([image.numpy()], box.numpy()[None], np.array([False]), size=size,
                                               antialias=True, crops=crop.numpy()[None])[0]
      host = transforms.eval_pixels(tf.constant(encoded), size=size, crop_ratio=crop_ratio, antialias=True).numpy()
      diff = np.abs(np.asarray(device) - host)
      r, _, extent = device_augment.plan(box.numpy(), size, True, full_scale=True)
      if r == 1:
        assert diff.max() <= 0.5 + 2e-3, (image.shape, crop_ratio, diff.max())
      elif min(extent) >= size:  # (not the 40 x 900 panorama squashed whole: 10 rows left at 1/4 for 64)
        averaged += 1
        assert diff.mean() < 0.6, (image.shape, crop_ratio, diff.mean())
  assert averaged == 5  # windows of 2 x 2, 4 x 4 and 8 x 8 blocks were compared too


@pytest.mark.parametrize("antialias", [False, True])
def test_device_augment_matches_the_host_path(antialias):
  """Same boxes and flips: device_augment equals train_pixels to uint8 rounding (0.5) given the same decoded pixels;
  on the fully decoded image too, but for the crop's last column, which libjpeg's cropped decode upsamples a little
  differently (mean still ~0.25); about one grey level apart where the host decodes at 1/2 or 1/4 (DCT scaling:
  the device averages blocks instead)."""
  size = 48
  for (h, w), full_scale in (((90, 120), True), ((300, 260), False)):
    encoded = synthetic_jpegs.encode_jpeg(_photo(h, w, seed=h))
    full = tf.io.decode_jpeg(encoded, channels=3).numpy()
    seeds = [tf.constant([2, s], tf.int64) for s in range(6)]
    host = np.stack([transforms.train_pixels(tf.constant(encoded), seed, augment="inception", size=size,
                                             crop_ratio=0.875, antialias=antialias).numpy() for seed in seeds])
    min_size = transforms.decode_min_size(size, antialias)
    boxes, flips = zip(*[transforms.train_box(tf.constant(encoded), seed) for seed in seeds])
    boxes, flips = np.stack(boxes), np.stack(flips)
    device = device_augment.crop_resize_flip(jnp.asarray(np.repeat(full[None], len(seeds), 0)), jnp.asarray(boxes),
                                             jnp.asarray(flips), size=size, antialias=antialias)
    diff = np.abs(np.asarray(device) - host.astype(np.float32))
    assert device.shape == host.shape and device.dtype == jnp.float32
    assert flips.any() and not flips.all()  # both branches exercised
    if not full_scale:
      assert diff.mean() < 1.5, diff.mean()
      continue
    assert diff.mean() < 0.3 and np.percentile(diff, 95) <= 0.5 + 1e-3, (diff.mean(), diff.max())
    # The host's own decoded windows as the device's input (one zero-padded canvas): rounding only.
    windows = []
    for seed in seeds:
      crop_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))[0]
      windows.append(transforms.decode_window(tf.constant(encoded), transforms.inception_window(crop_seed),
                                              min_size).numpy())
    canvas = np.zeros((len(seeds), h, w, 3), np.uint8)
    for i, window in enumerate(windows):
      canvas[i, :window.shape[0], :window.shape[1]] = window
    same = device_augment.crop_resize_flip(jnp.asarray(canvas), jnp.array([[0, 0, *x.shape[:2]] for x in windows]),
                                           jnp.asarray(flips), size=size, antialias=antialias)
    assert np.abs(np.asarray(same) - host).max() <= 0.5 + 1e-3


def test_device_augment_ignores_canvas_padding():
  """An image padded into a larger canvas gives the same crop as alone: only pixels inside the box are read."""
  image = jnp.asarray(_photo(40, 50), jnp.float32)
  canvas = jnp.full((64, 80, 3), 255.0).at[:40, :50].set(image)
  box, flip = jnp.array([[0, 10, 40, 50]]), jnp.array([True])
  alone = device_augment.crop_resize_flip(image[None], box, flip, size=16)
  padded = device_augment.crop_resize_flip(canvas[None], box, flip, size=16)
  np.testing.assert_allclose(alone, padded, atol=1e-4)


@pytest.mark.parametrize("antialias", [False, True])
def test_device_resize_is_scale_and_translate_of_the_box(antialias):
  """The windowed, gathered resize is jax.image.scale_and_translate of the box alone, to float rounding: for
  boxes up to the canvas's size (the largest reductions, the most filter taps), upscaled boxes and flips."""
  size = 16
  rng = np.random.default_rng(int(antialias))
  image = rng.integers(0, 256, (140, 170, 3), np.uint8)
  limit = device_augment.canvas_size(size, antialias)
  for _ in range(30):
    h = int(rng.integers(3, min(140, 2 * device_augment.decode_min_size(size, antialias))))
    w = int(rng.integers(3, min(170, limit, h * 4 // 3 + 1)))
    y0, x0, flip = int(rng.integers(0, 140 - h + 1)), int(rng.integers(0, 170 - w + 1)), bool(rng.integers(2))
    got = device_augment.crop_resize_flip([image], np.array([[y0, x0, y0 + h, x0 + w]]), np.array([flip]),
                                          size=size, antialias=antialias)[0]
    want = jax.image.scale_and_translate(jnp.asarray(image[y0:y0 + h, x0:x0 + w], jnp.float32), (size, size, 3),
                                         (0, 1), jnp.array([size / h, size / w]), jnp.zeros(2), "linear",
                                         antialias=antialias)
    np.testing.assert_allclose(got, want[:, ::-1] if flip else want, atol=2e-3, err_msg=f"{(y0, x0, h, w, flip)}")


def test_device_windows_of_any_size_share_one_resize_program():
  """Decoded images come in as many shapes as there are image sizes: only the small window program is compiled per
  shape; the batch's resize compiles once."""
  rng = np.random.default_rng(3)
  batches = []
  for _ in range(2):
    sizes = [(int(rng.integers(40, 90)), int(rng.integers(40, 90))) for _ in range(4)]
    images = [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in sizes]
    batches.append((images, np.array([[0, 0, h, w] for h, w in sizes]), np.zeros(4, bool)))
  resizes, windows = device_augment.resize_windows._cache_size(), device_augment.window._cache_size()
  for images, boxes, flips in batches:
    assert device_augment.crop_resize_flip(images, boxes, flips, size=24).shape == (4, 24, 24, 3)
  assert device_augment.resize_windows._cache_size() == resizes + 1
  assert device_augment.window._cache_size() == windows + len({x.shape for b in batches for x in b[0]})


def test_device_plan_puts_the_hosts_window_on_the_canvas():
  """The window is the host's (the box snapped to the r-grid; partial at the image's edge); a box too long for the
  canvas (a panorama's whole-image crop) is averaged at the next power of two that fits."""
  size = 32  # min_size 32, canvas 96
  assert device_augment.plan((0, 0, 50, 60), size, False) == (1, (0, 0), (50, 60))
  assert device_augment.plan((64, 8, 130, 81), size, False) == (2, (32, 4), (33, 37))  # 1/2: rows 32-64
  assert device_augment.plan((0, 0, 40, 300), size, False) == (4, (0, 0), (10, 75))  # 1/1, 1/2 too wide
  assert device_augment.plan((0, 0, 800, 900), size, False) == (16, (0, 0), (50, 57))  # past 1/8
  image = np.random.default_rng(0).integers(0, 256, (9, 6, 1), np.uint8)
  window = np.asarray(device_augment.window(image, np.array([9, 6, 6, 1, 1]), r=2, canvas=8, channels=1))
  padded = np.pad(image, ((0, 1), (0, 0), (0, 0)), mode="edge").astype(np.float32)
  means = padded.reshape(5, 2, 3, 2, 1).mean(axis=(1, 3))
  np.testing.assert_array_equal(window[:4, :2], np.round(means[1:, 1:]).astype(np.uint8))
  assert not window[4:].any() and not window[:, 2:].any()  # zero past the image


@pytest.mark.parametrize("r", [1, 2, 4])
def test_device_window_reads_an_image_inside_a_larger_buffer(r):
  """An image stored row by row in a larger buffer (rows padded, bytes past it) gives the window it gives alone:
  only its own pixels are read, whatever the buffer's shape."""
  rng = np.random.default_rng(r)
  image = rng.integers(0, 256, (37, 29, 3), np.uint8)
  buffer = rng.integers(0, 256, (64, 128), np.uint8)  # pitch 100 > 29 * 3, junk around the image
  buffer.reshape(-1)[:37 * 100].reshape(37, 100)[:, :87] = image.reshape(37, 87)
  decoded = device_augment.Decoded(jnp.asarray(buffer), 37, 29, 100)
  np.testing.assert_array_equal(decoded.pixels(), image)
  for origin in ((0, 0), (3, 2), (-(-37 // r) - 1, -(-29 // r) - 1)):
    alone = device_augment.window(image, np.array([37, 29, 87, *origin]), r=r, canvas=24, channels=3)
    inside = device_augment.window(decoded.buffer, np.array([37, 29, 100, *origin]), r=r, canvas=24, channels=3)
    np.testing.assert_array_equal(inside, alone)
    assert alone.any() and not np.asarray(alone)[-(-37 // r) - origin[0]:].any()  # zero past the image


def test_gpu_decode_puts_images_of_every_size_in_a_few_buffer_shapes(monkeypatch):
  """Decoded images share a few fixed buffer shapes, so the window programs compile per buffer size and scale, not
  per image size; the crops equal those of the images alone. A buffer returns to its pool once JAX has released
  it; an image too large for any buffer gets its own."""
  require_nvimgcodec()
  from resnext_jax.datasets import gpu_decode  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv("RESNEXT_JAX_DECODE_BACKEND", "cpu")
  rng = np.random.default_rng(5)
  sizes = [(int(rng.integers(40, 400)), int(rng.integers(40, 400))) for _ in range(12)] + [(2400, 2400)]
  jpegs = [synthetic_jpegs.encode_jpeg(_photo(*size, seed=i)) for i, size in enumerate(sizes)]
  boxes = np.array([[0, 0, h, w] for h, w in sizes])
  flips = rng.uniform(size=len(sizes)) < 0.5
  windows = device_augment.window._cache_size()
  decoded = gpu_decode.decode(jpegs)
  assert len({d.buffer.shape for d in decoded}) == 2  # one 1 MiB shape for the twelve, the large image's own
  assert decoded[-1].buffer.shape[0] == 2400
  got = device_augment.crop_resize_flip(decoded, boxes, flips, size=32)
  programs = {(d.buffer.shape, device_augment.plan(box, 32, False)[0]) for d, box in zip(decoded, boxes)}
  assert device_augment.window._cache_size() - windows == len(programs) <= 5  # per buffer shape and scale
  want = device_augment.crop_resize_flip([d.pixels() for d in decoded], boxes, flips, size=32)
  np.testing.assert_array_equal(got, want)
  pool = gpu_decode._free_buffers("cpu", jax.devices()[0].id)  # pylint: disable=protected-access
  free = len(pool[gpu_decode.BUFFER_BYTES[0]])
  del decoded, got
  assert len(pool[gpu_decode.BUFFER_BYTES[0]]) == free + 12  # released by JAX: back in the pool
  again = gpu_decode.decode(jpegs[:12])
  assert len(pool[gpu_decode.BUFFER_BYTES[0]]) == free and len({d.buffer.shape for d in again}) == 1


def test_gpu_decode_without_the_pool_gives_the_same_crops(monkeypatch):
  """RESNEXT_JAX_DECODE_POOL=0, the fallback should the pooled views fail on a GPU: each image an array of its own
  shape, and the same crops as from the pooled buffers."""
  require_nvimgcodec()
  from resnext_jax.datasets import gpu_decode  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv("RESNEXT_JAX_DECODE_BACKEND", "cpu")
  sizes = [(90, 120), (61, 47), (300, 200)]
  jpegs = [synthetic_jpegs.encode_jpeg(_photo(*size, seed=i)) for i, size in enumerate(sizes)]
  boxes = np.array([[[5, 3, h - 2, w], [0, 0, h, w]][i % 2] for i, (h, w) in enumerate(sizes)])
  flips = [1, 0, 1]
  pooled = device_augment.crop_resize_flip(gpu_decode.decode(jpegs), boxes, np.array(flips, bool), size=24)
  monkeypatch.setenv("RESNEXT_JAX_DECODE_POOL", "0")
  own = gpu_decode.decode(jpegs)
  assert [d.buffer.shape for d in own] == [(h, w, 3) for h, w in sizes]
  np.testing.assert_array_equal(device_augment.crop_resize_flip(own, boxes, np.array(flips, bool), size=24), pooled)
  monkeypatch.setenv("RESNEXT_JAX_DECODE_POOL", "yes")
  with pytest.raises(errors.ConfigError, match="RESNEXT_JAX_DECODE_POOL='yes'"):
    gpu_decode.decode(jpegs)


def test_gpu_decode_says_what_to_install():
  from resnext_jax.datasets import gpu_decode  # pylint: disable=import-outside-toplevel
  try:
    from nvidia import nvimgcodec  # pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    gpu_decode.nvimgcodec.cache_clear()
    with pytest.raises(errors.ConfigError, match="nvidia-nvimgcodec-cu12"):
      gpu_decode.nvimgcodec()
  if jax.default_backend() != "gpu":
    config = default.get_config()
    config.update(dataset="imagefolder", data_dir="/nonexistent", decode_on_device=True)
    with pytest.raises(errors.ConfigError, match="needs a GPU|nvimgcodec"):
      input_pipeline.create_train_iterator(config, _mesh())


def test_decode_on_device_runs_the_whole_pipeline_with_nvimgcodecs_cpu_backend(tmp_path, monkeypatch):
  """config.decode_on_device end to end (tf.data's records and boxes, nvImageCodec's batch decode, the device
  crop, resize, flip and normalisation, the global batch), with nvImageCodec's CPU backend standing in for its
  GPU one: the same batches as the host path, but for decoders' rounding and the DCT-scale approximation."""
  require_nvimgcodec()
  monkeypatch.setenv("RESNEXT_JAX_DECODE_BACKEND", "cpu")
  write_image_folder(str(tmp_path), [(300, 200), (90, 120), (260, 400), (100, 100), (375, 500), (64, 64)])
  config = default.get_config()
  config.update(dataset="imagefolder", data_dir=str(tmp_path), eval_split="train", image_size=48, batch_size=6,
                shuffle_buffer_size=16)
  scale, offset = normalization.normalization(transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)

  def pixels(batches):  # back to 0..255
    return [((np.asarray(b["image"]) - offset) / scale, np.asarray(b["label"])) for b in batches]

  host = pixels(next(input_pipeline.create_train_iterator(config, _mesh(), start_step=s)) for s in (0, 3))
  config.decode_on_device = True
  device = pixels(next(input_pipeline.create_train_iterator(config, _mesh(), start_step=s)) for s in (0, 3))
  for (h, h_labels), (d, d_labels) in zip(host, device):
    np.testing.assert_array_equal(h_labels, d_labels)
    assert d.shape == h.shape == (6, 48, 48, 3)
    diff = np.abs(d - h)
    assert diff.mean() < 2.0 and np.percentile(diff, 99) < 16, (diff.mean(), np.percentile(diff, 99))
  # Another step's batch (other crops and flips) is far from this one's: the comparison above can fail.
  assert np.abs(device[0][0] - host[1][0]).mean() > 10


def test_decode_on_device_evaluates_with_torchvisions_crop(tmp_path, monkeypatch):
  """config.decode_on_device with antialias=True: the eval batches are the host's (torchvision's eval transform)
  but for the decoders' rounding, with nvImageCodec's CPU backend decoding."""
  require_nvimgcodec()
  monkeypatch.setenv("RESNEXT_JAX_DECODE_BACKEND", "cpu")
  write_image_folder(str(tmp_path), [(300, 200), (90, 120), (260, 400), (100, 100), (375, 500), (64, 64)])
  config = default.get_config()
  config.update(dataset="imagefolder", data_dir=str(tmp_path), eval_split="train", image_size=48,
                eval_batch_size=4, antialias=True)
  batches = {}
  for on_device in (False, True):
    config.decode_on_device = on_device
    batches[on_device] = list(input_pipeline.create_eval_iterator(config, _mesh()))
  scale, _ = normalization.normalization(transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)
  for host, device in zip(batches[False], batches[True]):
    np.testing.assert_array_equal(host["mask"], device["mask"])
    diff = np.abs(np.asarray(host["image"]) - np.asarray(device["image"])) / scale
    assert diff.mean() < 0.5 and diff.max() < 4, (diff.mean(), diff.max())


_FOUR_DEVICES = """
import sys
import jax, numpy as np
from resnext_jax import input_pipeline, runtime
from resnext_jax.configs import default
from resnext_jax.datasets import device_augment, normalization
mesh = runtime.make_mesh()
config = default.get_config()
config.update(dataset="imagefolder", data_dir=sys.argv[1], eval_split="train", image_size=32, batch_size=8,
              eval_batch_size=8, shuffle_buffer_size=16, reprob=0.5)  # random erasing: per-example keys
batches = {}
for on_device in (False, True):
  config.decode_on_device = on_device
  batches[on_device] = [next(input_pipeline.create_train_iterator(config, mesh, start_step=1)),
                        *input_pipeline.create_eval_iterator(config, mesh)]
scale, offset = normalization.normalization(normalization.IMAGENET_MEAN, normalization.IMAGENET_STD)
for host, device in zip(batches[False], batches[True]):
  for key in ("label", "mask"):
    np.testing.assert_array_equal(host.get(key, 0), device.get(key, 0))
  diff = np.abs(np.asarray(host["image"]) - np.asarray(device["image"])) / scale
  print("diff", diff.mean(), np.percentile(diff, 99))
image = batches[True][0]["image"]
print("shards", sorted(s.device.id for s in image.addressable_shards),
      image.sharding.spec == jax.sharding.PartitionSpec("data"))
print("resize programs", device_augment.resize_windows._cache_size())
"""


def test_main_trains_and_evaluates_with_decode_on_device(tmp_path):
  """main.py as users start it, with config.decode_on_device on 2 devices (nvImageCodec's CPU backend standing in
  for its GPU one): it trains, evaluates every image once and checkpoints."""
  require_nvimgcodec()
  write_image_folder(str(tmp_path / "images"), NINE_SIZES)
  proc = run_main(["--config=configs/digits_resnext.py:tiny", "--config.dataset=imagefolder",
                   f"--config.data_dir={tmp_path / 'images'}", "--config.eval_split=train",
                   "--config.augment=inception", "--config.decode_on_device=True", "--config.image_size=32",
                   "--config.batch_size=4", "--config.eval_batch_size=4", "--config.num_train_steps=2",
                   f"--workdir={tmp_path / 'wd'}"], devices=2, env=dict(RESNEXT_JAX_DECODE_BACKEND="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = last_json(proc.stdout)
  assert result["step"] == 2 and result["num_examples"] == 9
  assert os.listdir(tmp_path / "wd" / "checkpoints") == ["2"]
  assert "Decoding JPEGs on the devices with nvImageCodec (cpu backend, pooled buffers)" in proc.stderr


def test_decode_on_device_decodes_each_devices_slice_on_that_device(tmp_path):
  """With 4 devices, each decodes and augments its own quarter of the batch (the global array is made from the
  slices where they are: a slice computed elsewhere would not assemble), padding included (9 eval examples: a
  device with one real image and one padding, devices with padding only), random erasing too (each slice with its
  examples' keys); the batches equal the host path's."""
  require_nvimgcodec()
  write_image_folder(str(tmp_path), NINE_SIZES)
  result = subprocess.run([sys.executable, "-c", _FOUR_DEVICES, str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=process_env(4, RESNEXT_JAX_DECODE_BACKEND="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  diffs = [[float(v) for v in line.split()[1:]] for line in lines if line.startswith("diff")]
  assert len(diffs) == 3  # one train batch, two eval batches (8 + 1 example)
  assert all(mean < 2.0 and p99 < 16 for mean, p99 in diffs), diffs
  assert "shards [0, 1, 2, 3] True" in lines
  assert int(next(line for line in lines if line.startswith("resize programs")).split()[-1]) >= 4


def test_decode_on_device_names_what_it_cannot_decode(monkeypatch):
  require_nvimgcodec()
  from resnext_jax.datasets import gpu_decode  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv("RESNEXT_JAX_DECODE_BACKEND", "cpu")
  good = synthetic_jpegs.encode_jpeg(_photo(40, 30))
  images = gpu_decode.decode([good])
  pixels = images[0].pixels()
  assert pixels.shape == (40, 30, 3) and pixels.dtype == jnp.uint8
  np.testing.assert_allclose(np.asarray(pixels, np.float32), tf.io.decode_jpeg(good).numpy(), atol=8)
  with pytest.raises(errors.DataError, match="could not read image 1 of the batch"):
    gpu_decode.decode([good, b"not an image"])
  monkeypatch.setenv("RESNEXT_JAX_DECODE_BACKEND", "tpu")
  with pytest.raises(errors.ConfigError, match="RESNEXT_JAX_DECODE_BACKEND='tpu'"):
    gpu_decode.decode([good])


def test_gpu_decode_benchmark_dry_run_with_the_cpu_backend(monkeypatch):
  """The device check made for GPU machines without TensorFlow runs end to end (here on nvImageCodec's CPU),
  the train step fed by the decode included."""
  require_nvimgcodec()
  monkeypatch.setenv("RESNEXT_JAX_DECODE_BACKEND", "cpu")
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import gpu_decode_benchmark  # pylint: disable=import-outside-toplevel
  result = gpu_decode_benchmark.main(["--num_images=6", "--batch_size=3", "--image_size=32", "--model",
                                      "resnext11_4x16d", "--dtype=float32", "--config=cifar10_resnext29_8x64d",
                                      "--steps=1", "--loop_passes=1"])
  assert result["backend"] == "cpu" and result["num_images"] == 6 and result["distinct_sizes"] >= 2
  assert result["programs_compiled"]["resize_windows"] >= 1
  assert result["max_abs_diff_vs_pil"] <= 8 and result["mean_abs_diff_vs_pil"] < 1.0  # IDCTs differ slightly
  assert result["decode_images_per_s"] > 0 and result["augment_images_per_s"] > 0
  assert result["step_images_per_s"] > 0 and result["loop_images_per_s"] > 0  # the train step, fed by the decode
  assert result["pooled_buffers"] and result["loop_batches_max_abs_diff_vs_alone"] == 0.0


def test_gpu_check_script_dry_run(tmp_path):
  """benchmarks/gpu_check.sh, the one command a GPU session runs, runs through on the CPU backend: the decode and
  loop check (pooled buffers, the loop's batches equal to those augmented alone) and the step benchmark."""
  require_nvimgcodec()
  env = process_env(1, RESNEXT_JAX_DECODE_BACKEND="cpu", NUM_IMAGES="6", BATCH_SIZE="3", MODEL="resnext11_4x16d",
                    DTYPE="float32", COMPARE_TORCH="0", STEPS="1")
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]  # its python3: this one, venv or not
  result = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  decode = json.loads((tmp_path / "decode.json").read_text().splitlines()[-1])
  assert decode["pooled_buffers"] and decode["loop_batches_max_abs_diff_vs_alone"] == 0.0
  assert '"images_per_sec"' in (tmp_path / "step.txt").read_text()


# An image folder of 9 sizes: with 4 devices and a batch of 8, its eval padding leaves one device a real image and
# a padded one, others padding only (here and in test_input_multiprocess.py).
NINE_SIZES = [(300, 200), (90, 120), (260, 400), (100, 100), (375, 500), (64, 64), (120, 90), (200, 150), (77, 99)]


def write_image_folder(root, sizes):
  """root/train/c{0,1}/{i}.jpg: photo-like JPEGs of these sizes, alternating between two labels."""
  for i, (h, w) in enumerate(sizes):
    label = f"c{i % 2}"
    os.makedirs(os.path.join(root, "train", label), exist_ok=True)
    with open(os.path.join(root, "train", label, f"{i}.jpg"), "wb") as f:
      f.write(synthetic_jpegs.encode_jpeg(_photo(h, w, seed=i)))


def test_pre_resize_stores_smaller_images_and_trains(tmp_path):
  sizes = [(300, 200), (90, 120), (260, 400), (100, 100)]
  write_image_folder(str(tmp_path), sizes)
  config = default.get_config()
  config.update(dataset="imagefolder", data_dir=str(tmp_path), eval_split="train", image_size=32, batch_size=4,
                eval_batch_size=4, shuffle_buffer_size=16, pre_resize=96)
  from resnext_jax.datasets import sources  # pylint: disable=import-outside-toplevel
  source = sources.get_source(config)
  assert source.builder.name == "pre_resized" and source.builder.info.splits["train"].num_examples == 4
  stored = list(tfds.as_numpy(source.builder.as_dataset(split="train", shuffle_files=False)))
  shorter = sorted(min(ex["image"].shape[:2]) for ex in stored)
  assert shorter == [90, 96, 96, 96]  # larger images shrunk to 96, the 90-px one kept as it was
  batch = next(input_pipeline.create_train_iterator(config, _mesh()))
  assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == jnp.float32


def test_legacy_transforms_still_run(tmp_path):
  write_image_folder(str(tmp_path), [(60, 80)] * 4)
  config = default.get_config()
  config.update(dataset="imagefolder", data_dir=str(tmp_path), eval_split="train", image_size=24, batch_size=4,
                eval_batch_size=4, shuffle_buffer_size=16)
  fast = [np.asarray(b["image"]) for b in input_pipeline.create_eval_iterator(config, _mesh())]
  config.input_transform = "legacy"
  legacy = [np.asarray(b["image"]) for b in input_pipeline.create_eval_iterator(config, _mesh())]
  assert np.abs(fast[0] - legacy[0]).mean() < 0.1  # normalised units (one grey level is ~0.017)
  config.input_transform = "bogus"
  with pytest.raises(errors.ConfigError, match="input_transform"):
    input_pipeline.create_eval_iterator(config, _mesh())


def test_device_normalisation_matches_host_formula():
  pixels = np.arange(256, dtype=np.uint8).repeat(3).reshape(1, 16, 16, 3)
  batch = {"image": jnp.asarray(pixels), "mask": jnp.array([True])}
  constants = tuple(map(tuple, normalization.normalization(transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)))
  normalize = input_pipeline._normalize_on_device  # pylint: disable=protected-access
  on_device = np.asarray(normalize(batch, constants)["image"])
  on_host = normalization.normalize_numpy(pixels, transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)
  expected = (pixels / 255.0 - np.array(transforms.IMAGENET_MEAN)) / np.array(transforms.IMAGENET_STD)
  np.testing.assert_allclose(on_device, on_host, atol=1e-6)
  np.testing.assert_allclose(on_host, expected, atol=1e-5)


def test_synthetic_jpegs_look_like_imagenet():
  rng = np.random.default_rng(0)
  sizes = np.array([synthetic_jpegs.imagenet_size(rng) for _ in range(2000)])
  assert 350 < sizes.mean(axis=0).min() and sizes.mean(axis=0).max() < 500
  assert 0.02 < (sizes.min(axis=1) >= 512).mean() < 0.08  # the large tail that DCT scaling serves
  assert np.median(sizes.max(axis=1)) == 500
  bits = 8 * len(synthetic_jpegs.encode_jpeg(_photo(375, 500))) / (375 * 500)
  assert 2.5 < bits < 6  # ImageNet's JPEGs: ~110 kB at ~400x470, about 4-5 bits per pixel


def test_imagenet_like_jpegs_are_the_same_made_by_worker_processes():
  """The GPU check's JPEGs, made in worker processes (64 images: one per core here), are the files made one by one
  from the same seeds, in order."""
  made = synthetic_jpegs.imagenet_like_jpegs(64, seed=3)
  assert made == [synthetic_jpegs.imagenet_like_jpeg(np.random.default_rng((3, i))) for i in range(64)]
  assert len(set(made)) == 64


def test_input_pipeline_benchmark_smoke(tmp_path):
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import input_pipeline_benchmark  # pylint: disable=import-outside-toplevel
  result = input_pipeline_benchmark.main(["--num_images=8", "--batch_size=4", "--image_size=32", "--seconds=0.2",
                                          "--repeats=1", "--settle=0.1", "--legacy", "--device_decode_host",
                                          f"--data_dir={tmp_path}"])
  json.dumps(result)
  for key in ("train_images_per_cpu_s", "eval_images_per_cpu_s", "train_legacy_images_per_cpu_s",
              "train_speedup_vs_legacy_per_cpu_s", "train_device_host_images_per_cpu_s", "cpu"):
    assert key in result
  assert result["jpegs"]["num_files"] == 8


# The code issue 14 was filed against, whose pipeline was still input_pipeline.train_dataset: slow, because a
# shallow clone (CI's may be one) lacks it; HEAD exercises the same script in every clone.
@pytest.mark.parametrize("revision", ["HEAD", pytest.param("aaadfbc", marks=pytest.mark.slow)])
def test_input_pipeline_vs_revision_smoke(tmp_path, revision):
  """benchmarks/input_pipeline_vs_revision.py times a revision in a worktree of its own against this checkout,
  and removes the worktree afterwards."""
  git = lambda *args: subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, check=True).stdout
  worktrees = git("worktree", "list")
  result = subprocess.run([sys.executable, "benchmarks/input_pipeline_vs_revision.py", f"--revision={revision}",
                           "--processes=1", "--num_images=8", "--batch_size=4", "--image_size=32", "--seconds=0.2",
                           "--repeats=1", "--settle=0.1", f"--data_dir={tmp_path}"],
                          env=process_env(1), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  figures = last_json(result.stdout)
  assert figures["revision"] == git("rev-parse", "--short", revision).strip(), figures
  assert figures["jpegs"]["num_files"] == 8, figures
  for name in ("train", "eval"):
    (old, new), = figures[f"{name}_runs"]
    assert old > 0 and new > 0 and abs(figures[f"{name}_speedup_vs_revision"] - new / old) < 0.01, figures
  assert git("worktree", "list") == worktrees


def test_input_pipeline_vs_revision_names_a_bad_revision():
  result = subprocess.run([sys.executable, "benchmarks/input_pipeline_vs_revision.py", "--revision=no-such-rev"],
                          env=process_env(1), cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0 and "no-such-rev" in result.stderr and "Traceback" not in result.stderr, result.stderr

