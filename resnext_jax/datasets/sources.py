"""Which TFDS builder, splits, transforms and normalisation a config's `dataset` stands for.

Builders that need no download (sklearn_digits, imagefolder) are prepared on first use; on several hosts process 0
prepares first and the others wait, then prepare too only if they do not share its filesystem.
"""

import dataclasses
import logging
import os

import jax
from jax.experimental import multihost_utils
import tensorflow_datasets as tfds

from resnext_jax.datasets import pre_resized
from resnext_jax.datasets import transforms
from resnext_jax.datasets.errors import DataError
from resnext_jax.datasets.image_folder import LocalImageFolder
from resnext_jax.datasets.sklearn_digits import SklearnDigits
from resnext_jax.errors import ConfigError

TFDS_DATASETS = ("imagenet2012", "cifar10", "cifar100", "sklearn_digits", "imagefolder")
DATASETS = TFDS_DATASETS + ("synthetic",)

_IMAGENET_HELP = """\
ImageNet (imagenet2012) is not prepared in {data_dir}.
TFDS cannot download it: get ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from https://image-net.org
(free account), put both files in
  {manual_dir}
and prepare once (about 150 GB of TFRecords, a few hours):
  tfds build imagenet2012 --data_dir={root} --manual_dir={manual_dir}
Then run again with --config.data_dir={root}."""


@dataclasses.dataclass(frozen=True)
class Source:
  """A prepared TFDS builder and how to turn its examples into model inputs."""
  builder: tfds.core.DatasetBuilder
  train_split: str
  eval_split: str
  augment: str                    # resolved augmentation: one of transforms.AUGMENTATIONS
  eval_crop_ratio: float | None   # ImageNet-style center crop, or None for a plain resize
  mean: tuple[float, float, float]
  std: tuple[float, float, float]


def transform_style(config) -> dict:
  """config.dataset's augmentation, eval crop and normalisation. Needs no data, so that prediction with, say,
  converted ImageNet weights works on a machine without ImageNet."""
  name = config.dataset
  if name == "sklearn_digits":
    style = dict(augment="none", eval_crop_ratio=None, mean=transforms.DIGITS_MEAN, std=transforms.DIGITS_STD)
  elif name in ("imagefolder", "imagenet2012"):
    if not 0 < config.crop_ratio <= 1:
      raise ConfigError(f"config.crop_ratio must be in (0, 1] (eval resizes the shorter side to image_size / "
                        f"crop_ratio, then crops the center image_size), got {config.crop_ratio}")
    style = dict(augment="inception", eval_crop_ratio=config.crop_ratio,
                 mean=transforms.IMAGENET_MEAN, std=transforms.IMAGENET_STD)
  elif name in ("cifar10", "cifar100"):
    stats = (transforms.CIFAR10_MEAN, transforms.CIFAR10_STD) if name == "cifar10" else (
        transforms.CIFAR100_MEAN, transforms.CIFAR100_STD)
    style = dict(augment="cifar", eval_crop_ratio=None, mean=stats[0], std=stats[1])
  else:
    raise DataError(f"Unknown dataset {name!r}; config.dataset must be one of {', '.join(DATASETS)}.")
  if config.augment != "auto":
    if config.augment not in transforms.AUGMENTATIONS:
      raise DataError(f"Unknown config.augment={config.augment!r}; use auto or one of {transforms.AUGMENTATIONS}.")
    style["augment"] = config.augment
  return style


def get_source(config) -> Source:
  """The Source for config.dataset; raises DataError when the data is missing or the config is inconsistent."""
  style = transform_style(config)
  builder = get_builder(config)
  return Source(builder=builder,
                train_split=resolve_split(builder, config.train_split, fallbacks=()),
                eval_split=resolve_split(builder, config.eval_split, fallbacks=("validation", "val", "test")),
                **style)


def get_builder(config) -> tfds.core.DatasetBuilder:
  """config.dataset's prepared TFDS builder (with config.pre_resize, the pre-resized copy)."""
  name = config.dataset
  if name == "sklearn_digits":
    builder = prepare(lambda: SklearnDigits(data_dir=config.data_dir))
  elif name == "imagefolder":
    if not config.data_dir:
      raise DataError("dataset 'imagefolder' needs --config.data_dir=/path/to/root laid out as root/split/label/*.jpg")
    builder = prepare(lambda: LocalImageFolder(config.data_dir, strict=config.get("strict_decode", False)))
  elif name == "imagenet2012":
    builder = tfds.builder(name, data_dir=config.data_dir)
    if not builder.is_prepared():
      root = os.path.dirname(os.path.dirname(builder.data_path))
      raise DataError(_IMAGENET_HELP.format(data_dir=builder.data_dir, root=root,
                                            manual_dir=os.path.join(root, "downloads", "manual")))
  else:  # cifar10, cifar100
    builder = prepare(lambda: tfds.builder(name, data_dir=config.data_dir))
  if config.get("pre_resize", 0) and name in pre_resized.SUPPORTED:  # a copy stored at a smaller size
    base = builder
    builder = prepare(lambda: pre_resized.wrap(base, config))
  return builder


def prepare(make_builder) -> tfds.core.DatasetBuilder:
  """make_builder()'s builder, prepared once (by process 0 first, so that hosts do not race on a shared disk)."""
  if jax.process_index() == 0:
    _download_and_prepare(make_builder())
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("resnext_jax: dataset prepared")
  builder = make_builder()  # a fresh builder reads the split sizes that preparation wrote
  return _download_and_prepare(builder)


def _download_and_prepare(builder):
  if builder.is_prepared():
    return builder
  logging.info("Preparing %s in %s (first use).", builder.name, builder.data_dir)
  try:
    builder.download_and_prepare()
  except DataError:
    raise
  except Exception as e:  # network, disk or permission problems: say where, not a TFDS stack trace
    raise DataError(f"Could not download and prepare {builder.name} in {builder.data_dir}: {e!r}\n"
                    f"Without internet, run `tfds build {builder.name} --data_dir=...` on a machine that has it, "
                    "copy that data_dir here and pass --config.data_dir.") from e
  return builder


def resolve_split(builder, requested: str, *, fallbacks) -> str:
  """requested if the builder has it (slices like 'train[:90%]' allowed), else the first fallback it has."""
  splits = builder.info.splits
  try:
    splits[requested].num_examples  # pylint: disable=expression-not-assigned
    return requested
  except (KeyError, ValueError, AssertionError):
    pass
  for split in fallbacks:
    if split in splits:
      logging.info("%s has no split %r; using %r.", builder.name, requested, split)
      return split
  raise DataError(f"{builder.name} has no split {requested!r} (it has {sorted(splits)}); set config.train_split / "
                  "config.eval_split to one of those.")
