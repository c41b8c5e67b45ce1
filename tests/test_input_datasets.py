"""CIFAR and ImageNet through `tfds.testing.mock_data`, image folders of real files, and the transforms."""

import io
import logging
import os

import jax
from jax.sharding import Mesh
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from resnext_jax import errors
from resnext_jax import input_pipeline
from resnext_jax.datasets import transforms
from resnext_jax.configs import default


def _config(**overrides):
  config = default.get_config()
  config.update(batch_size=8, eval_batch_size=8, shuffle_buffer_size=64)
  config.update(overrides)
  return config


def _mesh():
  return Mesh(np.array(jax.devices()), ("data",))


def _write_metadata(data_dir, name, split_sizes):
  """What preparation would leave besides the records: dataset_info.json with the split sizes."""
  builder = tfds.builder(name, data_dir=data_dir)
  builder.info.set_splits(tfds.core.SplitDict(
      [tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0) for s, n in split_sizes.items()]))
  os.makedirs(builder.data_dir)
  builder.info.write_to_directory(builder.data_dir)


def _value_range(mean, std):
  return (0 - np.array(mean)) / np.array(std), (1 - np.array(mean)) / np.array(std)


@pytest.mark.parametrize("name,num_classes,eval_split,mean,std", [
    ("cifar10", 10, "test", transforms.CIFAR10_MEAN, transforms.CIFAR10_STD),
    ("cifar100", 100, "test", transforms.CIFAR100_MEAN, transforms.CIFAR100_STD),
    ("imagenet2012", 1000, "validation", transforms.IMAGENET_MEAN, transforms.IMAGENET_STD),
])
def test_tfds_datasets_with_mock_data(tmp_path, name, num_classes, eval_split, mean, std):
  sizes = {"train": 12, eval_split: 12}  # mock_data gives every split num_examples examples
  _write_metadata(str(tmp_path), name, sizes)
  size = 32 if name.startswith("cifar") else 48
  config = _config(dataset=name, data_dir=str(tmp_path), image_size=size, eval_batch_size=5)
  with tfds.testing.mock_data(num_examples=12, data_dir=str(tmp_path)):
    info = input_pipeline.get_dataset_info(config)
    train = [next(input_pipeline.create_train_iterator(config, _mesh()))]
    evals = list(input_pipeline.create_eval_iterator(config, _mesh()))
  assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (num_classes, 12, 12)
  assert len(info.class_names) == num_classes and info.image_shape == (size, size, 3)
  low, high = _value_range(mean, std)
  for batch in train + evals:
    image, label = np.asarray(batch["image"]), np.asarray(batch["label"])
    assert image.shape[1:] == (size, size, 3) and image.dtype == np.float32 and label.dtype == np.int32
    assert label.min() >= 0 and label.max() < num_classes
    assert (image >= low - 1e-4).all() and (image <= high + 1e-4).all()
    assert image.std() > 0.1  # random pixels, not blank
  assert train[0]["image"].shape[0] == 8
  # ceil(12 / 5) batches, the last one padded.
  assert [np.asarray(b["mask"]).sum() for b in evals] == [5, 5, 2]


def _write_image(path, size, fmt):
  rng = np.random.default_rng(len(path))
  pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(path, format=fmt)


@pytest.fixture
def image_folder(tmp_path):
  for split, per_class in (("train", 5), ("validation", 3)):
    for c, label in enumerate(("cat", "dog")):
      os.makedirs(tmp_path / split / label)
      for i in range(per_class):
        fmt = "PNG" if i % 2 else "JPEG"
        _write_image(str(tmp_path / split / label / f"{i}.{fmt.lower()}"), (30 + 7 * i, 50 - 5 * c), fmt)
  (tmp_path / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  (tmp_path / "train" / "dog" / "notes.txt").write_text("ignored: not an image file")
  return tmp_path


def test_image_folder_skips_and_logs_broken_files(image_folder, caplog):
  config = _config(dataset="imagefolder", data_dir=str(image_folder), image_size=24, eval_batch_size=4)
  with caplog.at_level(logging.WARNING):
    info = input_pipeline.get_dataset_info(config)
  assert "broken.jpg" in caplog.text and "skipped 1 undecodable of 11" in caplog.text
  assert info == input_pipeline.DatasetInfo(2, 10, 6, (24, 24, 3), ("cat", "dog"))
  batch = next(input_pipeline.create_train_iterator(config, _mesh()))
  assert batch["image"].shape == (8, 24, 24, 3) and set(np.asarray(batch["label"])) <= {0, 1}
  evals = list(input_pipeline.create_eval_iterator(config, _mesh()))
  assert len(evals) == 2 and sum(np.asarray(b["mask"]).sum() for b in evals) == 6
  # Preparation happens once: a second look reuses it without logging the broken file again.
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    input_pipeline.get_dataset_info(config)
  assert "broken.jpg" not in caplog.text


def test_image_folder_strict_names_the_broken_file(image_folder):
  config = _config(dataset="imagefolder", data_dir=str(image_folder), strict_decode=True)
  with pytest.raises(errors.DataError, match="broken.jpg"):
    input_pipeline.get_dataset_info(config)


def test_image_folder_reprepares_when_files_change(image_folder):
  config = _config(dataset="imagefolder", data_dir=str(image_folder))
  assert input_pipeline.get_dataset_info(config).num_train_examples == 10
  _write_image(str(image_folder / "train" / "cat" / "new.png"), (40, 40), "PNG")
  assert input_pipeline.get_dataset_info(config).num_train_examples == 11


def test_missing_image_folder(tmp_path):
  with pytest.raises(errors.DataError, match="does not exist"):
    input_pipeline.get_dataset_info(_config(dataset="imagefolder", data_dir=str(tmp_path / "nope")))


def _encode(image, fmt, **kwargs):
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def _smooth_image(h, w):
  y, x = np.mgrid[0:h, 0:w] / max(h, w)
  return np.stack([255 * x, 255 * y, 127 + 100 * np.sin(6 * x * y)], -1).astype(np.uint8)


def test_eval_transform_is_resize_256_center_crop_224():
  image = _smooth_image(375, 500)
  ours = transforms.eval_image(tf.constant(_encode(image, "PNG")), size=224, crop_ratio=0.875,
                               mean=(0.0,) * 3, std=(1 / 255,) * 3).numpy()
  resized = Image.fromarray(image).resize((341, 256), Image.BILINEAR)  # shorter side 375 -> 256
  left, top = (341 - 224) // 2, (256 - 224) // 2
  reference = np.asarray(resized.crop((left, top, left + 224, top + 224)), np.float32)
  assert ours.shape == (224, 224, 3)
  # PIL's crop starts at an integer pixel (58 of 341), ours at the exact centre: 0.35 apart; a crop shifted by
  # 2 pixels or a wrong scale is > 0.6 away.
  assert np.abs(ours - reference).mean() < 0.5


def test_train_crop_same_for_jpeg_and_png_and_seeded():
  image = _smooth_image(120, 160)
  jpeg, png = _encode(image, "JPEG", quality=100), _encode(image, "PNG")
  kwargs = dict(augment="inception", size=64, crop_ratio=0.875, mean=(0.0,) * 3, std=(1 / 255,) * 3)
  seed = tf.constant([3, 4], tf.int64)
  from_jpeg = transforms.train_image(tf.constant(jpeg), seed, **kwargs).numpy()
  from_png = transforms.train_image(tf.constant(png), seed, **kwargs).numpy()
  assert np.abs(from_jpeg - from_png).mean() < 3.0  # same window through both decoders
  others = [transforms.train_image(tf.constant(png), tf.constant([3, s], tf.int64), **kwargs).numpy()
            for s in range(5, 9)]
  assert all(np.abs(o - from_png).mean() > 3.0 for o in others)  # the seed decides the crop


def test_cifar_augmentation_pads_and_crops():
  image = np.full((32, 32, 3), 255, np.uint8)
  outs = [transforms.train_image(tf.constant(_encode(image, "PNG")), tf.constant([0, s], tf.int64),
                                 augment="cifar", size=32, crop_ratio=None, mean=(0.0,) * 3,
                                 std=(1 / 255,) * 3).numpy() for s in range(8)]
  assert all(o.shape == (32, 32, 3) for o in outs)
  black_rows = [int((o.max(axis=(1, 2)) < 1).sum() + (o.max(axis=(0, 2)) < 1).sum()) for o in outs]
  assert max(black_rows) > 0 and max(black_rows) <= 8  # zero padding shows, at most 4 px per side
