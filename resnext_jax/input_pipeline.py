"""Input pipelines: TFDS datasets -> global batches (`jax.Array`s sharded along the 'data' mesh axis).

Each process reads its own even part of a split (`tfds.even_splits`) and contributes batch_size / process_count
examples to every global batch. The training stream is a function of (config, step): epoch e is shuffled with a
seed derived from (config.seed, e) and each example's augmentation is seeded by its position in the epoch, so a
run resumed at `start_step` gets the same batches as an uninterrupted one. Evaluation pads the last batches and
carries a mask so that every example counts exactly once, with the same number of batches on every process.
"""

import collections
from collections.abc import Iterable, Iterator
import dataclasses
import functools
import logging
import math

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from resnext_jax import runtime
from resnext_jax.datasets import sources
from resnext_jax.datasets import transforms
from resnext_jax.errors import DataError

__all__ = ["DataError", "DatasetInfo", "get_dataset_info", "create_train_iterator", "create_eval_iterator",
           "preprocess_eval_image"]

_SKIP_DECODING = {"image": tfds.decode.SkipDecoding()}  # our transforms decode (and crop) the bytes themselves


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  num_train_examples: int       # whole train split (all processes)
  num_eval_examples: int        # whole eval split
  image_shape: tuple            # (H, W, 3) of the batches produced
  class_names: tuple[str, ...]  # ImageNet synsets, '0'..'9' for digits, folder names for imagefolder


def get_dataset_info(config) -> DatasetInfo:
  """Sizes and classes from the TFDS info (prepares sklearn_digits / imagefolder on first use)."""
  shape = (config.image_size, config.image_size, 3)
  if config.dataset == "synthetic":
    n = config.synthetic_num_classes
    return DatasetInfo(n, config.synthetic_num_examples, config.synthetic_num_examples, shape,
                       tuple(map(str, range(n))))
  _tf_cpu_only()
  source = sources.get_source(config)
  info = source.builder.info
  label = info.features["label"]
  return DatasetInfo(num_classes=label.num_classes,
                     num_train_examples=info.splits[source.train_split].num_examples,
                     num_eval_examples=info.splits[source.eval_split].num_examples,
                     image_shape=shape, class_names=tuple(label.names))


def create_train_iterator(config, mesh, *, start_step: int = 0) -> Iterator[dict]:
  """Endless {'image': f32 (B, H, W, 3), 'label': i32 (B,)} global batches; step k is the same from any start."""
  runtime.check_batch_size("batch_size", config.batch_size, mesh)
  if config.dataset == "synthetic":
    return _synthetic_batches(config, mesh, config.batch_size, num_batches=None)
  _tf_cpu_only()
  ds = train_dataset(sources.get_source(config), config, start_step=start_step,
                     process_index=jax.process_index(), process_count=jax.process_count())
  return _global_batches(tfds.as_numpy(ds), mesh, config.batch_size, config.prefetch)


def create_eval_iterator(config, mesh) -> Iterator[dict]:
  """Finite {'image', 'label', 'mask' (bool)} global batches of eval_batch_size; each example has mask True once."""
  runtime.check_batch_size("eval_batch_size", config.eval_batch_size, mesh)
  if config.dataset == "synthetic":
    num_batches = math.ceil(config.synthetic_num_examples / config.eval_batch_size)
    return _synthetic_batches(config, mesh, config.eval_batch_size, num_batches=num_batches)
  _tf_cpu_only()
  ds = eval_dataset(sources.get_source(config), config,
                    process_index=jax.process_index(), process_count=jax.process_count())
  return _global_batches(tfds.as_numpy(ds), mesh, config.eval_batch_size, config.prefetch)


def preprocess_eval_image(encoded_bytes: bytes, config) -> np.ndarray:
  """One image file's bytes -> the dataset's eval input (H, W, 3) float32; ValueError if it does not decode."""
  _tf_cpu_only()
  if config.dataset == "synthetic":
    raise DataError("preprocess_eval_image needs a real dataset's transform; config.dataset is 'synthetic'.")
  style = sources.transform_style(config)
  try:
    image = _eval_transform(style, config)(tf.constant(encoded_bytes))
  except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as e:
    raise ValueError(f"Not a decodable image ({e.message.splitlines()[0] if e.message else e}).") from e
  return image.numpy()


# --- Per-process tf.data pipelines (process_index/count are arguments so that tests can play every process). ---


def train_dataset(source: sources.Source, config, *, start_step: int, process_index: int,
                  process_count: int) -> tf.data.Dataset:
  """This process's endless stream of local training batches, starting at global step start_step."""
  local_batch = config.batch_size // process_count
  num_examples = source.builder.info.splits[source.train_split].num_examples
  steps_per_epoch = num_examples // config.batch_size
  if steps_per_epoch == 0:
    raise DataError(f"config.batch_size={config.batch_size} exceeds the {num_examples} examples of "
                    f"{source.builder.name}:{source.train_split}; use a smaller batch size.")
  first_epoch, steps_into_epoch = divmod(start_step, steps_per_epoch)
  # Deterministic file order (no reshuffle): a resumed run must read what the original run read.
  records = source.builder.as_dataset(
      split=tfds.even_splits(source.train_split, process_count)[process_index], shuffle_files=True,
      decoders=_SKIP_DECODING,
      read_config=tfds.ReadConfig(shuffle_seed=config.seed, shuffle_reshuffle_each_iteration=False))
  if config.cache:
    records = records.cache()
  key = tf.constant([config.seed, process_index], tf.int64)

  def epoch(e):
    # Equal-length epochs on every process (steps_per_epoch full batches), so steps map to (epoch, offset).
    seed = tf.random.experimental.stateless_fold_in(key, e)
    shuffle_seed = tf.random.stateless_uniform([], seed, minval=None, maxval=None, dtype=tf.int64)
    ds = records.shuffle(config.shuffle_buffer_size, seed=shuffle_seed).take(steps_per_epoch * local_batch)
    ds = ds.enumerate().map(lambda i, ex: (tf.random.experimental.stateless_fold_in(seed, i), ex))
    skip = tf.where(e == first_epoch, tf.constant(steps_into_epoch * local_batch, tf.int64), 0)
    return ds.skip(skip)  # before decoding: resuming costs reading, not decoding, the skipped examples

  transform = functools.partial(transforms.train_image, augment=source.augment, size=config.image_size,
                                crop_ratio=source.eval_crop_ratio, mean=source.mean, std=source.std)
  ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(epoch)
  ds = ds.map(lambda seed, ex: {"image": transform(ex["image"], seed), "label": tf.cast(ex["label"], tf.int32)},
              num_parallel_calls=tf.data.AUTOTUNE)
  return _finish(ds.batch(local_batch, drop_remainder=True))


def eval_dataset(source: sources.Source, config, *, process_index: int, process_count: int) -> tf.data.Dataset:
  """This process's local eval batches: its part of the split, then masked padding up to a common batch count."""
  local_batch = config.eval_batch_size // process_count
  parts = tfds.even_splits(source.eval_split, process_count)
  splits = source.builder.info.splits
  num_batches = max(math.ceil(splits[part].num_examples / local_batch) for part in parts)
  transform = _eval_transform(sources.transform_style(config), config)
  ds = source.builder.as_dataset(split=parts[process_index], shuffle_files=False, decoders=_SKIP_DECODING)
  if config.cache:
    ds = ds.cache()
  ds = ds.map(lambda ex: {"image": transform(ex["image"]), "label": tf.cast(ex["label"], tf.int32),
                          "mask": tf.constant(True)}, num_parallel_calls=tf.data.AUTOTUNE)
  padding = tf.data.Dataset.from_tensors({"image": tf.zeros((config.image_size, config.image_size, 3)),
                                          "label": tf.constant(0), "mask": tf.constant(False)}).repeat()
  ds = ds.concatenate(padding).take(num_batches * local_batch)
  return _finish(ds.batch(local_batch, drop_remainder=True))


def _eval_transform(style: dict, config):
  return functools.partial(transforms.eval_image, size=config.image_size, crop_ratio=style["eval_crop_ratio"],
                           mean=style["mean"], std=style["std"])


def _finish(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True  # parallel map and interleave still keep the order: the stream is reproducible
  return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


# --- JAX side. ---


def _global_batches(local_batches: Iterable[dict], mesh, global_batch_size: int, prefetch: int) -> Iterator[dict]:
  """Assembles process-local numpy batches into global arrays, keeping `prefetch` batches in flight to device."""
  sharding = NamedSharding(mesh, P("data"))

  def to_global(x):
    return jax.make_array_from_process_local_data(sharding, x, (global_batch_size, *x.shape[1:]))

  queue = collections.deque()
  for batch in local_batches:
    queue.append(jax.tree.map(to_global, batch))  # device transfers are asynchronous
    while len(queue) > prefetch:
      yield queue.popleft()
  yield from queue


def _synthetic_batches(config, mesh, global_batch_size: int, num_batches: int | None) -> Iterator[dict]:
  """One random batch, kept on device and yielded again: measures the model, not the input pipeline."""
  local_batch = global_batch_size // jax.process_count()
  rng = np.random.default_rng([config.seed, jax.process_index()])
  local = {"image": rng.standard_normal((local_batch, config.image_size, config.image_size, 3), np.float32),
           "label": rng.integers(0, config.synthetic_num_classes, local_batch, dtype=np.int32)}
  if num_batches is None:
    batch = next(_global_batches([local], mesh, global_batch_size, prefetch=0))
    while True:
      yield batch
  # Eval: number the examples as the local slices are laid out; the ones past synthetic_num_examples are masked.
  first = jax.process_index() * local_batch + np.arange(local_batch)
  for b in range(num_batches):
    mask = b * global_batch_size + first < config.synthetic_num_examples
    yield from _global_batches([dict(local, mask=mask)], mesh, global_batch_size, prefetch=0)


@functools.cache
def _tf_cpu_only() -> None:
  """Hides accelerators from TF so that tf.data does not reserve the memory JAX needs (once, before TF ops)."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    logging.warning("TensorFlow initialised its devices before the input pipeline; it may hold GPU memory.")
