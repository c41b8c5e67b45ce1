"""Pre-resized storage: a copy of a prepared dataset with every image's shorter side at most N (as FFCV stores
ImageNet), so that every epoch decodes fewer pixels and entropy-decodes fewer bytes. Made by
`python -m resnext_jax.datasets.prepare` or on first use with config.pre_resize=N.

Images already small enough are stored unchanged (their original bytes); larger ones are decoded, resized with
PIL's antialiased bicubic filter and saved as JPEG (quality config.pre_resize_quality, default 90, 4:2:0). The copy
is a TFDS dataset `pre_resized` in the source's TFDS data_dir, with the same splits, labels and example order.
"""

import functools
import multiprocessing
import os

import tensorflow_datasets as tfds

from resnext_jax.datasets import shrink

SUPPORTED = ("imagenet2012", "imagefolder")


class PreResized(tfds.core.GeneratorBasedBuilder):
  """`source`'s splits with every image's shorter side at most max_size (JPEG, `quality`)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def __init__(self, source: tfds.core.DatasetBuilder, max_size: int, *, quality: int = 90,
               workers: int | None = None, **kwargs):
    self._source, self._max_size, self._quality = source, int(max_size), int(quality)
    self._workers = workers or os.cpu_count() or 1
    config_name = source.builder_config.name if source.builder_config else "default"
    config = tfds.core.BuilderConfig(
        name=f"{source.name}-{config_name}-{source.version}-s{self._max_size}-q{self._quality}")
    root = source.data_dir.split(os.sep + source.name + os.sep)[0]  # the source's TFDS data_dir
    super().__init__(data_dir=root, config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    names = self._source.info.features["label"].names
    return self.dataset_info_from_configs(
        description=f"{self._source.name} with shorter sides <= {self._max_size} (JPEG quality {self._quality}).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=names),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in self._source.info.splits}

  def _generate_examples(self, split):
    records = self._source.as_dataset(split=split, shuffle_files=False,
                                      decoders={"image": tfds.decode.SkipDecoding()})
    examples = ((ex["image"], int(ex["label"])) for ex in tfds.as_numpy(records))
    work = functools.partial(shrink.shrink_example, max_size=self._max_size, quality=self._quality)
    # spawn: the workers import only PIL (datasets/shrink.py), not this process's TensorFlow state.
    with multiprocessing.get_context("spawn").Pool(self._workers) as pool:
      for i, (image, label) in enumerate(pool.imap(work, examples, chunksize=32)):
        yield f"{i:09d}", {"image": image, "label": label}


def wrap(source: tfds.core.DatasetBuilder, config) -> tfds.core.DatasetBuilder:
  """A PreResized builder for config.pre_resize (not yet prepared), or `source` when pre_resize is 0."""
  max_size = int(config.get("pre_resize", 0) or 0)
  if max_size <= 0:
    return source
  return PreResized(source, max_size, quality=int(config.get("pre_resize_quality", 90)))
