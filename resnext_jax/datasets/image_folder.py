"""TFDS builder for a folder of images laid out as root/split/label/*.jpg|png, for fine-tuning on one's own data.

Unlike `tfds.ImageFolder`, which reads the files on the fly, this builder prepares TFRecords once (into
root/.tfds). That buys what training needs: sub-splits for multi-host reading (`tfds.even_splits`), seeded
file shuffling, exact split sizes, and undecodable files found at preparation time (skipped and logged, or a
DataError when strict) instead of crashing a run mid-epoch. The builder config is named after a fingerprint of
the file listing, so adding, removing or editing files triggers a fresh preparation.
"""

import hashlib
import logging
import os
import re

import tensorflow as tf
import tensorflow_datasets as tfds

from resnext_jax.datasets.errors import DataError

PREPARED_SUBDIR = ".tfds"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def list_images(root: str) -> dict[str, list[tuple[str, str]]]:
  """{split: [(path, label), ...]} sorted by path; hidden directories (such as the prepared data) are ignored."""
  listing = {}
  for split in sorted(_subdirs(root)):
    listing[split] = [
        (os.path.join(root, split, label, name), label)
        for label in sorted(_subdirs(os.path.join(root, split)))
        for name in sorted(os.listdir(os.path.join(root, split, label)))
        if name.lower().endswith(IMAGE_EXTENSIONS)
    ]
  return listing


def _subdirs(path: str) -> list[str]:
  return [d for d in os.listdir(path) if not d.startswith((".", "_")) and os.path.isdir(os.path.join(path, d))]


def _fingerprint(root: str, listing, strict: bool) -> str:
  h = hashlib.sha256(f"strict={strict}".encode())
  for split, files in listing.items():
    for path, label in files:
      st = os.stat(path)
      h.update(f"{split}/{label}/{os.path.basename(path)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
  return f"{os.path.basename(os.path.normpath(root)) or 'root'}-{h.hexdigest()[:12]}"


def decode_error(encoded: bytes) -> str | None:
  """Why TF's image decoder (the one the input pipeline uses) rejects these bytes, or None if it decodes."""
  try:
    tf.io.decode_image(encoded, channels=3, expand_animations=False)
  except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as e:
    return re.sub(r"\{\{.*?\}\}\s*|\s*\[Op:\w+\]", "", e.message).strip() or type(e).__name__
  return None


class LocalImageFolder(tfds.core.GeneratorBasedBuilder):
  """Images from root/split/label/*; labels are the sorted label folder names, splits the split folder names."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def __init__(self, root_dir: str, *, strict: bool = False, prepared_dir: str | None = None, **kwargs):
    """prepared_dir: where the records go (default root_dir/.tfds); kwargs go to TFDS (e.g. file_format)."""
    if not os.path.isdir(root_dir):
      raise DataError(f"Image folder {root_dir!r} does not exist; set config.data_dir to a folder laid out as "
                      "root/split/label/*.jpg (e.g. root/train/cat/1.jpg, root/validation/cat/2.jpg).")
    self._root = os.path.abspath(root_dir)
    self._strict = strict
    self._listing = list_images(self._root)
    self._labels = sorted({label for files in self._listing.values() for _, label in files})
    if not self._labels:
      raise DataError(f"No images found in {root_dir!r}: expected root/split/label/*{'|'.join(IMAGE_EXTENSIONS)}.")
    config = tfds.core.BuilderConfig(name=_fingerprint(self._root, self._listing, strict))
    super().__init__(data_dir=prepared_dir or os.path.join(self._root, PREPARED_SUBDIR), config=config, **kwargs)
    # For pickling (TFDS data sources send the builder to worker processes): rebuild from our own arguments.
    self._original_state = dict(root_dir=self._root, strict=strict, prepared_dir=prepared_dir, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=f"Images from {self._root}.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),  # the original file's bytes, any format
            "label": tfds.features.ClassLabel(names=self._labels),
            "image/filename": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The files are local.
    return {split: self._generate_examples(split, files) for split, files in self._listing.items() if files}

  def _generate_examples(self, split, files):
    skipped = 0
    for path, label in files:
      with open(path, "rb") as f:
        encoded = f.read()
      if (error := decode_error(encoded)) is not None:
        if self._strict:
          raise DataError(f"{path} does not decode as an image ({error}). Remove or fix it, or set "
                          "config.strict_decode=False to skip undecodable files.")
        logging.warning("Skipping undecodable image %s (%s)", path, error)
        skipped += 1
        continue
      yield os.path.relpath(path, self._root), {
          "image": encoded, "label": label, "image/filename": os.path.relpath(path, self._root)}
    if skipped:
      logging.warning("Image folder split %r: skipped %d undecodable of %d files.", split, skipped, len(files))
