"""Input pipeline throughput per CPU core: ImageNet-like JPEGs decoded and augmented per second.

Writes --num_images ImageNet-like JPEGs (resnext_jax/datasets/synthetic_jpegs.py: ImageNet's size distribution,
photo-like content, quality 90) into an image folder (kept in --data_dir for the next run), prepares it with the
project's TFDS builder and times the tf.data pipelines the training job builds (train: Inception crop + flip to
224; eval: center crop 0.875 + resize to 224) with tf.data limited to --threads threads, reading the JPEG bytes
from memory, after a warm-up. Pipelines are timed in turns (--repeats rounds of --seconds each, each round after
an untimed settling period), so a busy machine slows them alike; each figure is the median round, both per thread
(wall clock) and per CPU-second the process (and its workers) used, which is the fairer figure on a shared
machine. The last line is one JSON object.

  python benchmarks/input_pipeline_benchmark.py --threads=1            # the transforms the training job uses
  python benchmarks/input_pipeline_benchmark.py --threads=1 --legacy   # and the previous ones, same run
  python benchmarks/input_pipeline_benchmark.py --threads=2 --grain    # and grain (worker processes + PIL)
  python benchmarks/input_pipeline_benchmark.py --pre_resize=320       # images stored with shorter side <= 320
  python benchmarks/input_pipeline_benchmark.py --device_decode_host   # decode_on_device's host half too

--device_decode_host times what the host still does per image when config.decode_on_device decodes on the GPU
(tf.data's records, the JPEG header, the Inception box and flip; the bytes go to the device): how many host cores
a GPU's decode needs.

--grain needs `pip install grain`: it reads the same images from TFDS's array_record files
(`builder.as_data_source`) with --threads worker processes, each running a PIL transform (header -> crop window,
`Image.draft` DCT scaling, antialiased resize, flip; uint8 out as ours).
"""

import argparse
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

from resnext_jax.datasets import synthetic_jpegs  # pylint: disable=wrong-import-position

from pipeline_timing import (  # pylint: disable=wrong-import-position
    add_timing_flags, cached_eval_stream, cpu_model, pipeline_config, timed_rounds)

DEFAULT_DATA_DIR = synthetic_jpegs.DEFAULT_DATA_DIR


def tf_data_pipelines(args, data_dir) -> dict:
  """name -> iterator of batches, for the new (and with --legacy the previous) train and eval transforms."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  from resnext_jax.datasets import sources, tf_pipeline  # pylint: disable=import-outside-toplevel

  tf.config.set_visible_devices([], "GPU")
  options = tf.data.Options()
  options.threading.private_threadpool_size = args.threads
  options.threading.max_intra_op_parallelism = 1
  kinds = ["fast"] + (["legacy"] if args.legacy else [])
  pipelines = {}
  for kind in kinds:  # the legacy pipeline reads the original images, as it did
    config = pipeline_config(args, data_dir, input_transform=kind, antialias=args.antialias,
                             pre_resize=args.pre_resize if kind == "fast" else 0)
    source = sources.get_source(config)  # cache=True: the timed loops read the JPEG bytes from memory
    train = tf_pipeline.train_dataset(source, config, start_step=0, process_index=0, process_count=1)
    evals = eval_stream(source, config)
    suffix = "" if kind == "fast" else "_legacy"
    for name, ds in ((f"train{suffix}", train), (f"eval{suffix}", evals)):
      ds = ds.with_options(options)
      for _ in ds.take(args.num_images // args.batch_size + 1):
        pass  # fill the cache
      pipelines[name] = ds.as_numpy_iterator()
    if kind == "fast" and args.device_decode_host:
      encoded = tf_pipeline.train_dataset(source, config, start_step=0, process_index=0, process_count=1,
                                          encoded=True)
      pipelines["train_device_host"] = encoded.with_options(options).as_numpy_iterator()
  return pipelines


def eval_stream(source, config):
  """The job's eval transform over the split's JPEG bytes (pipeline_timing.cached_eval_stream)."""
  from resnext_jax.datasets import sources, tf_pipeline  # pylint: disable=import-outside-toplevel

  transform = tf_pipeline.eval_transform(sources.transform_style(config), config)
  return cached_eval_stream(source, transform, config.eval_batch_size)


def pil_train_transform(size: int):
  """The grain candidate's transform: PIL, Inception crop chosen from the header, DCT scaling via draft."""
  import io  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel

  def transform(example, rng):
    image = Image.open(io.BytesIO(example["image"]))
    w, h = image.size
    y0, x0, y1, x1 = synthetic_jpegs.inception_box(rng, h, w)
    image.draft("RGB", (max(1, w * size // (x1 - x0)), max(1, h * size // (y1 - y0))))
    sx, sy = image.size[0] / w, image.size[1] / h
    out = image.convert("RGB").resize((size, size), Image.BILINEAR, box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy))
    if rng.uniform() < 0.5:
      out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return {"image": np.asarray(out), "label": np.int32(example["label"])}

  return transform


def grain_pipeline(args, data_dir):
  """grain over TFDS's array_record data source of the same folder, --threads worker processes."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  import grain.python as grain  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from resnext_jax.datasets import image_folder  # pylint: disable=import-outside-toplevel

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain reads absl flags; this script parses its own
  builder = image_folder.LocalImageFolder(data_dir, prepared_dir=os.path.join(data_dir, ".tfds_array_record"),
                                          file_format="array_record")
  builder.download_and_prepare()
  source = builder.as_data_source(split="train", decoders={"image": tfds.decode.SkipDecoding()})
  ds = (grain.MapDataset.source(source).seed(0).shuffle().repeat()
        .random_map(_RandomMap(pil_train_transform(args.image_size)))
        .batch(args.batch_size, drop_remainder=True))
  # One reading thread and a short read-ahead per worker (grain's defaults, 16 threads and 500 elements, keep the
  # workers busy filling buffers while the other pipelines are timed).
  read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)
  it = ds.to_iter_dataset(read).mp_prefetch(grain.MultiprocessingOptions(num_workers=args.threads,
                                                                         per_worker_buffer_size=1))
  return iter(it)


class _RandomMap:  # a picklable callable for grain's workers

  def __init__(self, fn):
    self.fn = fn

  def __call__(self, element, rng):
    return self.fn(element, rng)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  add_timing_flags(parser)
  parser.add_argument("--threads", type=int, default=1, help="tf.data threads / grain workers (figures per thread)")
  parser.add_argument("--legacy", action="store_true", help="also time the previous transforms (legacy_transforms)")
  parser.add_argument("--grain", action="store_true", help="also time grain + PIL (pip install grain)")
  parser.add_argument("--antialias", action="store_true", help="config.antialias: PIL's triangle filter")
  parser.add_argument("--device_decode_host", action="store_true",
                      help="also time config.decode_on_device's host half (records, header, box, flip)")
  parser.add_argument("--pre_resize", type=int, default=0,
                      help="config.pre_resize for the new pipeline: stored shorter side <= N (legacy: originals)")
  parser.add_argument("--data_dir", default=DEFAULT_DATA_DIR,
                      help="where the generated JPEG folder is kept (reused when it matches)")
  args = parser.parse_args(argv)

  data_dir = os.path.join(args.data_dir, f"n{args.num_images}")
  stats = synthetic_jpegs.write_image_folder(data_dir, args.num_images)
  pipelines = tf_data_pipelines(args, data_dir)
  if args.grain:
    pipelines["train_grain"] = grain_pipeline(args, data_dir)
  rounds = timed_rounds(pipelines, args.batch_size, args.seconds, args.repeats, args.settle)

  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  result = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": args.threads,
            "image_size": args.image_size, "jpegs": stats, "antialias": args.antialias, "pre_resize": args.pre_resize,
            "tf": tf.__version__, "load_average": round(os.getloadavg()[0], 1)}
  for name, (wall, per_cpu, _) in rounds.items():
    result[f"{name}_images_per_s_per_thread"] = round(wall / args.threads, 1)
    result[f"{name}_images_per_cpu_s"] = round(per_cpu, 1)
  for name in rounds:  # new vs old (or grain) in the same rounds: median of the per-round ratios
    base = {"train_legacy": "train", "eval_legacy": "eval", "train_grain": "train"}.get(name)
    if base:
      ratios = [b[1] / o[1] for b, o in zip(rounds[base][2], rounds[name][2])]
      result[f"{base}_speedup_vs_{name.split('_', 1)[1]}_per_cpu_s"] = round(float(np.median(ratios)), 2)
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
