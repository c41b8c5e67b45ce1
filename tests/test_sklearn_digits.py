"""The sklearn_digits TFDS builder: real data from scikit-learn, prepared into a temporary data_dir."""

import numpy as np
import pytest
from sklearn.datasets import load_digits
import tensorflow_datasets as tfds

from resnext_jax.datasets import sklearn_digits


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
  builder = sklearn_digits.SklearnDigits(data_dir=str(tmp_path_factory.mktemp("tfds")))
  builder.download_and_prepare()
  return builder, {name: tfds.as_numpy(builder.as_dataset(split=name, batch_size=-1)) for name in ("train", "test")}


def test_split_sizes_and_registration(splits):
  builder, _ = splits
  assert builder.info.splits["train"].num_examples == 1498
  assert builder.info.splits["test"].num_examples == 299
  assert builder.info.features["label"].names == [str(d) for d in range(10)]
  # Registered under its name, so tfds.builder finds the prepared data.
  assert tfds.builder("sklearn_digits", data_dir=builder.data_dir.split("/sklearn_digits")[0]).is_prepared()


def test_test_split_is_every_sixth_image(splits):
  _, data = splits
  assert sorted(data["test"]["index"]) == list(range(5, 1797, 6))
  assert sorted(data["train"]["index"]) == [i for i in range(1797) if i % 6 != 5]


def test_images_and_labels_are_sklearns(splits):
  _, data = splits
  digits = load_digits()
  for split in data.values():
    assert split["image"].shape[1:] == (32, 32, 1) and split["image"].dtype == np.uint8
    np.testing.assert_array_equal(split["label"], digits.target[split["index"]])
    assert set(split["label"]) == set(range(10))  # every class in both splits
    expected = np.stack([sklearn_digits.upscale(digits.images[i]) for i in split["index"]])
    np.testing.assert_array_equal(split["image"], expected)  # stored losslessly, image matches its index


def test_upscale_keeps_the_digit():
  image = load_digits().images[0]
  big = sklearn_digits.upscale(image)
  assert big.shape == (32, 32, 1) and big.dtype == np.uint8 and big.max() > 200
  small = big[..., 0].reshape(8, 4, 8, 4).mean(axis=(1, 3))
  assert np.corrcoef(small.ravel(), image.ravel())[0, 1] > 0.95


def test_split_indices_interleave():
  idx = sklearn_digits.split_indices(12)
  np.testing.assert_array_equal(idx["test"], [5, 11])
  assert len(idx["train"]) == 10
