"""Input pipeline on the real sklearn_digits data: batches, determinism, resume, exact evaluation, errors."""

import collections
import functools
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from conftest import data_mesh, digits_pipeline_config, take
from resnext_jax import errors
from resnext_jax import input_pipeline
from resnext_jax.datasets import sources
from resnext_jax.datasets import transforms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TEST = 299


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  input_pipeline.get_dataset_info(digits_pipeline_config(path))  # prepares sklearn_digits once for the module
  return path


def test_dataset_info(data_dir):
  info = input_pipeline.get_dataset_info(digits_pipeline_config(data_dir))  # eval_split 'validation' falls back to 'test'
  assert info == input_pipeline.DatasetInfo(10, 1498, NUM_TEST, (32, 32, 3), tuple("0123456789"))


def test_train_batches(data_dir):
  batch = next(input_pipeline.create_train_iterator(digits_pipeline_config(data_dir, image_size=40), data_mesh()))
  assert isinstance(batch["image"], jax.Array)
  assert batch["image"].shape == (64, 40, 40, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (64,) and batch["label"].dtype == np.int32
  assert batch["image"].sharding.spec == jax.sharding.PartitionSpec("data")
  image, label = np.asarray(batch["image"]), np.asarray(batch["label"])
  assert abs(image.mean()) < 0.2 and 0.8 < image.std() < 1.2  # normalised
  np.testing.assert_array_equal(image[..., 0], image[..., 2])  # grey digits as 3 equal channels
  assert label.min() >= 0 and label.max() <= 9 and len(set(label)) > 5  # shuffled, not sorted by class


def test_deterministic_for_a_seed(data_dir):
  mesh = data_mesh()
  first, again = (take(input_pipeline.create_train_iterator(digits_pipeline_config(data_dir), mesh), 3) for _ in range(2))
  other = take(input_pipeline.create_train_iterator(digits_pipeline_config(data_dir, seed=1), mesh), 1)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.array_equal(first[0]["label"], other[0]["label"])


def test_start_step_resumes_across_an_epoch_boundary(data_dir):
  config = digits_pipeline_config(data_dir, augment="cifar")  # random crops and flips too must resume identically
  steps_per_epoch = 1498 // 64  # 23
  full = take(input_pipeline.create_train_iterator(config, data_mesh()), steps_per_epoch + 3)
  resumed = take(input_pipeline.create_train_iterator(config, data_mesh(), start_step=steps_per_epoch - 2), 5)
  for a, b in zip(full[steps_per_epoch - 2:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  # Each epoch is reshuffled: the first batch of epoch 1 is not that of epoch 0.
  assert not np.array_equal(full[0]["label"], full[steps_per_epoch]["label"])


def _eval_reference(data_dir):
  """Label counts and per-image checksums of the test split, read directly from TFDS."""
  source = sources.get_source(digits_pipeline_config(data_dir))
  ds = tfds.as_numpy(source.builder.as_dataset(split="test", batch_size=-1))
  return collections.Counter(ds["label"].tolist())


@pytest.mark.parametrize("eval_batch_size", [64, 7, 512])
def test_eval_sees_every_example_once(data_dir, eval_batch_size):
  config = digits_pipeline_config(data_dir, eval_batch_size=eval_batch_size)
  batches = list(input_pipeline.create_eval_iterator(config, data_mesh()))
  assert len(batches) == -(-NUM_TEST // eval_batch_size)
  masks = np.concatenate([np.asarray(b["mask"]) for b in batches])
  labels = np.concatenate([np.asarray(b["label"]) for b in batches])
  images = np.concatenate([np.asarray(b["image"]) for b in batches])
  assert all(b["image"].shape == (eval_batch_size, 32, 32, 3) for b in batches)
  assert masks.dtype == bool and masks.sum() == NUM_TEST
  assert collections.Counter(labels[masks].tolist()) == _eval_reference(data_dir)
  assert len({img.tobytes() for img in images[masks]}) > NUM_TEST - 5  # distinct images, not repeats
  assert not images[~masks].any()  # padding is blank


@pytest.mark.parametrize("process_count,eval_batch_size", [(2, 64), (3, 48), (4, 400)])
def test_eval_on_several_processes(data_dir, process_count, eval_batch_size):
  """Each process's stream (as it would run on its own host): same batch count, each example once overall."""
  config = digits_pipeline_config(data_dir, eval_batch_size=eval_batch_size)
  source = sources.get_source(config)
  streams = [list(tfds.as_numpy(input_pipeline.eval_dataset(source, config, process_index=p,
                                                             process_count=process_count)))
             for p in range(process_count)]
  assert len({len(s) for s in streams}) == 1
  assert all(b["image"].shape[0] == eval_batch_size // process_count for s in streams for b in s)
  labels = collections.Counter()
  for stream in streams:
    for b in stream:
      labels.update(b["label"][b["mask"]].tolist())
  assert sum(labels.values()) == NUM_TEST and labels == _eval_reference(data_dir)


def test_train_processes_read_disjoint_parts(data_dir):
  config = digits_pipeline_config(data_dir, batch_size=128, augment="none")
  source = sources.get_source(config)
  images = []
  for p in range(2):
    ds = input_pipeline.train_dataset(source, config, start_step=0, process_index=p, process_count=2)
    batches = list(tfds.as_numpy(ds.take(1498 // 128)))  # one epoch
    assert all(b["image"].shape == (64, 32, 32, 3) for b in batches)
    images.append({img.tobytes() for b in batches for img in b["image"]})
  assert len(images[0] & images[1]) < 5  # only accidental duplicate digits are shared


@pytest.mark.parametrize("augment", ["none", "cifar"])
def test_cache_keeps_decoded_pixels_and_the_same_stream(data_dir, augment):
  """config.cache keeps the seed-free part of the transform (decoded pixels), not the bytes: later epochs do not
  decode again, and every batch, train (across an epoch boundary, resumed too) and eval, is what it was."""
  config = digits_pipeline_config(data_dir, augment=augment, batch_size=128, eval_batch_size=128)
  cached = digits_pipeline_config(data_dir, augment=augment, batch_size=128, eval_batch_size=128, cache=True)
  source = sources.get_source(cached)
  records = source.builder.as_dataset(split="train", decoders={"image": tfds.decode.SkipDecoding()})
  kept = input_pipeline._tf_side()._cache(records, functools.partial(
      transforms.seedless_pixels, augment=augment, size=32, crop_ratio=None))
  assert kept.element_spec["pixels"].shape == (32, 32, 3) and "image" not in kept.element_spec
  steps = 1498 // 128 + 2  # into the second epoch, read from the cache
  for start in (0, 5):
    want, got = (take(input_pipeline.create_train_iterator(c, data_mesh(), start_step=start), steps - start)
                 for c in (config, cached))
    for a, b in zip(want, got):
      np.testing.assert_array_equal(a["image"], b["image"])
      np.testing.assert_array_equal(a["label"], b["label"])
  for a, b in zip(*(list(input_pipeline.create_eval_iterator(c, data_mesh())) for c in (config, cached))):
    for k in ("image", "label", "mask"):
      np.testing.assert_array_equal(a[k], b[k])


def test_preprocess_eval_image_matches_the_eval_stream(data_dir):
  config = digits_pipeline_config(data_dir)
  source = sources.get_source(config)
  encoded = next(iter(source.builder.as_dataset(split="test", decoders={"image": tfds.decode.SkipDecoding()})))
  image = input_pipeline.preprocess_eval_image(encoded["image"].numpy(), config)
  first = np.asarray(next(input_pipeline.create_eval_iterator(config, data_mesh()))["image"])[0]
  assert image.shape == (32, 32, 3) and image.dtype == np.float32
  np.testing.assert_allclose(image, first, atol=1e-6)
  with pytest.raises(ValueError):
    input_pipeline.preprocess_eval_image(b"definitely not an image", config)


@pytest.mark.parametrize("overrides", [
    dict(), dict(input_transform="legacy"), dict(reprob=1.0, aug_repeats=2, augment="cifar"),
    dict(dataset="synthetic", synthetic_num_classes=10)])
def test_train_batch_spec_is_what_the_iterator_yields(data_dir, overrides):
  """The train step is compiled for train_batch_spec before the pipeline starts (train.py): a mismatch would
  trace, time and compile the step a second time."""
  config = digits_pipeline_config(data_dir, image_size=24, **overrides)
  _assert_matches(next(input_pipeline.create_train_iterator(config, data_mesh())),
                  input_pipeline.train_batch_spec(config, data_mesh()))


@pytest.mark.parametrize("overrides", [
    dict(), dict(input_transform="legacy"), dict(dataset="synthetic", synthetic_num_examples=50)])
def test_eval_batch_spec_is_what_the_iterator_yields(data_dir, overrides):
  """As above, for the eval step (evaluate.trace_ahead)."""
  config = digits_pipeline_config(data_dir, image_size=24, eval_batch_size=32, **overrides)
  _assert_matches(next(input_pipeline.create_eval_iterator(config, data_mesh())),
                  input_pipeline.eval_batch_spec(config, data_mesh()))


def _assert_matches(batch, spec):
  assert jax.tree.structure(batch) == jax.tree.structure(spec)
  for got, want in zip(jax.tree.leaves(batch), jax.tree.leaves(spec)):
    assert (got.shape, got.dtype) == (want.shape, want.dtype)
    assert got.sharding.is_equivalent_to(want.sharding, got.ndim), (got.sharding, want.sharding)


def test_synthetic():
  config = digits_pipeline_config(None, dataset="synthetic", synthetic_num_classes=7, synthetic_num_examples=50,
                   image_size=16, batch_size=8, eval_batch_size=16)
  info = input_pipeline.get_dataset_info(config)
  assert (info.num_classes, info.num_train_examples, info.image_shape) == (7, 50, (16, 16, 3))
  batch = next(input_pipeline.create_train_iterator(config, data_mesh()))
  assert batch["image"].shape == (8, 16, 16, 3) and int(np.max(batch["label"])) < 7
  masks = [np.asarray(b["mask"]) for b in input_pipeline.create_eval_iterator(config, data_mesh())]
  assert len(masks) == 4 and sum(m.sum() for m in masks) == 50


@pytest.mark.parametrize("overrides,message", [
    (dict(dataset="mnist"), "Unknown dataset 'mnist'"),
    (dict(augment="mixup"), "augment"),
    (dict(eval_split="nonexistent", dataset="sklearn_digits"), None),  # falls back to 'test': no error
    (dict(train_split="bogus"), "no split 'bogus'"),
])
def test_config_errors(data_dir, overrides, message):
  config = digits_pipeline_config(data_dir, **overrides)
  if message is None:
    assert input_pipeline.get_dataset_info(config).num_eval_examples == NUM_TEST
  else:
    with pytest.raises(errors.DataError, match=message):
      input_pipeline.get_dataset_info(config)


@pytest.mark.parametrize("crop_ratio", [0.0, -0.5, 1.2])
def test_crop_ratio_outside_0_1_is_a_config_error(tmp_path, crop_ratio):
  config = digits_pipeline_config(str(tmp_path), dataset="imagenet2012", image_size=224, crop_ratio=crop_ratio)
  with pytest.raises(errors.ConfigError, match=r"config.crop_ratio must be in \(0, 1\]"):
    input_pipeline.preprocess_eval_image(b"", config)


def test_imagenet_not_prepared_says_what_to_do(tmp_path):
  with pytest.raises(errors.DataError) as error:
    input_pipeline.get_dataset_info(digits_pipeline_config(str(tmp_path), dataset="imagenet2012"))
  message = str(error.value)
  assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
  assert str(tmp_path / "downloads" / "manual") in message and "tfds build imagenet2012" in message


def test_imagenet_eval_transform_needs_no_prepared_imagenet(tmp_path):
  """Predicting with converted ImageNet weights must work on a machine without ImageNet."""
  import io
  from PIL import Image
  buffer = io.BytesIO()
  Image.new("RGB", (500, 375), (255, 255, 255)).save(buffer, format="PNG")
  config = digits_pipeline_config(str(tmp_path), dataset="imagenet2012", image_size=224)
  image = input_pipeline.preprocess_eval_image(buffer.getvalue(), config)
  assert image.shape == (224, 224, 3) and image.dtype == np.float32
  white = (1.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])  # ImageNet mean/std
  np.testing.assert_allclose(image.reshape(-1, 3), np.broadcast_to(white, (224 * 224, 3)), rtol=1e-3)


_MULTI_DEVICE = textwrap.dedent("""
    import collections, sys
    import jax, numpy as np
    from jax.sharding import Mesh
    from resnext_jax import errors, input_pipeline
    from resnext_jax.configs import default
    assert jax.device_count() == 4
    config = default.get_config()
    config.update(dataset="sklearn_digits", data_dir=sys.argv[1], image_size=32, batch_size=32,
                  eval_batch_size=20, shuffle_buffer_size=2048)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    batch = next(input_pipeline.create_train_iterator(config, mesh))
    assert batch["image"].shape == (32, 32, 32, 3)
    assert len(batch["image"].addressable_shards) == 4
    assert {s.data.shape for s in batch["image"].addressable_shards} == {(8, 32, 32, 3)}
    n, labels = 0, collections.Counter()
    for b in input_pipeline.create_eval_iterator(config, mesh):
      n += 1
      mask, label = np.asarray(b["mask"]), np.asarray(b["label"])
      labels.update(label[mask].tolist())
    print("eval", n, sum(labels.values()), sorted(labels.items()))
    config.batch_size = 30
    try:
      input_pipeline.create_train_iterator(config, mesh)
    except errors.ConfigError as e:
      print("error", e)
""")


def test_several_devices(data_dir):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO)
  result = subprocess.run([sys.executable, "-c", _MULTI_DEVICE, data_dir], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=240)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.startswith(("eval", "error")))
  count, total, labels = lines["eval"].split(" ", 2)
  assert (int(count), int(total)) == (15, NUM_TEST)  # ceil(299 / 20) batches, every example once
  assert labels == str(sorted(_eval_reference(data_dir).items()))
  assert "batch_size=30" in lines["error"] and "(4)" in lines["error"]
