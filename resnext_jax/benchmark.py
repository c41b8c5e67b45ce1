"""Throughput of the full jitted train step (forward, backward, SGD update) or eval step, after compilation.

    python -m resnext_jax.benchmark --model resnext50_32x4d --batch-size 32 --mode train --steps 3 \
        [--impl auto] [--dtype bfloat16] [--compare-torch]

The last line printed is one JSON object (model, mode, batch_size, images_per_sec, backend, impl, ...).
`--compare-torch` times torchvision's model of the same name the same way in the same process (channels_last,
same batch; SGD step for train, inference_mode for eval; CUDA AMP when --dtype bfloat16 on a GPU) and adds
`torch_images_per_sec` and `ratio_vs_torch`. torch is imported only then: it is an optional dependency.
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from resnext_jax import conv, models

# One ResNeXt-50 32x4d 224 training image costs about 3 x 8.46 GFLOP (forward + 2x for the backward).
TRAIN_GFLOP_PER_IMAGE_224 = {"resnext50_32x4d": 25.4}


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
  return p.parse_args(argv)


def make_step(model, mode):
  """The jitted step: SGD-momentum train step with BN statistics update, or the eval forward pass."""
  tx = optax.sgd(0.1, momentum=0.9)

  def train_step(state, images, labels):
    params, batch_stats, opt_state = state

    def loss_fn(p):
      logits, updates = model.apply({"params": p, "batch_stats": batch_stats}, images, train=True,
                                    mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

  def eval_step(state, images, labels):
    params, batch_stats, _ = state
    logits = model.apply({"params": params, "batch_stats": batch_stats}, images, train=False)
    return state, jnp.mean(jnp.argmax(logits, -1) == labels)

  if mode == "train":
    return jax.jit(train_step, donate_argnums=0), tx
  return jax.jit(eval_step), tx


def time_steps(step, state, batch, steps):
  """Seconds per step, best of `steps` timed runs after one warm-up (compiling) run."""
  state, out = step(state, *batch)
  jax.block_until_ready(out)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    state, out = step(state, *batch)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)
  return min(times)


def benchmark_jax(args):
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  model = models.create_model(args.model, dtype=dtype, conv_impl=args.impl)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.standard_normal((args.batch_size, args.image_size, args.image_size, 3)), dtype)
  labels = jnp.asarray(rng.integers(0, model.num_classes, args.batch_size))
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(images)
  step, tx = make_step(model, args.mode)
  state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
  return args.batch_size / time_steps(step, state, (images, labels), args.steps)


def benchmark_torch(args):
  """torchvision's model, channels_last, same batch; CUDA AMP bfloat16 when asked for and on a GPU."""
  import torch
  import torchvision

  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.set_num_threads(os.cpu_count())
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


def main(argv=None):
  args = parse_args(argv)
  result = dict(model=args.model, mode=args.mode, batch_size=args.batch_size, image_size=args.image_size,
                dtype=args.dtype, impl=args.impl, backend=jax.default_backend(),
                device=jax.devices()[0].device_kind, steps=args.steps)
  result["images_per_sec"] = round(benchmark_jax(args), 3)
  if args.mode == "train" and args.model in TRAIN_GFLOP_PER_IMAGE_224:
    flops = result["images_per_sec"] * TRAIN_GFLOP_PER_IMAGE_224[args.model] * (args.image_size / 224) ** 2
    result["achieved_tflops"] = round(flops / 1e3, 4)
  if args.compare_torch:
    result["torch_images_per_sec"] = round(benchmark_torch(args), 3)
    result["ratio_vs_torch"] = round(result["images_per_sec"] / result["torch_images_per_sec"], 3)
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
