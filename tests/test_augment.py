"""Augmentation beyond the paper (issue 15): RandAugment, TrivialAugment, random erasing, repeated augmentation.

- Each RandAugment op and level function against timm's own (timm/data/auto_augment.py) on a fixed image with
  pinned magnitude, sign and interpolation: exactly equal. Each TrivialAugment op, at every magnitude bin and sign,
  against torchvision.transforms.v2.TrivialAugmentWide's: exactly equal.
- The random parts against the references' samplers over many draws: RandAugment's op choice, how many ops fire,
  the magnitude histogram and the signs (timm, Python's `random` seeded); TrivialAugment's op, bin and sign
  (torchvision, torch seeded); random erasing's probability, erased area and aspect (timm's RandomErasing, torch
  and `random` seeded).
- In the pipeline (real sklearn_digits records): the same (seed, step) gives the same batch, a stream started at
  step s equals the uninterrupted one from s with everything on, repeats come k at a time and spread over devices,
  evaluation is unaffected, and with everything off the train graph has no Python in it and the batches are those
  of a config that does not know the options.

timm and torchvision are optional test dependencies (pip install -e '.[torch]'): the comparisons skip without them
and fail instead where RESNEXT_JAX_REQUIRE_TORCH is set (CI). torch runs only in child processes (it crashes beside
TensorFlow, which the pipeline tests load); timm's auto_augment.py itself imports only PIL and numpy, so it is
loaded by path in this process without timm's package (whose __init__ imports torch).
"""

import collections
import functools
import importlib.util
import os
import random
import subprocess
import sys
import textwrap

import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from conftest import data_mesh, digits_pipeline_config, take
from resnext_jax import errors
from resnext_jax import input_pipeline
from resnext_jax.configs import default
from resnext_jax.datasets import augment
from resnext_jax.datasets import normalization
from resnext_jax.datasets import sources
from resnext_jax.datasets import synthetic_jpegs
from resnext_jax.datasets import transforms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS_PER_EPOCH = 1498 // 64  # sklearn_digits train at batch 64
IMAGENET_FILL = (124, 116, 104)  # timm's img_mean for the ImageNet mean


def _require(*modules):
  """Skips without `modules`; fails instead where RESNEXT_JAX_REQUIRE_TORCH is set (as tests/test_torch_weights)."""
  missing = [m for m in modules if importlib.util.find_spec(m) is None]
  if missing:
    if os.environ.get("RESNEXT_JAX_REQUIRE_TORCH"):
      pytest.fail(f"{', '.join(missing)} not installed, and RESNEXT_JAX_REQUIRE_TORCH is set "
                  "(pip install -e '.[torch]')")
    pytest.skip(f"{', '.join(missing)} not installed (optional test dependency: pip install -e '.[torch]')")


@functools.cache
def _load_timm_auto_augment():
  path = os.path.join(importlib.util.find_spec("timm").submodule_search_locations[0], "data", "auto_augment.py")
  spec = importlib.util.spec_from_file_location("_timm_auto_augment", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture
def timm_aa():
  _require("timm")
  return _load_timm_auto_augment()


def _run_torch(script: str, *args, timeout=600):
  """Runs `script` in a child Python (torch must not share a process with TensorFlow)."""
  env = dict(os.environ, PYTHONPATH=REPO, CUDA_VISIBLE_DEVICES="")
  result = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _image(height=40, width=48, seed=0) -> np.ndarray:
  """A photo-like uint8 RGB image (edges, texture), not square so that a swapped axis shows."""
  return synthetic_jpegs.photo_like(np.random.default_rng(seed), height, width)


class _PinnedRng:
  """Stands in for a numpy Generator where a test pins the draws: random() -> u, uniform(a, b) -> midpoint."""

  def __init__(self, u):
    self.u = u

  def random(self):
    return self.u

  def uniform(self, a, b):
    return (a + b) / 2


# --- RandAugment: ops and levels against timm. ---


def test_op_sets_are_timms(timm_aa):
  assert augment.RAND_TRANSFORMS == tuple(timm_aa._RAND_TRANSFORMS)
  assert augment.RAND_INCREASING_TRANSFORMS == tuple(timm_aa._RAND_INCREASING_TRANSFORMS)
  assert augment.RAND_3A == tuple(timm_aa._RAND_3A)
  assert augment.RAND_WEIGHTED_0 == timm_aa._RAND_WEIGHTED_0
  assert augment.RAND_WEIGHTED_3A == timm_aa._RAND_WEIGHTED_3A
  assert set(augment.NAME_TO_OP) == set(timm_aa.NAME_TO_OP) == set(timm_aa.LEVEL_TO_ARG)
  assert augment._LEVEL_DENOM == timm_aa._LEVEL_DENOM
  assert augment._RANDOM_INTERPOLATION == tuple(timm_aa._RANDOM_INTERPOLATION)


@pytest.mark.parametrize("name", sorted(augment.NAME_TO_OP))
def test_rand_op_equals_timm(timm_aa, monkeypatch, name):
  img = Image.fromarray(_image())
  hparams = dict(translate_const=21, img_mean=IMAGENET_FILL)
  monkeypatch.setattr(random, "uniform", lambda a, b: (a + b) / 2)  # GaussianBlurRand's radius
  for magnitude in (0.0, 3.7, 9.0, 10.0):
    for u in (0.1, 0.9):  # timm negates signed levels when random.random() > 0.5
      monkeypatch.setattr(random, "random", lambda u=u: u)
      timm_level = timm_aa.LEVEL_TO_ARG[name]
      expected_args = timm_level(magnitude, hparams) if timm_level is not None else ()
      ours = augment.LEVEL_TO_ARG[name]
      args = ours(magnitude, hparams, _PinnedRng(u)) if ours is not None else ()
      assert args == expected_args, (name, magnitude, u)
      for resample in augment._RANDOM_INTERPOLATION:
        if name.startswith("Posterize") and expected_args == (0,):
          # timm asks Pillow for 0 bits, which Pillow 13 refuses; older Pillow's formula (i & ~255) is black.
          expected = Image.fromarray(np.asarray(img) & np.uint8(0))
        else:
          expected = timm_aa.NAME_TO_OP[name](img, *expected_args, fillcolor=IMAGENET_FILL, resample=resample)
        got = augment.apply_op(name, img, args, fillcolor=IMAGENET_FILL, resample=resample, rng=_PinnedRng(u))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected), err_msg=f"{name} m={magnitude}")


@pytest.mark.parametrize("config_str", [
    "rand-m9-mstd0.5-inc1", "rand-m9-mstd0.5", "rand-m7-n3-mstd101", "rand-m10-n1-p0.8-mmax12", "rand-mstd1-tweights",
    "rand-m9-inc0", "rand", "rand-m6-t3a", "rand-m6-n3-t3aw",
])
def test_parse_matches_timm(timm_aa, config_str):
  hparams = dict(translate_const=100, img_mean=IMAGENET_FILL)
  expected = timm_aa.rand_augment_transform(config_str, dict(hparams))
  policy = augment.parse_rand_augment(config_str, mean=normalization.IMAGENET_MEAN, image_size=224)
  assert policy.ops == tuple(op.name for op in expected.ops)
  assert policy.num_layers == expected.num_layers
  op = expected.ops[0]
  assert (policy.prob, policy.magnitude, policy.magnitude_std, policy.magnitude_max) == (
      op.prob, op.magnitude, op.magnitude_std, op.magnitude_max)
  assert policy.fill == op.kwargs["fillcolor"] == IMAGENET_FILL  # timm: round(255 * mean)
  assert policy.hparams["translate_const"] == int(224 * 0.45)
  if expected.choice_weights is None:
    assert policy.choice_weights is None
  else:
    np.testing.assert_allclose(policy.choice_weights, expected.choice_weights)


def _timm_draws(timm_aa, config_str, n):
  """timm's RandAugment run n times with the ops stubbed: per image, [(op, magnitude, level args)]."""
  ra = timm_aa.rand_augment_transform(config_str, dict(translate_const=100, img_mean=IMAGENET_FILL))
  current = []
  for op in ra.ops:
    def level(magnitude, hparams, name=op.name, fn=op.level_fn):
      args = fn(magnitude, hparams) if fn is not None else ()
      current.append((name, magnitude, args))
      return args
    op.level_fn = level
    op.aug_fn = lambda img, *args, **kwargs: img
  random.seed(0)
  np.random.seed(0)
  img = Image.new("RGB", (4, 4))
  draws = []
  for _ in range(n):
    current.clear()
    ra(img)
    draws.append(list(current))
  return draws


def _our_draws(config_str, n):
  policy = augment.parse_rand_augment(config_str, mean=normalization.IMAGENET_MEAN, image_size=224)
  magnitudes = []
  sample = policy.sample_magnitude
  policy.sample_magnitude = lambda rng: magnitudes.append(sample(rng)) or magnitudes[-1]
  draws, resamples = [], []
  for i in range(n):
    magnitudes.clear()
    steps = policy.plan(augment.rng_for([i, 12345]))
    draws.append([(name, m, args) for (name, args, _), m in zip(steps, magnitudes)])
    resamples += [r for name, _, r in steps if name in augment._GEOMETRIC]
  return draws, resamples


@pytest.mark.parametrize("config_str", ["rand-m9-mstd0.5-inc1", "rand-m9-mstd101", "rand-m7-mstd0.5-tweights",
                                        "rand-m10-n3-p0.8"])
def test_rand_augment_sampling_matches_timm(timm_aa, config_str):
  from scipy import stats  # pylint: disable=g-import-not-at-top
  n = 20_000
  theirs = _timm_draws(timm_aa, config_str, n)
  ours, resamples = _our_draws(config_str, n)
  # How many ops fire per image (each of n layers with probability p).
  fired_t = np.bincount([len(d) for d in theirs], minlength=4) / n
  fired_o = np.bincount([len(d) for d in ours], minlength=4) / n
  np.testing.assert_allclose(fired_o, fired_t, atol=0.02)
  # Which ops.
  ops_t = collections.Counter(name for d in theirs for name, _, _ in d)
  ops_o = collections.Counter(name for d in ours for name, _, _ in d)
  total_t, total_o = sum(ops_t.values()), sum(ops_o.values())
  for name in set(ops_t) | set(ops_o):
    assert abs(ops_t[name] / total_t - ops_o[name] / total_o) < 0.012, (name, ops_t[name], ops_o[name])
  # Magnitudes: gaussian around m clipped to [0, mmax or 10], or uniform for mstd > 100.
  mag_t = np.array([m for d in theirs for _, m, _ in d])
  mag_o = np.array([m for d in ours for _, m, _ in d])
  assert stats.ks_2samp(mag_t, mag_o).pvalue > 1e-3
  for edge in (0.0, 10.0):
    assert abs(np.mean(mag_t == edge) - np.mean(mag_o == edge)) < 0.01
  # Signs of the signed levels (rotate, shear, translate; increasing enhancements).
  signed = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
  neg_t = np.mean([a[0] < 0 for d in theirs for name, m, a in d if name in signed and m > 0])
  neg_o = np.mean([a[0] < 0 for d in ours for name, m, a in d if name in signed and m > 0])
  assert abs(neg_t - 0.5) < 0.03 and abs(neg_o - neg_t) < 0.03
  # timm's 'random' interpolation: bilinear or bicubic, evenly, for each geometric op.
  assert abs(np.mean([r == augment.BICUBIC for r in resamples]) - 0.5) < 0.03


def test_rand_augment_on_an_image_is_its_plan():
  policy = augment.parse_rand_augment("rand-m9-mstd0.5-inc1", image_size=40)
  image = _image()
  for i in range(20):
    seed = np.array([i, -5], np.int64)
    img = Image.fromarray(image)
    rng = augment.rng_for(seed)
    for name, args, resample in policy.plan(rng):
      img = augment.apply_op(name, img, args, fillcolor=policy.fill, resample=resample, rng=rng)
    out = policy(image, seed)
    assert out.dtype == np.uint8 and out.shape == image.shape
    np.testing.assert_array_equal(out, np.asarray(img))
    np.testing.assert_array_equal(out, policy(image, seed))  # a function of the seed


# --- TrivialAugment against torchvision.transforms.v2.TrivialAugmentWide. ---

_TORCHVISION_TRIVIAL = """
import sys
import numpy as np
import PIL.Image
import torch
from torchvision.transforms import InterpolationMode, v2

image = PIL.Image.fromarray(np.load(sys.argv[1]))
t = v2.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR)
out = {"names": np.array(list(t._AUGMENTATION_SPACE))}
for name, (fn, signed) in t._AUGMENTATION_SPACE.items():
  mags = fn(t.num_magnitude_bins, image.height, image.width)
  out[name + "__table"] = np.zeros(0) if mags is None else mags.numpy()
  for b in ([None] if mags is None else range(t.num_magnitude_bins)):
    for sign in ((1, -1) if signed and b is not None else (1,)):
      m = 0.0 if b is None else float(mags[b]) * sign
      res = t._apply_image_or_video_transform(image, name, m, interpolation=t.interpolation, fill=t._fill)
      out[f"{name}__{b}__{sign}"] = np.asarray(res)
# The sampler: which op, which magnitude, which sign, over many calls.
draws = []
t._apply_image_or_video_transform = lambda img, name, m, interpolation, fill: draws.append((name, m)) or img
torch.manual_seed(0)
small = PIL.Image.new("RGB", (4, 4))
for _ in range(int(sys.argv[3])):
  t(small)
out["draw_names"] = np.array([d[0] for d in draws])
out["draw_magnitudes"] = np.array([d[1] for d in draws])
np.savez(sys.argv[2], **out)
"""


@pytest.fixture(scope="module")
def torchvision_trivial(tmp_path_factory):
  _require("torch", "torchvision")
  path = tmp_path_factory.mktemp("trivial")
  np.save(path / "image.npy", _image())
  _run_torch(_TORCHVISION_TRIVIAL, path / "image.npy", path / "out.npz", 20_000)
  return dict(np.load(path / "out.npz"))


def test_trivial_ops_equal_torchvision(torchvision_trivial):
  ref = torchvision_trivial
  assert tuple(ref["names"]) == tuple(name for name, _, _ in augment.TRIVIAL_OPS)
  policy = augment.TrivialAugment()
  img = Image.fromarray(_image())
  for name, spec, signed in augment.TRIVIAL_OPS:
    table, ref_table = policy.magnitudes[name], ref[name + "__table"]
    if table is None:
      assert ref_table.size == 0
      bins = [None]
    else:
      # The same bins; torch's float32 linspace rounds some a ulp away from the correctly rounded values.
      np.testing.assert_allclose(table, ref_table, rtol=3e-7, atol=1e-7, err_msg=name)
      bins = range(policy.num_magnitude_bins)
    for b in bins:
      for sign in ((1, -1) if signed and b is not None else (1,)):
        expected = ref[f"{name}__{b}__{sign}"]
        # The op, given torchvision's magnitude: exactly torchvision's.
        m = 0.0 if b is None else float(ref_table[b]) * sign
        got = augment.apply_trivial_op(name, img, m, resample=policy.interpolation, fill=policy.fill)
        np.testing.assert_array_equal(np.asarray(got), expected, err_msg=f"{name} bin {b} {sign}")
        # Our own bin value where torch's rounds differently (by an ulp; which bins depends on the CPU's vector
        # width): Translate's int() may land one pixel apart, Solarize's threshold one grey level apart.
        if b is not None and table[b] != ref_table[b]:
          mine = float(table[b]) * sign
          ours = np.asarray(augment.apply_trivial_op(name, img, mine, resample=policy.interpolation,
                                                     fill=policy.fill)).astype(int)
          if name.startswith("Translate"):
            assert abs(int(mine) - int(m)) <= 1, (name, b)
          elif name == "Solarize":
            assert set(np.asarray(img)[ours != expected].tolist()) <= {round(255 * mine)}, (name, b)
          else:
            assert np.abs(ours - expected).max() <= 1, (name, b)


def test_trivial_sampling_matches_torchvision(torchvision_trivial):
  from scipy import stats  # pylint: disable=g-import-not-at-top
  names_t, mags_t = torchvision_trivial["draw_names"], torchvision_trivial["draw_magnitudes"]
  n = len(names_t)
  policy = augment.TrivialAugment()
  draws = [policy.plan(augment.rng_for([i, 99])) for i in range(n)]
  names_o = np.array([d[0] for d in draws])
  mags_o = np.array([d[1] for d in draws])
  for name, spec, signed in augment.TRIVIAL_OPS:
    share_t, share_o = np.mean(names_t == name), np.mean(names_o == name)
    assert abs(share_t - 1 / 14) < 0.01 and abs(share_o - share_t) < 0.01, (name, share_t, share_o)
    if spec is not None:
      m_t, m_o = mags_t[names_t == name], mags_o[names_o == name]
      assert stats.ks_2samp(m_t, m_o).pvalue > 1e-3, name
  # The sign of the signed ops, pooled (a coin; bin 0 is 0 either way).
  signed = [name for name, _, is_signed in augment.TRIVIAL_OPS if is_signed]
  neg_t = np.mean(mags_t[np.isin(names_t, signed)] < 0)
  neg_o = np.mean(mags_o[np.isin(names_o, signed)] < 0)
  assert abs(neg_t - 0.5 * 30 / 31) < 0.02 and abs(neg_o - neg_t) < 0.025, (neg_t, neg_o)


# --- Random erasing against timm's RandomErasing. ---

_TIMM_ERASING = """
import random, sys
import numpy as np
import torch
from timm.data.random_erasing import RandomErasing

n, height, width = int(sys.argv[2]), 32, 48
out = {}
for name, prob, count in (("p50_c1", 0.5, 1), ("p100_c3", 1.0, 3)):
  random.seed(0)
  torch.manual_seed(0)
  x = torch.ones(n, 3, height, width)
  RandomErasing(probability=prob, mode="const", max_count=count, device="cpu")(x)
  out[name] = (x[:, 0] == 0).numpy()
np.savez_compressed(sys.argv[1], **out)
"""


@pytest.fixture(scope="module")
def timm_erasing(tmp_path_factory):
  _require("torch", "timm")
  path = tmp_path_factory.mktemp("erasing") / "out.npz"
  _run_torch(_TIMM_ERASING, path, 4000)
  return dict(np.load(path))


def _our_erasing_masks(n, probability, count, mode="const", seed=0):
  keys = np.random.default_rng(seed).integers(0, 2**32, (n, 2), dtype=np.uint32)
  e = augment.Erasing(probability=probability, mode=mode, max_count=count)
  images = np.ones((n, 32, 48, 3), np.float32)
  out = np.asarray(augment.random_erase(images, keys, e))
  return out, keys, e


def _box_shapes(masks):
  """(erased, h, w) per image from its erased pixels' bounding box."""
  erased = masks.any(axis=(1, 2))
  rows, cols = masks.any(axis=2), masks.any(axis=1)
  h, w = rows.sum(1), cols.sum(1)
  return erased, h[erased], w[erased]


def test_erasing_boxes_match_timm(timm_erasing):
  from scipy import stats  # pylint: disable=g-import-not-at-top
  out, keys, e = _our_erasing_masks(4000, 0.5, 1)
  masks = out[..., 0] == 0
  assert np.all(out[~masks] == 1) and np.all(out[masks] == 0)  # const: 0 inside, untouched outside
  erased_t, h_t, w_t = _box_shapes(timm_erasing["p50_c1"])
  erased_o, h_o, w_o = _box_shapes(masks)
  assert abs(erased_t.mean() - 0.5) < 0.03 and abs(erased_o.mean() - erased_t.mean()) < 0.04
  # Each erased region is one full rectangle.
  assert np.array_equal(masks[erased_o].sum(axis=(1, 2)), h_o * w_o)
  area_t, area_o = h_t * w_t / (32 * 48), h_o * w_o / (32 * 48)
  assert stats.ks_2samp(area_t, area_o).pvalue > 1e-3
  assert stats.ks_2samp(np.log(h_t / w_t), np.log(h_o / w_o)).pvalue > 1e-3
  assert 0.015 < area_o.min() and area_o.max() < 0.36  # 0.02-1/3 of the image, up to rounding
  # erase_boxes reports the boxes random_erase paints.
  boxes, active = (np.asarray(a) for a in augment.erase_boxes(keys, e, 32, 48))
  np.testing.assert_array_equal(active[:, 0], erased_o)
  np.testing.assert_array_equal(boxes[erased_o, 0, 2], h_o)
  np.testing.assert_array_equal(boxes[erased_o, 0, 3], w_o)


def test_erasing_several_boxes_match_timm(timm_erasing):
  from scipy import stats  # pylint: disable=g-import-not-at-top
  out, _, _ = _our_erasing_masks(4000, 1.0, 3, seed=1)
  frac_t = timm_erasing["p100_c3"].mean(axis=(1, 2))
  frac_o = (out[..., 0] == 0).mean(axis=(1, 2))
  assert stats.ks_2samp(frac_t, frac_o).pvalue > 1e-3


def test_erasing_pixel_mode_is_unit_normal_noise():
  out, _, _ = _our_erasing_masks(500, 1.0, 1, mode="pixel")
  changed = out != 1
  noise = out[changed]
  assert changed.any(axis=(1, 2, 3)).mean() > 0.95
  assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02
  assert np.array_equal(changed[..., 0], changed[..., 1])  # every channel of an erased pixel
  out_rand, _, _ = _our_erasing_masks(200, 1.0, 1, mode="rand")
  for image in out_rand:  # one colour per box
    inside = image[..., 0] != 1
    if inside.any():
      assert len(np.unique(image[inside], axis=0)) == 1


# --- The pipeline, on the real sklearn_digits records. ---


ALL_ON = dict(augment="cifar", auto_augment="rand-m9-mstd0.5-inc1", reprob=0.5, recount=2, aug_repeats=2)


@pytest.mark.parametrize("overrides", [ALL_ON, dict(ALL_ON, auto_augment="trivial", remode="rand", aug_repeats=1)])
def test_deterministic_and_resumable_with_everything_on(digits_dir, overrides):
  config = digits_pipeline_config(digits_dir, **overrides)
  full = take(input_pipeline.create_train_iterator(config, data_mesh()), STEPS_PER_EPOCH + 2)
  again = take(input_pipeline.create_train_iterator(config, data_mesh()), 2)
  resumed = take(input_pipeline.create_train_iterator(config, data_mesh(), start_step=STEPS_PER_EPOCH - 1), 3)
  for a, b in zip(full, again):
    np.testing.assert_array_equal(a["image"], b["image"])
  for a, b in zip(full[STEPS_PER_EPOCH - 1:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert set(full[0]) == {"image", "label"}  # the erasing key stays on the host side of the device step
  other_seed = take(input_pipeline.create_train_iterator(digits_pipeline_config(digits_dir, seed=1, **overrides), data_mesh()), 1)
  assert not np.array_equal(other_seed[0]["image"], full[0]["image"])


def test_auto_augment_in_the_pipeline_is_the_policy_on_the_plain_pixels():
  encoded = tf.constant(synthetic_jpegs.encode_jpeg(_image(48, 40)))
  for policy in (augment.parse_rand_augment("rand-m9-mstd0.5-inc1", image_size=32), augment.TrivialAugment()):
    for i in range(10):
      seed = tf.constant([i, 3], tf.int64)
      kwargs = dict(augment="inception", size=32, crop_ratio=0.875)
      plain = transforms.train_pixels(encoded, seed, **kwargs).numpy()
      augmented = transforms.train_pixels(encoded, seed, auto_augment=policy, **kwargs).numpy()
      aug_seed = tf.random.experimental.stateless_fold_in(seed, transforms.AUTO_AUGMENT_STREAM).numpy()
      np.testing.assert_array_equal(augmented, policy(plain, aug_seed))


def _serialized_graph(ds) -> bytes:
  return ds._as_serialized_graph().numpy()  # pylint: disable=protected-access


def test_options_off_leave_the_pipeline_as_it_was(digits_dir):
  config = digits_pipeline_config(digits_dir, augment="cifar")
  source = sources.get_source(config)
  ds = input_pipeline.train_dataset(source, config, start_step=0, process_index=0, process_count=1)
  assert b"PyFunc" not in _serialized_graph(ds)  # no Python per image
  on = input_pipeline.train_dataset(source, digits_pipeline_config(digits_dir, augment="cifar", auto_augment="trivial"),
                                    start_step=0, process_index=0, process_count=1)
  assert b"PyFunc" in _serialized_graph(on)  # (so that the check above can fail)
  # A config that has never heard of the options gives the same batches.
  plain = ml_collections.ConfigDict({k: v for k, v in config.to_dict().items()
                                     if k not in ("auto_augment", "reprob", "remode", "recount", "aug_repeats")})
  a = take(input_pipeline.create_train_iterator(config, data_mesh()), 2)
  b = take(input_pipeline.create_train_iterator(plain, data_mesh()), 2)
  for x, y in zip(a, b):
    assert set(x) == {"image", "label"}
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


def test_eval_is_unaffected(digits_dir):
  off = list(input_pipeline.create_eval_iterator(digits_pipeline_config(digits_dir), data_mesh()))
  on = list(input_pipeline.create_eval_iterator(digits_pipeline_config(digits_dir, **ALL_ON), data_mesh()))
  assert len(on) == len(off)
  for a, b in zip(off, on):
    for key in ("image", "label", "mask"):
      np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))


def test_random_erasing_in_the_pipeline(digits_dir):
  config = digits_pipeline_config(digits_dir, reprob=1.0, remode="const")
  batch = take(input_pipeline.create_train_iterator(config, data_mesh()), 1)[0]
  plain = take(input_pipeline.create_train_iterator(digits_pipeline_config(digits_dir), data_mesh()), 1)[0]
  erased = batch["image"] == 0.0  # no digit pixel normalises to exactly 0
  assert not (plain["image"] == 0.0).any()
  np.testing.assert_array_equal(batch["image"][~erased], plain["image"][~erased])
  areas = erased[..., 0].mean(axis=(1, 2))
  assert (areas > 0).mean() > 0.9  # p = 1 (a box fails its 10 attempts only rarely)
  assert areas.max() < 0.36


@pytest.mark.parametrize("local_devices", [1, 4])
def test_repeats_come_k_at_a_time_on_different_devices(digits_dir, local_devices):
  k, local_batch = 4, 64
  config = digits_pipeline_config(digits_dir, augment="none", aug_repeats=k)
  source = sources.get_source(config)
  ds = input_pipeline.train_dataset(source, config, start_step=0, process_index=0, process_count=1,
                                    local_devices=local_devices)
  batches = list(tfds.as_numpy(ds.take(STEPS_PER_EPOCH)))
  assert len(batches) == STEPS_PER_EPOCH  # the epoch keeps its length
  per_device = local_batch // local_devices
  seen = set()
  for batch in batches:
    groups = collections.defaultdict(list)
    for row, image in enumerate(batch["image"]):
      groups[image.tobytes()].append(row)
    for rows in groups.values():
      assert len(rows) % k == 0  # k copies (a multiple where two digits happen to be identical)
      if len(rows) == k:
        assert len({batch["label"][r] for r in rows}) == 1
        if local_devices >= k:
          assert len({r // per_device for r in rows}) == k  # each copy on its own device
    seen.update(groups)
  # An epoch reads local_batch / k new images per step: 1/k of the split, as RepeatAugSampler's epochs.
  assert STEPS_PER_EPOCH * local_batch / k - 10 <= len(seen) <= STEPS_PER_EPOCH * local_batch / k


def test_repeats_are_augmented_differently_and_resume(digits_dir):
  config = digits_pipeline_config(digits_dir, augment="cifar", auto_augment="rand-m9-mstd0.5", aug_repeats=4)
  source = sources.get_source(config)
  plain_config = digits_pipeline_config(digits_dir, augment="none", aug_repeats=4)

  def stream(cfg, start_step, n):
    ds = input_pipeline.train_dataset(source, cfg, start_step=start_step, process_index=0, process_count=1,
                                      local_devices=4)
    return list(tfds.as_numpy(ds.take(n)))

  plain = stream(plain_config, 0, 2)
  augmented = stream(config, 0, STEPS_PER_EPOCH + 1)
  distinct = []
  for p, a in zip(plain, augmented):  # same records in the same rows; the copies' augmentations differ
    np.testing.assert_array_equal(p["label"], a["label"])
    groups = collections.defaultdict(list)
    for row, image in enumerate(p["image"]):
      groups[image.tobytes()].append(row)
    for rows in groups.values():
      distinct.append(len({a["image"][r].tobytes() for r in rows}) == len(rows))
  assert np.mean(distinct) > 0.9
  resumed = stream(config, STEPS_PER_EPOCH - 1, 2)
  for a, b in zip(augmented[STEPS_PER_EPOCH - 1:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])


def test_repeats_on_two_processes_read_disjoint_parts(digits_dir):
  config = digits_pipeline_config(digits_dir, batch_size=128, augment="none", aug_repeats=2)
  source = sources.get_source(config)
  images = []
  for p in range(2):
    ds = input_pipeline.train_dataset(source, config, start_step=0, process_index=p, process_count=2,
                                      local_devices=2)
    batches = list(tfds.as_numpy(ds.take(2)))
    assert all(b["image"].shape == (64, 32, 32, 3) for b in batches)
    images.append({img.tobytes() for b in batches for img in b["image"]})
  assert len(images[0]) >= 60 and len(images[0] & images[1]) < 5


@pytest.mark.parametrize("overrides,key", [
    (dict(auto_augment="augmix-m5"), "config.auto_augment"),
    (dict(auto_augment="original"), "config.auto_augment"),
    (dict(auto_augment="rand-m9-foo"), "config.auto_augment"),
    (dict(auto_augment="rand-m9.5"), "config.auto_augment"),
    (dict(auto_augment="rand-x3"), "config.auto_augment"),
    (dict(auto_augment="rand-m9-tbogus"), "config.auto_augment"),
    (dict(auto_augment=7), "config.auto_augment"),
    (dict(auto_augment="rand-m9", input_transform="legacy"), "config.auto_augment"),
    (dict(reprob=1.5), "config.reprob"),
    (dict(reprob=-0.1), "config.reprob"),
    (dict(reprob="0.5"), "config.reprob"),
    (dict(remode="zero"), "config.remode"),
    (dict(recount=0), "config.recount"),
    (dict(aug_repeats=0), "config.aug_repeats"),
    (dict(aug_repeats=2.5), "config.aug_repeats"),
    (dict(aug_repeats=3), "config.aug_repeats"),  # does not divide the batch of 64
])
def test_config_errors_name_the_key(digits_dir, overrides, key):
  # A fresh ConfigDict, not the default one with its typed fields: a user's config file can set anything.
  config = ml_collections.ConfigDict({**default.get_config().to_dict(), "dataset": "sklearn_digits",
                                      "data_dir": digits_dir, "image_size": 32, "batch_size": 64, **overrides})
  with pytest.raises(errors.ConfigError, match=key.replace(".", r"\.")):
    next(input_pipeline.create_train_iterator(config, data_mesh()))


def test_trivial_and_off_parse():
  assert augment.auto_augment_policy(ml_collections.ConfigDict({"auto_augment": ""})) is None
  assert isinstance(augment.auto_augment_policy(ml_collections.ConfigDict({"auto_augment": "trivial"})),
                    augment.TrivialAugment)
  assert augment.erasing(ml_collections.ConfigDict({"reprob": 0.0})) is None
  assert augment.erasing(ml_collections.ConfigDict({"reprob": 0.25, "remode": "PIXEL", "recount": 3})) == \
      augment.Erasing(probability=0.25, mode="pixel", max_count=3)
  assert augment.aug_repeats(ml_collections.ConfigDict({})) == 1


def test_repeat_order_deals_copies_to_devices():
  order = augment.repeat_order(12, 4)  # rows per device: 3
  np.testing.assert_array_equal(order, [0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11])
  np.testing.assert_array_equal(augment.repeat_order(8, 1), np.arange(8))


def test_repeats_and_erasing_keys_on_the_device_decoding_path(tmp_path):
  """decode_on_device's host side (boxes from the JPEG header): copies share the bytes, not the crop; each
  example carries its erasing key."""
  synthetic_jpegs.write_image_folder(str(tmp_path), 32, num_classes=2, splits=("train",))
  config = digits_pipeline_config(str(tmp_path), dataset="imagefolder", eval_split="train", batch_size=8, image_size=32,
                   shuffle_buffer_size=64, aug_repeats=2, reprob=0.5)
  source = sources.get_source(config)
  ds = input_pipeline.train_dataset(source, config, start_step=0, process_index=0, process_count=1, encoded=True,
                                    local_devices=2)
  batch = next(iter(tfds.as_numpy(ds)))
  assert set(batch) == {"encoded", "box", "flip", "label", "erase_key"}
  assert batch["erase_key"].shape == (8, 2) and batch["erase_key"].dtype == np.uint32
  # 4 rows per device; the copies of the u-th image (stream positions 2u, 2u + 1) sit at rows u and 4 + u.
  for row in range(4):
    assert batch["encoded"][row] == batch["encoded"][row + 4]
    assert batch["label"][row] == batch["label"][row + 4]
  assert len({batch["encoded"][r] for r in range(4)}) == 4
  assert sum(not np.array_equal(batch["box"][r], batch["box"][r + 4]) for r in range(4)) >= 3
  assert len({tuple(k) for k in batch["erase_key"]}) == 8
