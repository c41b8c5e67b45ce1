"""Timing input pipelines per CPU-second, shared by input_pipeline_benchmark.py and input_pipeline_vs_revision.py.

Nothing here imports resnext_jax, so a process timing an older revision of the package (put first on sys.path)
can use it too. TensorFlow is imported only where a tf.data pipeline is built.
"""

import platform
import time

import ml_collections
import numpy as np


def add_timing_flags(parser) -> None:
  """The flags of the generated JPEG set and of timed_rounds, the same in every input benchmark."""
  parser.add_argument("--num_images", type=int, default=512)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--seconds", type=float, default=8.0, help="length of one timed round")
  parser.add_argument("--repeats", type=int, default=3, help="timed rounds per pipeline (the median is reported)")
  parser.add_argument("--settle", type=float, default=2.0, help="untimed seconds at the start of each round")


def pipeline_config(args, data_dir: str, **overrides) -> ml_collections.ConfigDict:
  """The config the input benchmarks build the job's pipelines from: the image folder at data_dir read as the job
  reads ImageNet (Inception crops, 0.875 center-crop eval), its records cached in memory, with add_timing_flags'
  sizes; the fast transforms, without antialias, on the original images, unless `overrides` say otherwise."""
  config = ml_collections.ConfigDict(dict(
      dataset="imagefolder", data_dir=data_dir, train_split="train", eval_split="train", image_size=args.image_size,
      crop_ratio=0.875, augment="auto", shuffle_buffer_size=max(1024, args.num_images), cache=True,
      strict_decode=False, seed=0, batch_size=args.batch_size, eval_batch_size=args.batch_size,
      input_transform="fast", antialias=False, pre_resize=0))
  config.update(overrides)
  return config


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      lines = f.read().splitlines()
  except OSError:
    return platform.processor()
  name = next((l.split(":", 1)[1].strip() for l in lines if l.startswith("model name")), platform.processor())
  flags = next((l.split(":", 1)[1].split() for l in lines if l.startswith("flags")), [])
  isa = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "no avx2"
  return f"{name} ({isa})"


def cpu_seconds() -> float:
  """CPU time of this process and its children (grain's workers)."""
  try:
    import psutil  # pylint: disable=import-outside-toplevel
  except ImportError:
    return time.process_time()
  me = psutil.Process()
  total = sum(me.cpu_times()[:2])
  for child in me.children(recursive=True):
    try:
      total += sum(child.cpu_times()[:2])
    except psutil.Error:
      pass
  return total


def timed_rounds(pipelines: dict, batch_size: int, seconds: float, repeats: int, settle: float = 2.0) -> dict:
  """{name: (wall images/s, images per CPU-second, the rounds)}: medians over `repeats` rounds, pipelines taking
  turns. Each round first pulls batches untimed for `settle` seconds: that empties the batches the pipeline
  buffered while the others ran, and lets the others' background refills (prefetch buffers, grain workers)
  finish, so the timed part measures this pipeline's steady state only."""
  rounds = {name: [] for name in pipelines}
  for _ in range(repeats):
    for name, it in pipelines.items():
      start = time.perf_counter()
      while time.perf_counter() - start < settle:
        next(it)
      count, start, cpu = 0, time.perf_counter(), cpu_seconds()
      while time.perf_counter() - start < seconds:
        next(it)
        count += batch_size
      rounds[name].append((count / (time.perf_counter() - start), count / max(cpu_seconds() - cpu, 1e-9)))
  return {name: (float(np.median([w for w, _ in r])), float(np.median([c for _, c in r])), r)
          for name, r in rounds.items()}


def cached_eval_stream(source, transform, batch_size: int):
  """`transform` (encoded bytes -> pixels) over source's eval split, its JPEG bytes cached in memory, repeated and
  batched. Not the job's eval_dataset: with config.cache it keeps the transformed pixels after the first pass (the
  job decodes each eval image once), and timing that would time the cache, not the transform."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  records = source.builder.as_dataset(split=source.eval_split, shuffle_files=False,
                                      decoders={"image": tfds.decode.SkipDecoding()}).cache().repeat()
  images = records.map(tf.autograph.experimental.do_not_convert(lambda ex: transform(ex["image"])),
                       num_parallel_calls=tf.data.AUTOTUNE)
  return images.batch(batch_size).prefetch(tf.data.AUTOTUNE)
