"""Augmentation beyond the paper's recipe (issue 15), with timm's and torchvision's semantics.

| config | what | reference | where |
|---|---|---|---|
| `auto_augment="rand-m9-mstd0.5-inc1"` | RandAugment | timm 1.0.31 `timm.data.auto_augment.rand_augment_transform` | host (PIL) |
| `auto_augment="trivial"` | TrivialAugment | `torchvision.transforms.v2.TrivialAugmentWide` | host (PIL) |
| `reprob`, `remode`, `recount` | random erasing | timm `timm.data.random_erasing.RandomErasing` | device |
| `aug_repeats` | repeated augmentation | timm `timm.data.distributed_sampler.RepeatAugSampler` | tf_pipeline |

**Host ops.** RandAugment and TrivialAugment are the same PIL calls as timm's and torchvision's (ImageOps,
ImageEnhance, `Image.transform` / `Image.rotate`) on the uint8 (H, W, 3) image, after the crop and the flip (timm's
and torchvision's order: RandomResizedCrop, flip, auto-augment). tf.data calls them through `tf.numpy_function`
(`transforms.auto_augment_pixels`) with the example's own seed; every draw (which ops, whether each applies, its
magnitude, its sign, its interpolation) comes from a `numpy.random.Generator` seeded by that seed alone, so an
example's augmentation is a function of (config.seed, epoch, position), like its crop and flip, whatever thread
runs it and wherever the stream was started. The random streams differ from timm's (Python's `random`) and
torch's; the distributions are the same (tests/test_augment.py compares them over many draws).

RandAugment, as timm's `rand_augment_transform(config_str, hparams)` with the hparams timm's
`create_transform` passes for training: `n` ops (default 2) drawn uniformly with replacement from the 15-op set
(`inc1`: the increasing-severity variants), each applied with probability `p` (0.5); magnitude `m` (default 10)
with gaussian noise of std `mstd` (`mstd` > 100: uniform in [0, m]) drawn per op, clipped to [0, `mmax`] (10);
geometric ops fill with the dataset's mean colour (`img_mean`, 124, 116, 104 for ImageNet) and pick bilinear or
bicubic at random per op (timm's default train interpolation 'random'); `translate_const` = 45% of the image
size; `t<name>` selects timm's other op sets ('weights', '3a', '3aw'; weighted choice is without replacement).
`inc0` is off, as in timm 1.0.31 (before it, timm tested `bool()` of the string, so `inc0` turned it on).
Stricter than timm: a section it would ignore or assert on raises ConfigError here.

TrivialAugment, as torchvision's `TrivialAugmentWide(interpolation=BILINEAR)` (what torchvision's classification
reference recipe, `--auto-augment ta_wide`, builds): one of 14 ops uniformly, one of 31 magnitude bins uniformly,
the sign of signed ops by a coin, fill 0 (black), bilinear interpolation.

**Random erasing** (`random_erase`) runs on the device, inside the jitted normalisation's neighbour, on the
normalised float images: timm applies it after `Normalize` (per-pixel noise N(0, 1) in normalised space, i.e.
noise around the dataset mean at the dataset's spread), and our host ships uint8 pixels, which cannot hold that
noise. Each example ships a (2,) uint32 key drawn from its own seed (`transforms.erase_key`); the device draws
from it whether to erase (probability `reprob`), how many boxes (uniform 1..`recount`), each box as timm does
(area uniform in [0.02, 1/3] of the image / count, log-uniform aspect in [0.3, 1/0.3], h = round(sqrt(area *
aspect)), w = round(sqrt(area / aspect)), the first of 10 attempts with h < H and w < W, top and left uniform over
the positions that fit) and the fill (`pixel`: N(0, 1) per pixel and channel; `rand`: N(0, 1) per box and
channel; `const`: 0). Drawing the boxes on the device rather than the host keeps the host free of float work per
pixel and ships 8 bytes per example instead of the noise; the draws are a function of the example's seed only, so
erasing is as deterministic and resumable as the rest.
"""

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from resnext_jax.errors import ConfigError

_LEVEL_DENOM = 10.0  # timm: 'Mx' magnitude scale -> fractional level
_FILL = (128, 128, 128)  # timm's fill colour when hparams have no img_mean
BILINEAR = Image.Resampling.BILINEAR
BICUBIC = Image.Resampling.BICUBIC
NEAREST = Image.Resampling.NEAREST
_RANDOM_INTERPOLATION = (BILINEAR, BICUBIC)  # timm's 'random' train interpolation


def rng_for(seed) -> np.random.Generator:
  """The numpy Generator of one example: seeded by its (2,) int64 tf seed and nothing else."""
  return np.random.default_rng([int(s) & 0xFFFFFFFFFFFFFFFF for s in np.asarray(seed).reshape(-1)])


# --- timm's ops (timm/data/auto_augment.py): PIL image in, PIL image out. ---


def _affine(img, matrix, *, fillcolor=_FILL, resample=BICUBIC, **_):
  return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fillcolor)


def shear_x(img, factor, **kw):
  return _affine(img, (1, factor, 0, 0, 1, 0), **kw)


def shear_y(img, factor, **kw):
  return _affine(img, (1, 0, 0, factor, 1, 0), **kw)


def translate_x_rel(img, pct, **kw):
  return _affine(img, (1, 0, pct * img.size[0], 0, 1, 0), **kw)


def translate_y_rel(img, pct, **kw):
  return _affine(img, (1, 0, 0, 0, 1, pct * img.size[1]), **kw)


def translate_x_abs(img, pixels, **kw):
  return _affine(img, (1, 0, pixels, 0, 1, 0), **kw)


def translate_y_abs(img, pixels, **kw):
  return _affine(img, (1, 0, 0, 0, 1, pixels), **kw)


def rotate(img, degrees, *, fillcolor=_FILL, resample=BICUBIC, **_):
  return img.rotate(degrees, resample=resample, fillcolor=fillcolor)


def auto_contrast(img, **_):
  return ImageOps.autocontrast(img)


def invert(img, **_):
  return ImageOps.invert(img)


def equalize(img, **_):
  return ImageOps.equalize(img)


def solarize(img, thresh, **_):
  return ImageOps.solarize(img, thresh)


def solarize_add(img, add, thresh=128, **_):
  lut = [min(255, i + add) if i < thresh else i for i in range(256)]
  if img.mode in ("L", "RGB"):
    return img.point(lut * 3 if img.mode == "RGB" else lut)
  return img


def posterize(img, bits_to_keep, **_):
  if bits_to_keep <= 0:
    # Keeping 0 bits: black. timm reaches 0 (Posterize below m 2.5, PosterizeIncreasing at m 10) and recent Pillow
    # (13.0 here) refuses it with a ValueError where older Pillow returned i & ~255 = 0; this is that result.
    return img.point([0] * 256 * len(img.getbands()))
  return img if bits_to_keep >= 8 else ImageOps.posterize(img, bits_to_keep)


def contrast(img, factor, **_):
  return ImageEnhance.Contrast(img).enhance(factor)


def color(img, factor, **_):
  return ImageEnhance.Color(img).enhance(factor)


def brightness(img, factor, **_):
  return ImageEnhance.Brightness(img).enhance(factor)


def sharpness(img, factor, **_):
  return ImageEnhance.Sharpness(img).enhance(factor)


def gaussian_blur(img, factor, **_):
  return img.filter(ImageFilter.GaussianBlur(radius=factor))


def gaussian_blur_rand(img, factor, *, rng, **_):
  return img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0 * factor)))


def desaturate(img, factor, **_):
  return ImageEnhance.Color(img).enhance(min(1.0, max(0.0, 1.0 - factor)))


NAME_TO_OP = {
    "AutoContrast": auto_contrast, "Equalize": equalize, "Invert": invert, "Rotate": rotate,
    "Posterize": posterize, "PosterizeIncreasing": posterize, "PosterizeOriginal": posterize,
    "Solarize": solarize, "SolarizeIncreasing": solarize, "SolarizeAdd": solarize_add,
    "Color": color, "ColorIncreasing": color, "Contrast": contrast, "ContrastIncreasing": contrast,
    "Brightness": brightness, "BrightnessIncreasing": brightness, "Sharpness": sharpness,
    "SharpnessIncreasing": sharpness, "ShearX": shear_x, "ShearY": shear_y, "TranslateX": translate_x_abs,
    "TranslateY": translate_y_abs, "TranslateXRel": translate_x_rel, "TranslateYRel": translate_y_rel,
    "Desaturate": desaturate, "GaussianBlur": gaussian_blur, "GaussianBlurRand": gaussian_blur_rand,
}
_GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "TranslateXRel", "TranslateYRel"}


# --- timm's level -> argument functions; `rng` replaces timm's `random.random() > 0.5` negation. ---


def _negate(v, rng):
  return -v if rng.random() > 0.5 else v


def _rotate_arg(level, _hp, rng):
  return _negate((level / _LEVEL_DENOM) * 30.0, rng),


def _enhance_arg(level, _hp, _rng):
  return (level / _LEVEL_DENOM) * 1.8 + 0.1,


def _enhance_increasing_arg(level, _hp, rng):
  return max(0.1, 1.0 + _negate((level / _LEVEL_DENOM) * 0.9, rng)),


def _minmax_arg(level, _hp, _rng, min_val=0.0, max_val=1.0, clamp=True):
  level = min_val + (max_val - min_val) * (level / _LEVEL_DENOM)
  return (max(min_val, min(max_val, level)) if clamp else level),


def _shear_arg(level, _hp, rng):
  return _negate((level / _LEVEL_DENOM) * 0.3, rng),


def _translate_abs_arg(level, hp, rng):
  return _negate((level / _LEVEL_DENOM) * float(hp["translate_const"]), rng),


def _translate_rel_arg(level, hp, rng):
  return _negate((level / _LEVEL_DENOM) * hp.get("translate_pct", 0.45), rng),


def _posterize_arg(level, _hp, _rng):
  return int((level / _LEVEL_DENOM) * 4),


def _posterize_increasing_arg(level, hp, rng):
  return 4 - _posterize_arg(level, hp, rng)[0],


def _posterize_original_arg(level, _hp, _rng):
  return int((level / _LEVEL_DENOM) * 4) + 4,


def _solarize_arg(level, _hp, _rng):
  return min(256, int((level / _LEVEL_DENOM) * 256)),


def _solarize_increasing_arg(level, hp, rng):
  return 256 - _solarize_arg(level, hp, rng)[0],


def _solarize_add_arg(level, _hp, _rng):
  return min(128, int((level / _LEVEL_DENOM) * 110)),


LEVEL_TO_ARG = {
    "AutoContrast": None, "Equalize": None, "Invert": None, "Rotate": _rotate_arg,
    "Posterize": _posterize_arg, "PosterizeIncreasing": _posterize_increasing_arg,
    "PosterizeOriginal": _posterize_original_arg, "Solarize": _solarize_arg,
    "SolarizeIncreasing": _solarize_increasing_arg, "SolarizeAdd": _solarize_add_arg,
    "Color": _enhance_arg, "ColorIncreasing": _enhance_increasing_arg, "Contrast": _enhance_arg,
    "ContrastIncreasing": _enhance_increasing_arg, "Brightness": _enhance_arg,
    "BrightnessIncreasing": _enhance_increasing_arg, "Sharpness": _enhance_arg,
    "SharpnessIncreasing": _enhance_increasing_arg, "ShearX": _shear_arg, "ShearY": _shear_arg,
    "TranslateX": _translate_abs_arg, "TranslateY": _translate_abs_arg, "TranslateXRel": _translate_rel_arg,
    "TranslateYRel": _translate_rel_arg,
    "Desaturate": functools.partial(_minmax_arg, min_val=0.5, max_val=1.0),
    "GaussianBlur": functools.partial(_minmax_arg, min_val=0.1, max_val=2.0),
    "GaussianBlurRand": _minmax_arg,
}

RAND_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
                   "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                              "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                              "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                              "TranslateYRel")
RAND_3A = ("SolarizeIncreasing", "Desaturate", "GaussianBlur")
RAND_WEIGHTED_3A = {"SolarizeIncreasing": 6, "Desaturate": 6, "GaussianBlur": 6, "Rotate": 3, "ShearX": 2,
                    "ShearY": 2, "PosterizeIncreasing": 1, "AutoContrast": 1, "ColorIncreasing": 1,
                    "SharpnessIncreasing": 1, "ContrastIncreasing": 1, "BrightnessIncreasing": 1, "Equalize": 1,
                    "Invert": 1}
RAND_WEIGHTED_0 = {"Rotate": 3, "ShearX": 2, "ShearY": 2, "TranslateXRel": 1, "TranslateYRel": 1,
                   "ColorIncreasing": .25, "SharpnessIncreasing": 0.25, "AutoContrast": 0.25,
                   "SolarizeIncreasing": .05, "SolarizeAdd": .05, "ContrastIncreasing": .05,
                   "BrightnessIncreasing": .05, "Equalize": .05, "PosterizeIncreasing": 0.05, "Invert": 0.05}
_RAND_CHOICES = {"weights": RAND_WEIGHTED_0, "3aw": RAND_WEIGHTED_3A, "3a": RAND_3A}


def apply_op(name: str, img: Image.Image, args: tuple, *, fillcolor=_FILL, resample=BICUBIC,
             rng=None) -> Image.Image:
  """timm's op `name` with its level arguments (what timm's `NAME_TO_OP[name](img, *args, **kwargs)` does)."""
  return NAME_TO_OP[name](img, *args, fillcolor=fillcolor, resample=resample, rng=rng)


class RandAugment:
  """timm's RandAugment of AugmentOps; `policy(image, seed)` is the tf.numpy_function body (uint8 HWC)."""

  def __init__(self, *, ops, num_layers=2, magnitude=10.0, prob=0.5, magnitude_std=0.0, magnitude_max=None,
               choice_weights=None, fill=_FILL, translate_const=250, interpolation=_RANDOM_INTERPOLATION):
    self.ops = tuple(ops)
    self.num_layers = num_layers
    self.magnitude = magnitude
    self.prob = prob
    self.magnitude_std = magnitude_std
    self.magnitude_max = magnitude_max
    self.choice_weights = None if choice_weights is None else np.asarray(choice_weights, np.float64)
    self.fill = tuple(int(v) for v in fill)
    self.hparams = {"translate_const": translate_const, "img_mean": self.fill}
    self.interpolation = interpolation

  def sample_magnitude(self, rng) -> float:
    """AugmentOp's magnitude: m, or N(m, mstd) (U(0, m) for mstd inf), clipped to [0, mmax or 10]."""
    magnitude = self.magnitude
    if self.magnitude_std == float("inf"):
      magnitude = rng.uniform(0, magnitude)
    elif self.magnitude_std > 0:
      magnitude = rng.normal(magnitude, self.magnitude_std)
    return max(0.0, min(magnitude, self.magnitude_max or _LEVEL_DENOM))

  def plan(self, rng) -> list:
    """The ops one image gets: [(name, args, resample)], in order (ops that do not fire are left out)."""
    chosen = rng.choice(len(self.ops), self.num_layers, replace=self.choice_weights is None,
                        p=self.choice_weights)
    steps = []
    for i in chosen:
      name = self.ops[i]
      if self.prob < 1.0 and rng.random() > self.prob:
        continue
      magnitude = self.sample_magnitude(rng)
      level_fn = LEVEL_TO_ARG[name]
      args = level_fn(magnitude, self.hparams, rng) if level_fn is not None else ()
      resample = self.interpolation
      if isinstance(resample, (tuple, list)):
        resample = resample[rng.integers(len(resample))] if name in _GEOMETRIC else resample[0]
      steps.append((name, args, resample))
    return steps

  def __call__(self, image: np.ndarray, seed) -> np.ndarray:
    rng = rng_for(seed)
    img = Image.fromarray(np.ascontiguousarray(image, np.uint8))
    for name, args, resample in self.plan(rng):
      img = apply_op(name, img, args, fillcolor=self.fill, resample=resample, rng=rng)
    return np.asarray(img, np.uint8)

  def __repr__(self):
    return (f"RandAugment(n={self.num_layers}, m={self.magnitude}, mstd={self.magnitude_std}, p={self.prob}, "
            f"mmax={self.magnitude_max}, ops={self.ops})")


def parse_rand_augment(config_str: str, *, mean=(0.485, 0.456, 0.406), image_size: int = 224,
                       key: str = "config.auto_augment") -> RandAugment:
  """timm's `rand_augment_transform(config_str, hparams)` with create_transform's training hparams for `mean`
  and `image_size`; ConfigError (naming `key`) for strings timm would reject or silently ignore."""

  def bad(why):
    return ConfigError(f"{key}={config_str!r}: {why}; expected a RandAugment string like 'rand-m9-mstd0.5-inc1' "
                       "(sections m<int>, n<int>, p<float>, mstd<float>, mmax<int>, inc<int>, t<weights|3a|3aw>), "
                       "'trivial' or '' (off).")

  sections = config_str.split("-")
  if sections[0] != "rand":
    raise bad("not a RandAugment string")
  magnitude, num_layers, prob, increasing = _LEVEL_DENOM, 2, 0.5, False
  magnitude_std, magnitude_max, choice = 0.0, None, None
  for section in sections[1:]:
    if section.startswith("t"):
      choice = section[1:]
      if choice not in _RAND_CHOICES:
        raise bad(f"unknown op set {choice!r} (timm has {', '.join(_RAND_CHOICES)})")
      continue
    parts = re.split(r"(\d.*)", section)
    if len(parts) < 2:
      raise bad(f"section {section!r} has no number")
    name, val = parts[:2]
    try:
      if name == "mstd":
        magnitude_std = float(val)
        if magnitude_std > 100:
          magnitude_std = float("inf")  # timm: uniform in [0, m]
      elif name == "mmax":
        magnitude_max = int(val)
      elif name == "inc":
        increasing = bool(int(val))  # timm 1.0.31 (earlier timm tested bool() of the string: 'inc0' was on)
      elif name == "m":
        magnitude = int(val)
      elif name == "n":
        num_layers = int(val)
      elif name == "p":
        prob = float(val)
      else:
        raise bad(f"unknown section {section!r}")
    except ValueError as e:
      if isinstance(e, ConfigError):
        raise
      raise bad(f"section {section!r} is not a number") from e
  if num_layers < 1 or not 0.0 <= prob <= 1.0 or magnitude_std < 0:
    raise bad("n must be >= 1, p in [0, 1], mstd >= 0")
  if choice is None:
    ops, weights = (RAND_INCREASING_TRANSFORMS if increasing else RAND_TRANSFORMS), None
  else:
    ops, weights = _RAND_CHOICES[choice], None
    if isinstance(ops, dict):
      names, values = zip(*ops.items())
      ops, weights = names, np.asarray(values, np.float64) / np.sum(values)
      if num_layers > len(ops):
        raise bad(f"n={num_layers} exceeds the {len(ops)} ops of a weighted set (drawn without replacement)")
  fill = tuple(min(255, round(255 * x)) for x in mean)
  return RandAugment(ops=ops, num_layers=num_layers, magnitude=magnitude, prob=prob, magnitude_std=magnitude_std,
                     magnitude_max=magnitude_max, choice_weights=weights, fill=fill,
                     translate_const=int(image_size * 0.45))


# --- torchvision.transforms.v2.TrivialAugmentWide, PIL path. ---

# (name, magnitude range of linspace(lo, hi, bins) or None, signed); Posterize's bins are 8 - round(i / ((n-1)/6)).
TRIVIAL_OPS = (
    ("Identity", None, False), ("ShearX", (0.0, 0.99), True), ("ShearY", (0.0, 0.99), True),
    ("TranslateX", (0.0, 32.0), True), ("TranslateY", (0.0, 32.0), True), ("Rotate", (0.0, 135.0), True),
    ("Brightness", (0.0, 0.99), True), ("Color", (0.0, 0.99), True), ("Contrast", (0.0, 0.99), True),
    ("Sharpness", (0.0, 0.99), True), ("Posterize", "posterize", False), ("Solarize", (1.0, 0.0), False),
    ("AutoContrast", None, False), ("Equalize", None, False),
)


def _inverse_affine_matrix(center, angle, translate, scale, shear):
  """torchvision.transforms.functional._get_inverse_affine_matrix (inverted=True): PIL's affine coefficients."""
  rot, sx, sy = math.radians(angle), math.radians(shear[0]), math.radians(shear[1])
  cx, cy = center
  tx, ty = translate
  a = math.cos(rot - sy) / math.cos(sy)
  b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
  c = math.sin(rot - sy) / math.cos(sy)
  d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
  matrix = [x / scale for x in [d, -b, 0.0, -c, a, 0.0]]
  matrix[2] += matrix[0] * (-cx - tx) + matrix[1] * (-cy - ty)
  matrix[5] += matrix[3] * (-cx - tx) + matrix[4] * (-cy - ty)
  matrix[2] += cx
  matrix[5] += cy
  return matrix


def _tv_affine(img, *, translate=(0, 0), shear=(0.0, 0.0), center=None, resample, fill):
  if center is None:  # torchvision's PIL kernel: the image centre without the 0.5 offset
    center = [img.size[0] * 0.5, img.size[1] * 0.5]
  matrix = _inverse_affine_matrix([float(c) for c in center], 0.0, list(translate), 1.0, list(shear))
  return img.transform(img.size, Image.Transform.AFFINE, matrix, resample, fillcolor=fill)


def apply_trivial_op(name: str, img: Image.Image, magnitude: float, *, resample=BILINEAR,
                     fill=(0, 0, 0)) -> Image.Image:
  """TrivialAugmentWide's `_apply_image_or_video_transform(img, name, magnitude, ...)` on a PIL image."""
  if name == "Identity":
    return img
  if name == "ShearX":
    return _tv_affine(img, shear=(math.degrees(math.atan(magnitude)), 0.0), center=(0, 0), resample=resample,
                      fill=fill)
  if name == "ShearY":
    return _tv_affine(img, shear=(0.0, math.degrees(math.atan(magnitude))), center=(0, 0), resample=resample,
                      fill=fill)
  if name == "TranslateX":
    return _tv_affine(img, translate=(int(magnitude), 0), resample=resample, fill=fill)
  if name == "TranslateY":
    return _tv_affine(img, translate=(0, int(magnitude)), resample=resample, fill=fill)
  if name == "Rotate":
    return img.rotate(magnitude, resample, False, None, fillcolor=fill)
  if name == "Brightness":
    return ImageEnhance.Brightness(img).enhance(1.0 + magnitude)
  if name == "Color":
    return ImageEnhance.Color(img).enhance(1.0 + magnitude)
  if name == "Contrast":
    return ImageEnhance.Contrast(img).enhance(1.0 + magnitude)
  if name == "Sharpness":
    return ImageEnhance.Sharpness(img).enhance(1.0 + magnitude)
  if name == "Posterize":
    return ImageOps.posterize(img, int(magnitude))
  if name == "Solarize":
    return ImageOps.solarize(img, 255.0 * magnitude)
  if name == "AutoContrast":
    return ImageOps.autocontrast(img)
  if name == "Equalize":
    return ImageOps.equalize(img)
  raise ValueError(f"No TrivialAugment op {name!r}")


def trivial_magnitudes(spec, num_bins: int):
  """The op's magnitude bins, or None: torchvision's linspace values, correctly rounded to float32; Posterize's
  integer bits exactly. torch's own CPU linspace rounds some bins one ulp off, and which ones depends on the CPU's
  vector width; at such a bin torchvision itself translates one pixel less (TranslateX/Y bin 15: 15.999999 -> 15
  px instead of 16 on an AVX2 machine) or solarizes the grey level at the threshold (170, 153, 136) differently.
  Given torch's value, apply_trivial_op equals torchvision's op exactly (tests/test_augment.py)."""
  if spec is None:
    return None
  if spec == "posterize":
    return np.round(8 - np.arange(num_bins, dtype=np.float32) / np.float32((num_bins - 1) / 6)).astype(np.int64)
  return np.linspace(spec[0], spec[1], num_bins).astype(np.float32)


class TrivialAugment:
  """torchvision.transforms.v2.TrivialAugmentWide(num_magnitude_bins, interpolation, fill) on uint8 HWC."""

  def __init__(self, num_magnitude_bins: int = 31, interpolation=BILINEAR, fill=(0, 0, 0)):
    self.num_magnitude_bins = num_magnitude_bins
    self.interpolation = interpolation
    self.fill = tuple(fill)
    self.magnitudes = {name: trivial_magnitudes(spec, num_magnitude_bins) for name, spec, _ in TRIVIAL_OPS}

  def plan(self, rng) -> tuple[str, float]:
    """(op name, signed magnitude) as TrivialAugmentWide.forward draws them."""
    name, _, signed = TRIVIAL_OPS[rng.integers(len(TRIVIAL_OPS))]
    magnitudes = self.magnitudes[name]
    if magnitudes is None:
      return name, 0.0
    magnitude = float(magnitudes[rng.integers(self.num_magnitude_bins)])
    if signed and rng.random() <= 0.5:
      magnitude *= -1
    return name, magnitude

  def __call__(self, image: np.ndarray, seed) -> np.ndarray:
    name, magnitude = self.plan(rng_for(seed))
    img = Image.fromarray(np.ascontiguousarray(image, np.uint8))
    return np.asarray(apply_trivial_op(name, img, magnitude, resample=self.interpolation, fill=self.fill),
                      np.uint8)

  def __repr__(self):
    return f"TrivialAugment(bins={self.num_magnitude_bins}, interpolation={self.interpolation}, fill={self.fill})"


# --- config. ---


def auto_augment_policy(config, *, mean=(0.485, 0.456, 0.406), image_size=None):
  """config.auto_augment -> a RandAugment / TrivialAugment policy, or None when off ('')."""
  value = config.get("auto_augment", "") or ""
  if not isinstance(value, str):
    raise ConfigError(f"config.auto_augment={value!r} must be a string: '', 'trivial' or like 'rand-m9-mstd0.5'.")
  value = value.strip()
  if not value:
    return None
  if value == "trivial":
    return TrivialAugment()
  return parse_rand_augment(value, mean=mean, image_size=image_size or config.get("image_size", 224))


ERASE_MODES = ("pixel", "rand", "const")


@dataclasses.dataclass(frozen=True)
class Erasing:
  """timm's RandomErasing(probability, mode, max_count) with its defaults (area 0.02-1/3, aspect 0.3-1/0.3)."""
  probability: float
  mode: str = "pixel"
  max_count: int = 1
  min_count: int = 1
  min_area: float = 0.02
  max_area: float = 1 / 3
  min_aspect: float = 0.3
  max_aspect: float | None = None
  attempts: int = 10


def erasing(config) -> Erasing | None:
  """config.reprob / remode / recount -> Erasing, or None when reprob is 0 (timm's train.py: RandomErasing(reprob,
  mode=remode, max_count=recount), so the count per image is uniform in 1..recount)."""
  prob = config.get("reprob", 0.0)
  mode = config.get("remode", "pixel")
  count = config.get("recount", 1)
  if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
    raise ConfigError(f"config.reprob={prob!r} must be a probability in [0, 1].")
  if not isinstance(mode, str) or mode.lower() not in ERASE_MODES:
    raise ConfigError(f"config.remode={mode!r} must be one of {', '.join(ERASE_MODES)} (timm's RandomErasing modes).")
  if isinstance(count, bool) or not isinstance(count, int) or count < 1:
    raise ConfigError(f"config.recount={count!r} must be an integer >= 1.")
  if prob == 0:
    return None
  return Erasing(probability=float(prob), mode=mode.lower(), max_count=count)


def aug_repeats(config) -> int:
  """config.aug_repeats: k >= 1 augmented copies of each image per global batch (timm's RepeatAugSampler)."""
  k = config.get("aug_repeats", 1)
  if isinstance(k, float) and k.is_integer():
    k = int(k)
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ConfigError(f"config.aug_repeats={k!r} must be an integer >= 1 (1: off).")
  return k


def check_config(config) -> None:
  """All of the above: ConfigError, naming the key, for any invalid augmentation setting (needs no data)."""
  auto_augment_policy(config)
  erasing(config)
  aug_repeats(config)
  if config.get("auto_augment", "") and config.get("input_transform", "fast") == "legacy":
    raise ConfigError("config.auto_augment needs config.input_transform='fast' (the legacy transforms normalise on "
                      "the host, before the uint8 ops could run).")
  if config.get("auto_augment", "") and config.get("decode_on_device", False):
    raise ConfigError("config.auto_augment runs on the host's uint8 pixels; it is not available with "
                      "config.decode_on_device=True.")


def repeat_order(local_batch: int, local_devices: int) -> np.ndarray:
  """Row order of a local batch whose examples come in runs of k copies: row r holds example
  (r % per_device) * local_devices + r // per_device, so consecutive examples go to different devices (as
  RepeatAugSampler deals the repeated index list to ranks round-robin) while each device's rows stay contiguous
  (how `make_array_from_process_local_data` splits a local batch over the process's devices)."""
  per_device = local_batch // local_devices
  r = np.arange(local_batch)
  return (r % per_device) * local_devices + r // per_device


# --- random erasing on the device (JAX). ---


def _erase_boxes(key, e: Erasing, height: int, width: int):
  """One image's boxes: int32 (max_count, 4) [top, left, h, w] and bool (max_count,) active."""
  k_apply, k_count, k_area, k_aspect, k_top, k_left = jax.random.split(key, 6)
  apply = jax.random.uniform(k_apply) <= e.probability  # timm skips when random() > probability
  if e.min_count == e.max_count:
    count = jnp.asarray(e.min_count, jnp.int32)
  else:
    count = jax.random.randint(k_count, (), e.min_count, e.max_count + 1)
  n, a = e.max_count, e.attempts
  target = (jax.random.uniform(k_area, (n, a), minval=e.min_area, maxval=e.max_area) * (height * width)
            / count.astype(jnp.float32))
  log_lo, log_hi = math.log(e.min_aspect), math.log(e.max_aspect or 1 / e.min_aspect)
  aspect = jnp.exp(jax.random.uniform(k_aspect, (n, a), minval=log_lo, maxval=log_hi))
  h = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)  # round half to even, as Python's round
  w = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
  fits = (w < width) & (h < height)
  first = jnp.argmax(fits, axis=1)[:, None]  # timm takes the first of its 10 attempts that fits
  h, w = jnp.take_along_axis(h, first, 1)[:, 0], jnp.take_along_axis(w, first, 1)[:, 0]
  # random.randint(0, H - h): uniform over the H - h + 1 positions.
  top = jnp.minimum(jnp.floor(jax.random.uniform(k_top, (n,)) * (height - h + 1)).astype(jnp.int32), height - h)
  left = jnp.minimum(jnp.floor(jax.random.uniform(k_left, (n,)) * (width - w + 1)).astype(jnp.int32), width - w)
  active = apply & jnp.any(fits, axis=1) & (jnp.arange(n) < count)
  return jnp.stack([top, left, h, w], axis=-1), active


def _keys(key_data):
  return jax.random.wrap_key_data(key_data.astype("uint32"), impl="threefry2x32")


def erase_boxes(key_data, e: Erasing, height: int, width: int):
  """The boxes random_erase draws for a batch of (B, 2) uint32 keys: ((B, max_count, 4), (B, max_count))."""
  keys = jax.vmap(lambda k: jax.random.split(k)[0])(_keys(key_data))
  return jax.vmap(lambda k: _erase_boxes(k, e, height, width))(keys)


@functools.partial(jax.jit, static_argnums=2)
def random_erase(images, key_data, e: Erasing):
  """timm's RandomErasing on normalised float images (B, H, W, C), one (2,) uint32 key per image."""
  _, height, width, channels = images.shape

  def one(image, key):
    k_boxes, k_fill = jax.random.split(key)
    boxes, active = _erase_boxes(k_boxes, e, height, width)
    top, left, h, w = (boxes[:, i, None, None] for i in range(4))
    rows, cols = jnp.arange(height)[None, :, None], jnp.arange(width)[None, None, :]
    inside = active[:, None, None] & (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    mask = jnp.any(inside, axis=0)[..., None]
    if e.mode == "pixel":
      fill = jax.random.normal(k_fill, image.shape, image.dtype)
    elif e.mode == "rand":  # one colour per box; a later box paints over an earlier one, as timm's loop does
      colours = jax.random.normal(k_fill, (e.max_count, channels), image.dtype)
      last = e.max_count - 1 - jnp.argmax(inside[::-1], axis=0)
      fill = colours[last]
    else:
      fill = jnp.zeros_like(image)
    return jnp.where(mask, fill, image)

  return jax.vmap(one)(images, _keys(key_data))
