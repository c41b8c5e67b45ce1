"""Input pipeline throughput: ImageNet-style JPEGs decoded and augmented per second, per CPU core.

Writes --num_images JPEGs of 500x375 (ImageNet's median size) into a temporary image folder, prepares it with the
project's TFDS builder, and times the real tf.data pipelines (Inception crop + flip + normalise to 224 for
training; center crop + resize for eval) with tf.data limited to --threads threads, after a warm-up epoch.

  python benchmarks/input_pipeline_benchmark.py --threads=1
"""

import argparse
import json
import os
import tempfile
import time

import ml_collections
import numpy as np
from PIL import Image
import tensorflow as tf
import tensorflow_datasets as tfds

from resnext_jax import input_pipeline
from resnext_jax.datasets import sources


def write_jpegs(root: str, num_images: int, size=(500, 375), quality=90) -> None:
  """Photo-like JPEGs (smooth shapes plus sensor-like noise), so that decoding costs what real photos cost."""
  rng = np.random.default_rng(0)
  y, x = np.mgrid[0:size[1], 0:size[0]] / size[0]
  for i in range(num_images):
    label = f"class{i % 10}"
    os.makedirs(os.path.join(root, "train", label), exist_ok=True)
    f = rng.uniform(2, 12, 3)
    phase = rng.uniform(0, 6.3, 3)
    image = np.stack([127 + 100 * np.sin(f[c] * x + 3 * np.cos(f[c] * y) + phase[c]) for c in range(3)], -1)
    image += rng.normal(0, 12, image.shape)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
        os.path.join(root, "train", label, f"{i}.jpg"), quality=quality)


def images_per_second(ds: tf.data.Dataset, batch_size: int, seconds: float) -> float:
  it = iter(ds)
  next(it)  # warm-up: graph building, first reads
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    next(it)
    count += batch_size
  return count / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_images", type=int, default=512)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--threads", type=int, default=1, help="tf.data threads (the figure is per thread)")
  parser.add_argument("--seconds", type=float, default=20.0)
  args = parser.parse_args()
  tf.config.set_visible_devices([], "GPU")

  with tempfile.TemporaryDirectory() as root:
    write_jpegs(root, args.num_images)
    config = ml_collections.ConfigDict(dict(
        dataset="imagefolder", data_dir=root, train_split="train", eval_split="train", image_size=args.image_size,
        crop_ratio=0.875, augment="auto", shuffle_buffer_size=1024, cache=True, strict_decode=False, seed=0,
        batch_size=args.batch_size, eval_batch_size=args.batch_size))
    source = sources.get_source(config)  # cache=True: the timed loops read the JPEG bytes from memory
    options = tf.data.Options()
    options.threading.private_threadpool_size = args.threads
    options.threading.max_intra_op_parallelism = 1
    train = input_pipeline.train_dataset(source, config, start_step=0, process_index=0, process_count=1)
    evals = input_pipeline.eval_dataset(source, config, process_index=0, process_count=1).repeat()
    result = {"threads": args.threads, "image_size": args.image_size, "jpeg": "500x375 q90",
              "tf": tf.__version__, "tfds": tfds.__version__, "cpu_count": os.cpu_count()}
    for name, ds in (("train", train), ("eval", evals)):
      for _ in iter(ds.with_options(options).take(args.num_images // args.batch_size)):
        pass  # fill the cache
      rate = images_per_second(ds.with_options(options), args.batch_size, args.seconds)
      result[f"{name}_images_per_s_per_thread"] = round(rate / args.threads, 1)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
