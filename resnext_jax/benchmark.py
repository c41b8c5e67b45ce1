"""Throughput of the training job's own jitted train step (forward, backward, optimizer update, BN statistics,
metrics) or eval step, after compilation, on synthetic data sharded over every device.

    python -m resnext_jax.benchmark --model resnext50_32x4d --batch-size 32 --mode train --steps 3 \
        [--impl auto] [--dtype bfloat16] [--compare-torch] [--config imagenet_resnext50]

The recipe (momentum, weight decay, label smoothing, EMA, ...) comes from --config, so the step timed is the
step `main.py` runs with that config: a recipe's name in resnext_jax/configs (shipped with the package, so
this runs from an installed resnext_jax too), or the path of a config file of one's own.

Both processes run with the host-memory setting main.py uses (`--host-malloc retain`, see cpu/host_memory.py:
freed memory is reused rather than faulted in anew every step), or both with glibc's defaults (`system`).

The last line printed is one JSON object (model, mode, batch_size, images_per_sec, compile_seconds, backend,
impl, ...). Compilation is timed on its own (`compile_seconds`, ahead of time, with the persistent compilation
cache of the recipe's `compilation_cache_dir`: a second run reports a cache hit and a short compile).

`--data` times the training loop end to end instead (resnext_jax/input_benchmark.py): the project's input pipeline
over real JPEG files (ImageNet-like ones generated once, or `--dataset imagenet2012 --data-dir ...`) feeding this
train step, with input-only, step-only and loop images/s and their ratio: whether the machine is input-bound.

    python -m resnext_jax.benchmark --data --model resnext50_32x4d --batch-size 256 --dtype bfloat16

Neither this module nor the synthetic mode imports TensorFlow; `--data` does, to build the tf.data pipeline.
`--compare-torch` then times torchvision's model of the same name the same way in a child process of the same
run (channels_last, same batch; SGD step for train, inference_mode for eval; CUDA AMP when --dtype bfloat16 on
a GPU) and adds `torch_images_per_sec` and `ratio_vs_torch`. The child never imports TensorFlow (torch and
TensorFlow in one process crash) and torch is imported only there: it is an optional dependency.
"""

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np

from resnext_jax import compilation_cache
from resnext_jax import cpu
from resnext_jax import input_benchmark
from resnext_jax import models
from resnext_jax import summary
from resnext_jax.cpu import host_memory
from resnext_jax.layers import conv

IMAGENET_TRAIN_EXAMPLES = 1_281_167  # only shapes the learning-rate schedule, which does not change the cost


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="resnext50_32x4d")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--mode", choices=("train", "eval"), default="train")
  p.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up (compiling) step")
  p.add_argument("--impl", choices=conv.IMPLS, default="auto", help="convolution implementation")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="compute dtype")
  p.add_argument("--compare-torch", action="store_true")
  p.add_argument("--host-malloc", choices=("retain", "system"), default="retain",
                 help="keep freed host memory for reuse (as main.py does) or glibc's defaults; both processes")
  p.add_argument("--config", default="imagenet_resnext50",
                 help="training recipe the timed step uses: a name in resnext_jax/configs, or a config file's path")
  p.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)  # the --compare-torch child
  p.add_argument("--data", action="store_true",
                 help="end to end: the input pipeline over JPEG files feeding the train step (input_benchmark.py)")
  input_benchmark.add_arguments(p)
  return p.parse_args(argv)


def _recipe(name_or_path):
  """The config module: resnext_jax.configs.<name>, or the file at a path (one ending in .py)."""
  if not name_or_path.endswith(".py"):
    return importlib.import_module(f"resnext_jax.configs.{name_or_path}")
  spec = importlib.util.spec_from_file_location("benchmark_config", name_or_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(recipe, args):
  """`recipe`'s get_config() with the benchmark's model, batch, image size, conv impl and precision."""
  config = _recipe(recipe).get_config()
  config.update(model=args.model, batch_size=args.batch_size, eval_batch_size=args.batch_size,
                image_size=args.image_size, conv_impl=args.impl, half_precision=args.dtype == "bfloat16",
                grad_accum_steps=1)
  return config


def time_steps(run, state, steps):
  """Seconds per step, best of `steps` timed runs after one warm-up (compiling) run; run(state) -> state, out."""
  state, out = run(state)
  jax.block_until_ready(out)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, out = run(state)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)
  return min(times)


def compiled_step(args):
  """(compiled step, state, synthetic batch sharded on the mesh, compile seconds): train.compile_train_step or
  evaluate.compile_eval_step as the training job builds them, compiled ahead of time for args' model, batch,
  image size, dtype and recipe. For eval, the state is the variables and the step returns only outputs."""
  from resnext_jax import evaluate, optim, runtime, train  # pylint: disable=g-import-not-at-top (JAX; no torch)

  config = load_config(args.config, args)
  compilation_cache.enable_from_config(config)
  mesh = runtime.make_mesh()
  runtime.check_batch_size("--batch-size", args.batch_size, mesh)
  model = models.from_config(config, models.create_model(args.model).num_classes)
  image_shape = (args.image_size, args.image_size, 3)
  rng = np.random.default_rng(0)
  batch = jax.device_put({"image": rng.standard_normal((args.batch_size, *image_shape), np.float32),
                          "label": rng.integers(0, model.num_classes, args.batch_size).astype(np.int32),
                          "mask": np.ones(args.batch_size, bool)}, runtime.batch_sharded(mesh))
  schedule = optim.learning_rate_schedule(config, optim.durations(config, IMAGENET_TRAIN_EXAMPLES))
  tx = optim.create_optimizer(config, schedule)
  state, state_sharding = train.create_train_state(config, model, tx, mesh, image_shape)
  if args.mode == "train":
    step = train.compile_train_step(config, model, tx, schedule, mesh, state_sharding)
  else:
    step = evaluate.compile_eval_step(model, mesh)
    state = {"params": state.params, "batch_stats": state.batch_stats}
  start = time.perf_counter()
  compiled = cpu.autotune.measure_layers(lambda: step.trace(state, batch)).lower().compile()
  return compiled, state, batch, time.perf_counter() - start


def benchmark_jax(args):
  """(images/s, compile seconds) of the compiled step (compiled_step) on its synthetic batch."""
  compiled, state, batch, compile_seconds = compiled_step(args)
  if args.mode == "train":
    run = lambda s: compiled(s, batch)
  else:
    run = lambda v: (v, compiled(v, batch))
  return args.batch_size / time_steps(run, state, args.steps), compile_seconds


def benchmark_torch(args):
  """torchvision's model, channels_last, same batch; CUDA AMP bfloat16 when asked for and on a GPU."""
  import torch
  import torchvision

  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.set_num_threads(os.cpu_count())
  if not hasattr(torchvision.models, args.model):
    raise SystemExit(f"error: torchvision has no model {args.model!r} to compare with (e.g. resnext50_32x4d)")
  model = getattr(torchvision.models, args.model)().to(device, memory_format=torch.channels_last)
  images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
  images = images.contiguous(memory_format=torch.channels_last)
  labels = torch.randint(0, 1000, (args.batch_size,), device=device)
  amp = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

  def train_step():
    with amp:
      loss = torch.nn.functional.cross_entropy(model(images), labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()

  def eval_step():
    with torch.inference_mode(), amp:
      model(images)

  model.train(args.mode == "train")
  step = train_step if args.mode == "train" else eval_step
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  step()
  sync()
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    step()
    sync()
    times.append(time.perf_counter() - start)
  return args.batch_size / min(times)


def torch_in_child_process(argv):
  """benchmark_torch in a fresh process (no JAX threads, no TensorFlow); returns its images/s."""
  result = subprocess.run([sys.executable, "-m", "resnext_jax.benchmark", *argv, "--torch-only"],
                          capture_output=True, text=True)
  if result.returncode != 0:
    raise SystemExit(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "torch benchmark failed")
  return json.loads(result.stdout.strip().splitlines()[-1])["torch_images_per_sec"]


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  if args.host_malloc == "retain":
    host_memory.retain_freed_memory()  # before JAX (or torch) starts its threads
  if args.torch_only:
    print(json.dumps({"torch_images_per_sec": benchmark_torch(args)}))
    return None
  result = dict(model=args.model, mode=args.mode, batch_size=args.batch_size, image_size=args.image_size,
                dtype=args.dtype, impl=args.impl, host_malloc=args.host_malloc, backend=jax.default_backend(),
                device=jax.devices()[0].device_kind, steps=args.steps, config=args.config)
  if args.data:
    config, stats = input_benchmark.data_config(load_config(args.config, args), args)
    compilation_cache.enable_from_config(config)
    result.update(data=stats, pre_resize=args.pre_resize, antialias=args.antialias,
                  decode_on_device=args.decode_on_device, legacy_transforms=args.legacy_transforms)
    result.update(input_benchmark.run(config, args, steps=args.steps))
    result["compilation_cache_hits"] = compilation_cache.counts()["hits"]
    print(json.dumps(result))
    return result
  images_per_sec, compile_seconds = benchmark_jax(args)
  result["images_per_sec"] = round(images_per_sec, 3)
  result["compile_seconds"] = round(compile_seconds, 2)
  result["compilation_cache_hits"] = compilation_cache.counts()["hits"]
  # From the model's exact multiply-adds at this size (summary.py): 2 FLOPs each, x3 for a train step.
  flops = summary.flops_per_image(models.create_model(args.model), args.image_size, args.mode)
  result["achieved_tflops"] = float(f"{result['images_per_sec'] * flops / 1e12:.4g}")
  if args.compare_torch:
    result["torch_images_per_sec"] = round(torch_in_child_process([a for a in argv if a != "--compare-torch"]), 3)
    result["ratio_vs_torch"] = round(result["images_per_sec"] / result["torch_images_per_sec"], 3)
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
