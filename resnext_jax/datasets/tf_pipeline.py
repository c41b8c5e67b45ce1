"""Per-process tf.data pipelines: a TFDS split -> local batches of uint8 pixels (the device normalises them).

The only module of the input path that builds tf.data graphs; `input_pipeline` imports it (and with it
TensorFlow) when a pipeline over real data is built, never for synthetic data or the train step.
process_index/count are arguments so that tests can play every process.
"""

import functools
import logging
import math

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from resnext_jax.datasets import augment
from resnext_jax.datasets import legacy_transforms
from resnext_jax.datasets import sources
from resnext_jax.datasets import transforms
from resnext_jax.errors import ConfigError, DataError

_SKIP_DECODING = {"image": tfds.decode.SkipDecoding()}  # our transforms decode (and crop) the bytes themselves


def train_dataset(source: sources.Source, config, *, start_step: int, process_index: int,
                  process_count: int, encoded: bool = False, local_devices: int = 1) -> tf.data.Dataset:
  """This process's endless stream of local training batches {'image': uint8, 'label': int32}, from global step
  start_step on. encoded=True (decoding on the device): {'encoded': the file's bytes, 'box': int32 (4,), 'flip':
  bool, 'label'} instead of 'image', with the crop and flip the host path would use, read from the JPEG header.

  Augmentation beyond the paper (augment.py, all off by default, and then this graph is what it was):
  config.auto_augment runs RandAugment / TrivialAugment on the uint8 pixels (tf.numpy_function, the example's
  seed); config.reprob > 0 adds 'erase_key' (uint32 (2,) per example) for the device's random erasing;
  config.aug_repeats = k reads local_batch / k examples per step and gives each k copies with their own seeds
  (so their own crops, flips and auto-augment draws), ordered so that the copies go to different devices among
  this process's `local_devices` (timm's RepeatAugSampler deals them to ranks the same way). The epoch keeps its
  steps_per_epoch steps, so it covers 1/k of the data, as timm's sampler's does; copies stay within the process
  that read the image (each process reads only its part of the split)."""
  local_batch = config.batch_size // process_count
  num_examples = source.builder.info.splits[source.train_split].num_examples
  steps_per_epoch = num_examples // config.batch_size
  if steps_per_epoch == 0:
    raise DataError(f"config.batch_size={config.batch_size} exceeds the {num_examples} examples of "
                    f"{source.builder.name}:{source.train_split}; use a smaller batch size.")
  augment.check_config(config)
  repeats = augment.aug_repeats(config)
  if local_batch % repeats:
    raise ConfigError(f"config.aug_repeats={repeats} must divide the per-process batch (config.batch_size="
                      f"{config.batch_size} / {process_count} processes = {local_batch}).")
  policy = augment.auto_augment_policy(config, mean=source.mean, image_size=config.image_size)
  erasing = augment.erasing(config)
  unique_per_step = local_batch // repeats  # = local_batch without repeats
  first_epoch, steps_into_epoch = divmod(start_step, steps_per_epoch)
  # Deterministic file order (no reshuffle): a resumed run must read what the original run read.
  records = source.builder.as_dataset(
      split=tfds.even_splits(source.train_split, process_count)[process_index], shuffle_files=True,
      decoders=_SKIP_DECODING,
      read_config=tfds.ReadConfig(shuffle_seed=config.seed, shuffle_reshuffle_each_iteration=False))
  if config.cache:
    keep_pixels = (not encoded and not is_legacy(config)
                   and source.augment in transforms.WHOLE_IMAGE_AUGMENTATIONS)
    records = _cache(records, functools.partial(
        transforms.seedless_pixels, augment=source.augment, size=config.image_size,
        crop_ratio=source.eval_crop_ratio, antialias=antialias(config)) if keep_pixels else None)
  key = tf.constant([config.seed, process_index], tf.int64)

  def epoch(e):
    # Equal-length epochs on every process (steps_per_epoch full batches), so steps map to (epoch, offset).
    seed = tf.random.experimental.stateless_fold_in(key, e)
    shuffle_seed = tf.random.stateless_uniform([], seed, minval=None, maxval=None, dtype=tf.int64)
    ds = records.shuffle(config.shuffle_buffer_size, seed=shuffle_seed).take(steps_per_epoch * unique_per_step)
    # (epoch seed, (position, record)): each example's seed is folded from these in the parallel map below, not
    # in a map of its own here: a sequential map hands every element to another thread and back (~7% of the train
    # transform's CPU by perf, one tf.data thread, 2-core Zen 4).
    ds = tf.data.Dataset.zip((tf.data.Dataset.from_tensors(seed).repeat(), ds.enumerate()))
    skip = tf.where(e == first_epoch, tf.constant(steps_into_epoch * unique_per_step, tf.int64), 0)
    ds = ds.skip(skip)  # before decoding: resuming costs reading, not decoding, the skipped examples
    return ds if repeats == 1 else _map(ds, functools.partial(_repeat, k=repeats)).unbatch()

  if is_legacy(config):
    transform = functools.partial(legacy_transforms.train_image, augment=source.augment, size=config.image_size,
                                  crop_ratio=source.eval_crop_ratio, mean=source.mean, std=source.std)
  else:
    transform = functools.partial(transforms.train_pixels, augment=source.augment, size=config.image_size,
                                  crop_ratio=source.eval_crop_ratio, antialias=antialias(config),
                                  auto_augment=policy)
  if encoded and source.augment != "inception":
    raise ConfigError(f"config.decode_on_device=True supports the Inception crop (imagenet2012, imagefolder), "
                      f"not augment={source.augment!r}.")

  def to_example(seed, ex):
    if encoded:  # the device decodes: the bytes, and the crop and flip the host would take
      box, flip = transforms.train_box(ex["image"], seed)
      out = {"encoded": ex["image"], "box": box, "flip": flip}
    elif "pixels" in ex:  # decoded once, when the split was cached
      out = {"image": transform(None, seed, pixels=ex["pixels"])}
    else:
      out = {"image": transform(ex["image"], seed)}
    out["label"] = tf.cast(ex["label"], tf.int32)
    if erasing is not None:
      out["erase_key"] = transforms.erase_key(seed)
    return out

  def seeded_example(epoch_seed, indexed):
    return to_example(*_seeded(epoch_seed, indexed))

  ds = tf.data.Dataset.range(first_epoch, np.iinfo(np.int64).max).flat_map(_plain(epoch))
  ds = _map(ds, seeded_example if repeats == 1 else to_example, num_parallel_calls=tf.data.AUTOTUNE)
  return _finish(_spread_repeats(ds.batch(local_batch, drop_remainder=True), repeats, local_batch, local_devices))


def _seeded(epoch_seed, indexed):
  """(the example's seed, the record) from the epoch's seed and (its position in the epoch, the record)."""
  position, ex = indexed
  return tf.random.experimental.stateless_fold_in(epoch_seed, position), ex


def _repeat(epoch_seed, indexed, *, k: int):
  """One example -> k copies (batched, for unbatch), copy j seeded by fold_in(its seed, j)."""
  seed, ex = _seeded(epoch_seed, indexed)
  seeds = tf.stack([tf.random.experimental.stateless_fold_in(seed, j) for j in range(k)])
  return seeds, tf.nest.map_structure(lambda v: tf.repeat(v[None], k, axis=0), ex)


def _spread_repeats(ds: tf.data.Dataset, repeats: int, local_batch: int, local_devices: int) -> tf.data.Dataset:
  """With repeats, reorders each local batch so that the copies of an image land on different devices
  (augment.repeat_order); nothing otherwise."""
  if repeats == 1 or local_devices <= 1:
    return ds
  if local_batch % local_devices:
    raise ConfigError(f"the per-process batch ({local_batch}) must be divisible by the {local_devices} local "
                      "devices.")
  order = tf.constant(augment.repeat_order(local_batch, local_devices), tf.int32)
  return _map(ds, lambda batch: tf.nest.map_structure(lambda v: tf.gather(v, order), batch))


def eval_dataset(source: sources.Source, config, *, process_index: int, process_count: int,
                 encoded: bool = False) -> tf.data.Dataset:
  """This process's local eval batches {'image': uint8, 'label', 'mask'}: its part of the split, then masked
  (all-zero) padding up to a common batch count. encoded=True: 'encoded' and 'box' instead of 'image' (the
  padding has empty bytes)."""
  local_batch = config.eval_batch_size // process_count
  parts = tfds.even_splits(source.eval_split, process_count)
  splits = source.builder.info.splits
  num_batches = max(math.ceil(splits[part].num_examples / local_batch) for part in parts)
  transform = eval_transform(sources.transform_style(config), config)
  ds = source.builder.as_dataset(split=parts[process_index], shuffle_files=False, decoders=_SKIP_DECODING)
  if config.cache:
    ds = _cache(ds, None if encoded or is_legacy(config) else transform)
  if encoded:
    ds = _map(ds, lambda ex: {"encoded": ex["image"], **_eval_boxes(ex["image"], config),
                              "label": tf.cast(ex["label"], tf.int32), "mask": tf.constant(True)},
              num_parallel_calls=tf.data.AUTOTUNE)
    blank = {key: tf.zeros(spec.shape, spec.dtype) for key, spec in ds.element_spec.items()}  # b"" for the bytes
    padding = tf.data.Dataset.from_tensors({**blank, "mask": tf.constant(False)}).repeat()
    ds = ds.concatenate(padding).take(num_batches * local_batch)
    return _finish(ds.batch(local_batch, drop_remainder=True))
  ds = _map(ds, lambda ex: {"image": ex["pixels"] if "pixels" in ex else transform(ex["image"]),
                            "label": tf.cast(ex["label"], tf.int32), "mask": tf.constant(True)},
            num_parallel_calls=tf.data.AUTOTUNE)
  blank = tf.zeros((config.image_size, config.image_size, 3), tf.float32 if is_legacy(config) else tf.uint8)
  padding = tf.data.Dataset.from_tensors({"image": blank,
                                          "label": tf.constant(0), "mask": tf.constant(False)}).repeat()
  ds = ds.concatenate(padding).take(num_batches * local_batch)
  return _finish(ds.batch(local_batch, drop_remainder=True))


def _eval_boxes(encoded, config) -> dict:
  """What the device path needs to evaluate an image as the host does: {'box'}, the region to resize, or with
  antialias (torchvision's eval transform) {'box', 'crop'} (transforms.torchvision_eval_crop)."""
  crop_ratio = sources.transform_style(config)["eval_crop_ratio"]
  if antialias(config):
    box, crop = transforms.torchvision_eval_crop(encoded, size=config.image_size, crop_ratio=crop_ratio)
    return {"box": box, "crop": crop}
  return {"box": transforms.eval_box(encoded, crop_ratio=crop_ratio)}


def eval_transform(style: dict, config):
  """encoded bytes -> uint8 eval pixels (normalised float32 with the legacy transforms), for config.dataset's
  style (see sources.transform_style)."""
  if is_legacy(config):
    return functools.partial(legacy_transforms.eval_image, size=config.image_size,
                             crop_ratio=style["eval_crop_ratio"], mean=style["mean"], std=style["std"])
  return functools.partial(transforms.eval_pixels, size=config.image_size, crop_ratio=style["eval_crop_ratio"],
                           antialias=antialias(config))


def eval_pixels(encoded_bytes: bytes, config) -> np.ndarray:
  """One image file's bytes -> uint8 (H, W, 3) eval pixels (legacy: normalised float32); ValueError if it does
  not decode."""
  tf_cpu_only()
  try:
    return eval_transform(sources.transform_style(config), config)(tf.constant(encoded_bytes)).numpy()
  except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as e:
    raise ValueError(f"Not a decodable image ({e.message.splitlines()[0] if e.message else e}).") from e


def antialias(config) -> bool:
  return bool(config.get("antialias", False))


TRANSFORMS = ("fast", "legacy")


def is_legacy(config) -> bool:
  """config.input_transform: 'fast' (transforms.py, uint8 out, normalised on the device) or 'legacy' (the
  previous transforms, float32 normalised on the host; kept to measure against)."""
  name = config.get("input_transform", "fast")
  if name not in TRANSFORMS:
    raise ConfigError(f"Unknown config.input_transform={name!r}; use one of {', '.join(TRANSFORMS)}.")
  return name == "legacy"


def _cache(records: tf.data.Dataset, pixels_fn) -> tf.data.Dataset:
  """config.cache: the records kept in memory from the first pass on. Where the transform starts with a part no
  seed changes (pixels_fn: encoded bytes -> uint8 pixels, or None), that part's output is kept as 'pixels' in
  place of the bytes, so later passes do not decode again (the same ops, run once: the same pixels).

  Why: the digits demo decoded and resized each 8x8 PNG again every epoch, 15.6 CPU-ms per batch of 64 beside a
  ~120 ms train step on two cores (2-core AVX2 EPYC). On ImageNet-sized images the Inception crop needs the
  bytes (pixels_fn None); eval pixels at 224 take ~150 kB per image, about a JPEG's size.
  """
  if pixels_fn is not None:
    records = _map(records, lambda ex: {"pixels": pixels_fn(ex["image"]), "label": ex["label"]},
                   num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return records.cache()


def _plain(fn):
  """fn for tf.data without AutoGraph's rewrite: our functions are plain TF ops (no Python control flow on
  tensors), and rewriting them took 3.6 s of the digits demo's start (2-core AVX2 EPYC)."""
  return tf.autograph.experimental.do_not_convert(fn)


def _map(ds: tf.data.Dataset, fn, **kwargs) -> tf.data.Dataset:
  return ds.map(_plain(fn), **kwargs)


def _finish(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Deterministic order, prefetching; tf.data's model-based autotuning off (it stalls a job's exit, below).

  With autotuning on, each iterator runs a model thread that re-optimises after waiting a period that doubles up
  to 60 s, and destroying the iterator waits for that thread. TF 2.21 at times misses the wake-up, so dropping
  the endless train iterator at the end of training stalled the main thread, holding the GIL, until the period
  ran out: 34-40 s of idle time after the result line in 5 of 18 fresh digits runs (gdb: the main thread in
  ~RootDataset::Iterator, the tf_data_model thread in Model::OptimizeLoop's timed wait), and at preemption
  the same stall comes before the last checkpoint's write is awaited. Without the model, AUTOTUNE maps run one
  call per thread of the pool (the parallelism autotuning converges to on a host that only feeds the
  accelerator) and AUTOTUNE prefetch buffers still grow on demand (TF's prefetch autotuner).
  """
  options = tf.data.Options()
  options.deterministic = True  # parallel map and interleave still keep the order: the stream is reproducible
  options.autotune.enabled = False
  return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


@functools.cache
def tf_cpu_only() -> None:
  """Hides accelerators from TF so that tf.data does not reserve the memory JAX needs (once, before TF ops)."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    logging.warning("TensorFlow initialised its devices before the input pipeline; it may hold GPU memory.")
