"""End-to-end training throughput: is this machine input-bound? One command, three figures.

    python -m resnext_jax.input_benchmark --model resnext50_32x4d --batch-size 256 --dtype bfloat16

times, on real JPEG files read through the project's own input pipeline (input_pipeline.create_train_iterator,
the TFDS records, tf.data, the device-side normalisation) and the project's own train step
(train.compile_train_step, as main.py builds it from --config):
  input    the pipeline alone, batches pulled as fast as it makes them: images/s in total and per host core
  step     the train step alone on one synthetic batch kept on the device (what `benchmark.py` reports)
  loop     the two together, as the training loop runs them (each step gets a fresh batch from the pipeline)
and reports loop / step: near 1 the accelerator is fed; well below 1 the job is input-bound, and input_per_core
says how many cores (or which of the options in docs/input_pipeline.md) it would take. Compilation is timed
separately (compile_seconds) and excluded.

Data: by default --num-images ImageNet-like JPEGs generated once into --data-dir (datasets/synthetic_jpegs.py:
ImageNet's size distribution, photo-like content, quality 90); or --dataset imagenet2012 / imagefolder with
--data-dir pointing at real data. Options of the pipeline under test: --pre-resize N (stored images' shorter side
<= N), --antialias, --decode-on-device (GPU, nvImageCodec), --legacy-transforms (the previous transforms). The
last line printed is one JSON object.
"""

import argparse
import json
import os
import time

import jax
import numpy as np

from resnext_jax.datasets import synthetic_jpegs

DEFAULT_DATA_DIR = synthetic_jpegs.DEFAULT_DATA_DIR
IMAGENET_TRAIN_EXAMPLES = 1_281_167  # only shapes the learning-rate schedule, which does not change the cost


def add_arguments(p: argparse.ArgumentParser) -> None:
  """The data-side options (benchmark.py's --data mode adds these to its own model options)."""
  p.add_argument("--dataset", choices=("imagenet-like", "imagefolder", "imagenet2012"), default="imagenet-like",
                 help="imagenet-like: JPEGs generated into --data-dir; or real data in --data-dir")
  p.add_argument("--data-dir", default=None, help=f"data location (default for imagenet-like: {DEFAULT_DATA_DIR})")
  p.add_argument("--num-images", type=int, default=2048, help="imagenet-like: how many JPEGs to generate")
  p.add_argument("--input-batches", type=int, default=0,
                 help="batches timed for input-only and the loop (default: enough for ~2 passes of the timed "
                      "steps, at least 8)")
  p.add_argument("--pre-resize", type=int, default=0, help="config.pre_resize: stored shorter side <= N")
  p.add_argument("--antialias", action="store_true", help="config.antialias")
  p.add_argument("--decode-on-device", action="store_true", help="config.decode_on_device (GPU, nvImageCodec)")
  p.add_argument("--legacy-transforms", action="store_true", help="config.input_transform='legacy'")


def data_config(config, args):
  """`config` (a training recipe with the benchmark's model options) pointed at the benchmark's data."""
  if args.dataset == "imagenet-like":
    root = os.path.join(args.data_dir or DEFAULT_DATA_DIR, f"n{args.num_images}")
    stats = synthetic_jpegs.write_image_folder(root, args.num_images)
    config.update(dataset="imagefolder", data_dir=root)
  else:
    if not args.data_dir:
      raise SystemExit(f"error: --dataset {args.dataset} needs --data-dir")
    stats = {"data_dir": args.data_dir}
    config.update(dataset=args.dataset, data_dir=args.data_dir)
  overrides = dict(pre_resize=args.pre_resize, antialias=args.antialias, decode_on_device=args.decode_on_device,
                   input_transform="legacy" if args.legacy_transforms else "fast", cache=False,
                   eval_split=config.train_split)  # nothing is evaluated; the split need not exist
  for key, value in overrides.items():
    config[key] = value  # fields a recipe may not have yet: the ConfigDict takes new ones
  return config, stats


def host_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def run(config, args, *, steps: int) -> dict:
  """The three measurements for `config` (model options and data already set)."""
  from resnext_jax import cpu, input_pipeline, models, optim, runtime, train  # pylint: disable=import-outside-toplevel

  mesh = runtime.make_mesh()
  runtime.check_batch_size("--batch-size", config.batch_size, mesh)
  info = input_pipeline.get_dataset_info(config)
  image_shape = info.image_shape
  model = models.from_config(config, info.num_classes)
  schedule = optim.learning_rate_schedule(config, optim.durations(config, IMAGENET_TRAIN_EXAMPLES))
  tx = optim.create_optimizer(config, schedule)
  state, state_sharding = train.create_train_state(config, model, tx, mesh, image_shape)
  rng = np.random.default_rng(0)
  synthetic = jax.device_put({"image": rng.standard_normal((config.batch_size, *image_shape), np.float32),
                              "label": rng.integers(0, info.num_classes, config.batch_size).astype(np.int32)},
                             runtime.batch_sharded(mesh))
  step = train.compile_train_step(config, model, tx, schedule, mesh, state_sharding)
  start = time.perf_counter()
  compiled = cpu.autotune.measure_layers(lambda: step.trace(state, synthetic)).lower().compile()
  compile_seconds = time.perf_counter() - start

  # Step only: a synthetic batch kept on the device.
  state, metrics = compiled(state, synthetic)  # first run (allocations)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, synthetic)
  jax.block_until_ready(metrics)
  step_rate = steps * config.batch_size / (time.perf_counter() - start)

  batches = args.input_batches or max(8, 2 * steps)
  # Input only: the pipeline as fast as it goes (its batches land on the device, normalised there).
  it = input_pipeline.create_train_iterator(config, mesh)
  start = time.perf_counter()
  jax.block_until_ready(next(it))  # first batch: opening files, tf.data graph, prefetch warm-up
  first_batch_seconds = time.perf_counter() - start
  for _ in range(2):
    jax.block_until_ready(next(it))
  start = time.perf_counter()
  for _ in range(batches):
    batch = next(it)
  jax.block_until_ready(batch)
  input_rate = batches * config.batch_size / (time.perf_counter() - start)

  # The loop: the pipeline (already warm) feeding the step, as train.py's loop does.
  for _ in range(2):
    state, metrics = compiled(state, next(it))
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(batches):
    state, metrics = compiled(state, next(it))
  jax.block_until_ready(metrics)
  loop_rate = batches * config.batch_size / (time.perf_counter() - start)

  cores = host_cores()
  ratio = loop_rate / step_rate
  return {"compile_seconds": round(compile_seconds, 2), "first_batch_seconds": round(first_batch_seconds, 2),
          "input_images_per_sec": round(input_rate, 1), "input_images_per_sec_per_core": round(input_rate / cores, 1),
          "host_cores": cores, "step_images_per_sec": round(step_rate, 1), "loop_images_per_sec": round(loop_rate, 1),
          "loop_vs_step": round(ratio, 3), "timed_steps": steps, "timed_batches": batches,
          "verdict": verdict(ratio, input_rate, step_rate, cores)}


def verdict(ratio: float, input_rate: float, step_rate: float, cores: int) -> str:
  if ratio >= 0.9:
    return f"fed: the loop runs at {ratio:.0%} of the step alone"
  need = step_rate / max(input_rate / cores, 1e-9)
  return (f"input-bound: the loop runs at {ratio:.0%} of the step alone; the pipeline makes {input_rate:.0f} "
          f"images/s on {cores} cores, the step takes {step_rate:.0f} (about {need:.0f} cores at this rate per "
          "core; see docs/input_pipeline.md for faster options)")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="resnext50_32x4d")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--steps", type=int, default=5, help="timed train steps (step-only)")
  p.add_argument("--impl", default="auto", help="convolution implementation (config.conv_impl)")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
  p.add_argument("--config", default="imagenet_resnext50",
                 help="training recipe: a name in resnext_jax/configs, or a config file's path")
  add_arguments(p)
  args = p.parse_args(argv)
  from resnext_jax import benchmark  # pylint: disable=import-outside-toplevel

  config = benchmark.load_config(args.config, args)
  config, stats = data_config(config, args)
  result = {"model": args.model, "batch_size": args.batch_size, "image_size": args.image_size, "dtype": args.dtype,
            "backend": jax.default_backend(), "device": jax.devices()[0].device_kind, "data": stats,
            "pre_resize": args.pre_resize, "antialias": args.antialias, "decode_on_device": args.decode_on_device,
            "legacy_transforms": args.legacy_transforms}
  result.update(run(config, args, steps=args.steps))
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
