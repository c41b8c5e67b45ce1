"""TFDS builder for scikit-learn's 1,797 handwritten digits: a real dataset that ships with scikit-learn.

The images are 8x8 with 17 grey levels (UCI "Optical Recognition of Handwritten Digits", 43 writers). They are
stored upscaled to 32x32 uint8 so that the CIFAR-sized models run on them unchanged. No download is needed,
which makes this the dataset for demos, smoke tests and CI on machines without internet.
"""

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

IMAGE_SIZE = 32
TEST_EVERY = 6  # index % 6 == 5 goes to 'test': interleaving keeps every writer in both splits.


def split_indices(num_examples: int) -> dict[str, np.ndarray]:
  """Indices (in scikit-learn's order) of the 'train' and 'test' splits."""
  index = np.arange(num_examples)
  is_test = index % TEST_EVERY == TEST_EVERY - 1
  return {"train": index[~is_test], "test": index[is_test]}


def upscale(image_8x8: np.ndarray) -> np.ndarray:
  """0..16 grey levels at 8x8 -> 0..255 uint8 at 32x32 (bilinear, so strokes stay smooth)."""
  grey = Image.fromarray(np.round(image_8x8 * (255.0 / 16.0)).astype(np.uint8))
  return np.asarray(grey.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR))[..., None]


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's handwritten digits, 32x32x1 uint8, labels 0..9; 'train' 1,498 and 'test' 299 images."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 1), encoding_format="png"),
            "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
            "index": tfds.features.Scalar(np.int64, doc="Position in sklearn.datasets.load_digits()."),
        }),
        supervised_keys=("image", "label"),
        homepage="https://archive.ics.uci.edu/dataset/80",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ships inside scikit-learn.
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
    digits = load_digits()
    return {name: self._generate_examples(digits.images, digits.target, index)
            for name, index in split_indices(len(digits.target)).items()}

  def _generate_examples(self, images, labels, indices):
    for i in indices:
      yield int(i), {"image": upscale(images[i]), "label": int(labels[i]), "index": int(i)}

