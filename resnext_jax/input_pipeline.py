"""Input pipelines: TFDS datasets -> global batches (`jax.Array`s sharded along the 'data' mesh axis).

Each process reads its own even part of a split (`tfds.even_splits`) and contributes batch_size / process_count
examples to every global batch. The training stream is a function of (config, step): epoch e is shuffled with a
seed derived from (config.seed, e) and each example's augmentation is seeded by its position in the epoch, so a
run resumed at `start_step` gets the same batches as an uninterrupted one. Evaluation pads the last batches and
carries a mask so that every example counts exactly once, with the same number of batches on every process.
"""

import collections
from collections.abc import Iterable, Iterator
import concurrent.futures
import dataclasses
import functools
import importlib
import math

from absl import logging
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import numpy as np

from resnext_jax import runtime
from resnext_jax.datasets import augment
from resnext_jax.datasets import normalization
from resnext_jax.errors import ConfigError, DataError

__all__ = ["DataError", "DatasetInfo", "get_dataset_info", "create_train_iterator", "create_eval_iterator",
           "preprocess_eval_image"]


def _tf_side():
  """resnext_jax.datasets.tf_pipeline, imported (with TensorFlow) only when a pipeline over real data is built."""
  tf_pipeline = importlib.import_module("resnext_jax.datasets.tf_pipeline")
  tf_pipeline.tf_cpu_only()
  return tf_pipeline


def __getattr__(name):
  """train_dataset / eval_dataset (the per-process tf.data pipelines) live in datasets/tf_pipeline.py."""
  if name in ("train_dataset", "eval_dataset"):
    return getattr(_tf_side(), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
  source = _tf_side().sources.get_source(config)
  info = source.builder.info
  label = info.features["label"]
  return DatasetInfo(num_classes=label.num_classes,
                     num_train_examples=info.splits[source.train_split].num_examples,
                     num_eval_examples=info.splits[source.eval_split].num_examples,
                     image_shape=shape, class_names=tuple(label.names))


def create_train_iterator(config, mesh, *, start_step: int = 0) -> Iterator[dict]:
  """Endless {'image': f32 (B, H, W, 3), 'label': i32 (B,)} global batches; step k is the same from any start."""
  runtime.check_batch_size("batch_size", config.batch_size, mesh)
  augment.check_config(config)  # bad augmentation settings fail early, before any data is prepared
  if config.dataset == "synthetic":
    return _synthetic_batches(config, mesh, config.batch_size, num_batches=None)
  on_device = _decode_on_device(config)  # fails early, before any data is prepared
  erasing = augment.erasing(config)
  tf_side = _tf_side()
  source = tf_side.sources.get_source(config)
  ds = tf_side.train_dataset(source, config, start_step=start_step, process_index=jax.process_index(),
                             process_count=jax.process_count(), encoded=on_device,
                             local_devices=_local_device_count(mesh))
  if on_device:
    return _device_decoded_batches(ds.as_numpy_iterator(), mesh, config.batch_size, config.prefetch, config,
                                   (source.mean, source.std), erasing=erasing)
  return _global_batches(ds.as_numpy_iterator(), mesh, config.batch_size, config.prefetch,
                         normalize=None if tf_side.is_legacy(config) else (source.mean, source.std),
                         erasing=erasing)


def train_batch_spec(config, mesh) -> dict:
  """The global training batch every train iterator yields, as ShapeDtypeStructs sharded on 'data': what the train
  step is compiled for before any input is read (tests/test_input_pipeline.py checks it against each pipeline)."""
  return _batch_spec(mesh, config.batch_size, config.image_size)


def eval_batch_spec(config, mesh) -> dict:
  """The global batch create_eval_iterator(config, mesh) yields, as train_batch_spec (with its 'mask')."""
  return _batch_spec(mesh, config.eval_batch_size, config.image_size, mask=True)


def _batch_spec(mesh, batch_size: int, size: int, mask: bool = False) -> dict:
  def spec(shape, dtype):
    return jax.ShapeDtypeStruct((batch_size, *shape), dtype, sharding=runtime.batch_sharded(mesh))

  out = {"image": spec((size, size, 3), jnp.float32), "label": spec((), jnp.int32)}
  return dict(out, mask=spec((), jnp.bool_)) if mask else out


def eval_image_size(config) -> int:
  """config.eval_image_size, or config.image_size when it is 0 (unset)."""
  size = int(config.get("eval_image_size", 0) or 0)
  if size < 0:
    raise ConfigError(f"config.eval_image_size must be >= 0 (0: image_size), got {size}")
  return size or int(config.image_size)


def eval_config(config):
  """The config the eval input pipeline (and predict's preprocessing) reads: `config` itself, or a copy whose
  image_size is config.eval_image_size when that is set and differs."""
  size = eval_image_size(config)
  if size == config.image_size:
    return config
  copy = config.copy_and_resolve_references()
  with copy.unlocked():
    copy.image_size = size
  return copy


def create_eval_iterator(config, mesh) -> Iterator[dict]:
  """Finite {'image', 'label', 'mask' (bool)} global batches of eval_batch_size; each example has mask True once."""
  runtime.check_batch_size("eval_batch_size", config.eval_batch_size, mesh)
  if config.dataset == "synthetic":
    num_batches = math.ceil(config.synthetic_num_examples / config.eval_batch_size)
    return _synthetic_batches(config, mesh, config.eval_batch_size, num_batches=num_batches)
  on_device = _decode_on_device(config)  # fails early, before any data is prepared
  tf_side = _tf_side()
  source = tf_side.sources.get_source(config)
  ds = tf_side.eval_dataset(source, config, process_index=jax.process_index(), process_count=jax.process_count(),
                            encoded=on_device)
  if on_device:
    return _device_decoded_batches(ds.as_numpy_iterator(), mesh, config.eval_batch_size, config.prefetch, config,
                                   (source.mean, source.std))
  return _global_batches(ds.as_numpy_iterator(), mesh, config.eval_batch_size, config.prefetch,
                         normalize=None if tf_side.is_legacy(config) else (source.mean, source.std))


def preprocess_eval_image(encoded_bytes: bytes, config) -> np.ndarray:
  """One image file's bytes -> the dataset's eval input (H, W, 3) float32; ValueError if it does not decode."""
  if config.dataset == "synthetic":
    raise DataError("preprocess_eval_image needs a real dataset's transform; config.dataset is 'synthetic'.")
  tf_side = _tf_side()
  style = tf_side.sources.transform_style(config)
  pixels = tf_side.eval_pixels(encoded_bytes, config)
  if tf_side.is_legacy(config):
    return pixels  # already normalised on the host
  return normalization.normalize_numpy(pixels, style["mean"], style["std"])


# --- JAX side. ---


def _global_batches(local_batches: Iterable[dict], mesh, global_batch_size: int, prefetch: int,
                    normalize=None, erasing=None) -> Iterator[dict]:
  """Assembles process-local numpy batches into global arrays, keeping `prefetch` batches in flight to device.

  With normalize=(mean, std), 'image' arrives as uint8 and is normalised on the device (padding, mask False,
  stays all-zero): the host ships a quarter of the bytes and does no float work.
  With erasing (augment.Erasing; training only), each example's 'erase_key' drives timm's random erasing on the
  normalised images, on the device (augment.random_erase); the key is not passed on.
  """
  sharding = NamedSharding(mesh, P("data"))

  def to_global(x):
    return jax.make_array_from_process_local_data(sharding, x, (global_batch_size, *x.shape[1:]))

  constants = None if normalize is None else tuple(map(tuple, normalization.normalization(*normalize)))
  queue = collections.deque()
  for batch in local_batches:
    batch = jax.tree.map(to_global, batch)  # device transfers are asynchronous
    if constants is not None:
      batch = _normalize_on_device(batch, constants)
    if erasing is not None:
      batch = _erase_on_device(batch, erasing)
    queue.append(batch)
    while len(queue) > prefetch:
      yield queue.popleft()
  yield from queue


@functools.partial(jax.jit, static_argnums=1)
def _normalize_on_device(batch: dict, constants) -> dict:
  scale, offset = (jnp.asarray(c, jnp.float32) for c in constants)
  image = batch["image"].astype(jnp.float32) * scale + offset
  if "mask" in batch:
    image = jnp.where(batch["mask"][:, None, None, None], image, 0.0)
  return dict(batch, image=image)


@functools.partial(jax.jit, static_argnums=1)
def _erase_on_device(batch: dict, erasing) -> dict:
  batch = dict(batch)
  key_data = batch.pop("erase_key")
  return dict(batch, image=augment.random_erase(batch["image"], key_data, erasing))


def _local_device_count(mesh) -> int:
  """This process's devices in the mesh: its local batch is split over them, in contiguous slices."""
  return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def _decode_on_device(config) -> bool:
  """config.decode_on_device: decode JPEGs on the GPU (datasets/gpu_decode.py; not yet run on a GPU)."""
  if not config.get("decode_on_device", False):
    return False
  gpu_decode = importlib.import_module("resnext_jax.datasets.gpu_decode")
  gpu_decode.check_device()
  gpu_decode.nvimgcodec()  # a clear error now if it is missing, not at the first batch
  logging.info("Decoding JPEGs on the devices with nvImageCodec (%s backend, %s).", gpu_decode.backend(),
               "pooled buffers" if gpu_decode.pooled() else "a buffer per image")
  return True


def _device_decoded_batches(local_batches: Iterable[dict], mesh, global_batch_size: int, prefetch: int, config,
                            normalize, erasing=None) -> Iterator[dict]:
  """Host batches of (encoded bytes, box, flip, label[, mask][, erase_key]) -> global batches decoded and augmented
  on the GPUs (gpu_decode, device_augment; then random erasing, as _global_batches).

  Each of this process's devices decodes and augments its own slice of the batch, in a thread of its own (the
  decoder waits for its GPU): an 8-GPU host decodes on 8 GPUs at once, not all on the first. The slices become the
  global batch where they are (make_array_from_single_device_arrays), never through the host or another device.
  Padding (mask False) is not decoded: its image is all-zero.
  """
  gpu_decode = importlib.import_module("resnext_jax.datasets.gpu_decode")
  sharding = NamedSharding(mesh, P("data"))
  shape = (global_batch_size, config.image_size, config.image_size, 3)
  slices = _local_slices(sharding, shape)
  decode_slice = functools.partial(_decode_slice, gpu_decode, config=config, normalize=normalize, erasing=erasing)

  def to_global(x):
    return jax.make_array_from_process_local_data(sharding, x, (global_batch_size, *x.shape[1:]))

  queue = collections.deque()
  with concurrent.futures.ThreadPoolExecutor(len(slices), thread_name_prefix="decode_on_device") as pool:
    for batch in local_batches:
      shards = list(pool.map(lambda device_rows, batch=batch: decode_slice(batch, *device_rows), slices))
      out = {"image": jax.make_array_from_single_device_arrays(shape, sharding, shards),
             "label": to_global(batch["label"])}
      if "mask" in batch:
        out["mask"] = to_global(batch["mask"])
      queue.append(out)
      while len(queue) > prefetch:
        yield queue.popleft()
    yield from queue


def _local_slices(sharding, shape) -> list[tuple[jax.Device, slice]]:
  """(device, its rows of the process-local batch) for each of this process's devices, in batch order: the local
  batch is the process's contiguous part of the global one, as make_array_from_process_local_data lays it out."""
  indices = sharding.addressable_devices_indices_map(shape)
  rows = sorted((((index[0].start or 0, index[0].stop or shape[0]), device) for device, index in indices.items()),
                key=lambda row: row[0])
  first = rows[0][0][0]
  return [(device, slice(start - first, stop - first)) for (start, stop), device in rows]


def _decode_slice(gpu_decode, batch: dict, device, rows: slice, *, config, normalize, erasing) -> jax.Array:
  """The images of batch[rows], decoded, augmented and normalised on `device` (zero where mask is False)."""
  n, size = rows.stop - rows.start, config.image_size
  keep = np.flatnonzero(batch["mask"][rows]) if "mask" in batch else np.arange(n)
  flips = batch["flip"][rows] if "flip" in batch else np.zeros(n, bool)
  images = None if len(keep) == n else jnp.zeros((n, size, size, 3), jnp.float32, device=device)  # padding
  if len(keep):
    encoded = batch["encoded"][rows]
    crops = batch["crop"][rows][keep] if "crop" in batch else None  # eval with antialias: torchvision's crop
    decoded = gpu_decode.augment_batch([encoded[i] for i in keep], batch["box"][rows][keep], flips[keep],
                                       size=size, mean=normalize[0], std=normalize[1],
                                       antialias=bool(config.get("antialias", False)), crops=crops, device=device)
    images = decoded if images is None else images.at[keep].set(decoded)
  if erasing is not None:
    images = augment.random_erase(images, jax.device_put(batch["erase_key"][rows], device), erasing)
  return images


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
