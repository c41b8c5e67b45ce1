"""Parameters and multiply-adds of registered models, counted exactly while tracing (no FLOPs spent).

  python -m resnext_jax.summary                      # every model at its native size
  python -m resnext_jax.summary resnext50_32x4d --image-size 320
  python -m resnext_jax.summary resnext50_32x4d --explain --batch-size 32   # which implementation each layer
                                                                            # runs, and why

MACs are those of the convolutions and the classifier (what the paper's Table 1 and torchvision's GFLOPS
count): for every module with a 'kernel', output elements x kernel elements per output channel.
"""

import argparse
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnext_jax import cpu, models
from resnext_jax.cpu import autotune


def count(model, image_size=None):
  """Returns {'params': int, 'macs': int} for one image of image_size x image_size x 3."""
  size = image_size or models.native_image_size(model)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape), train=False))
  macs = []

  def record_macs(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    params = context.module.variables.get("params", {})
    if context.method_name == "__call__" and "kernel" in params:
      macs.append(out.size * math.prod(params["kernel"].shape[:-1]))
    return out

  with nn.intercept_methods(record_macs), autotune.using_table():  # shapes only: nothing to time
    jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)  # a new function: no cached trace to skip
  params = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
  return {"params": params, "macs": sum(macs)}


def flops_per_image(model, image_size=None, mode="train"):
  """FLOPs of one image from `count`'s exact multiply-adds, 2 FLOPs each: the forward pass for 'eval', three
  times that for 'train' (the backward computes an input and a kernel gradient, each as costly as the forward)."""
  if mode not in ("train", "eval"):
    raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
  return 2 * count(model, image_size)["macs"] * (3 if mode == "train" else 1)


def explain(model, batch_size=32, image_size=None):
  """One dict per layer decision of a train step (forward and backward) on this backend: the layer, the
  implementation 'auto' runs, why (measured now, cached, recorded default, ...) and the times measured.

  Traces the step (nothing runs but the measurements), so on a CPU it times and caches what is not cached yet.
  """
  size = image_size or models.native_image_size(model)
  x = jnp.zeros((batch_size, size, size, 3), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1], train=False))

  def loss(params, batch_stats):
    logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                            mutable=["batch_stats"])
    return logits.sum()

  def label_layers(next_fun, args, kwargs, context):
    first = len(log)
    out = next_fun(*args, **kwargs)
    for entry in log[first:]:
      entry.setdefault("layer", "/".join(context.module.path) or "(model)")
    return out

  with autotune.explain() as log, nn.intercept_methods(label_layers):
    jax.jit(jax.grad(loss)).lower(variables["params"], variables["batch_stats"])
  return log


def _print_explanation(name, batch_size, image_size):
  model = models.create_model(name)
  log = explain(model, batch_size, image_size)
  print(f"{name}, batch {batch_size}, backend {jax.default_backend()}" + (
      f", CPU kernels: {cpu.kernel_status()}" if jax.default_backend() == "cpu" else ""))
  print(f"{'layer':<28} {'op':<34} {'runs':<10} {'why':<44} ms (timed, forward+backward on >= "
        f"{autotune.MIN_IMAGES} images and {autotune.MIN_PIXELS} input pixels, up to the batch)")
  for e in log:
    ms = ", ".join(f"{k} {v:g}" for k, v in e["ms"].items())
    print(f"{e['layer']:<28} {e['op']:<34} {e['choice']:<10} {e['reason']:<44} {ms}")


def main(argv=None):
  parser = argparse.ArgumentParser(description="Parameters and GMACs of resnext_jax models")
  parser.add_argument("models", nargs="*", help="registry names (default: all)")
  parser.add_argument("--image-size", type=int, default=None, help="default: 224 (ImageNet), 32 (CIFAR)")
  parser.add_argument("--explain", action="store_true",
                      help="print which implementation each layer of a train step uses here, and why")
  parser.add_argument("--batch-size", type=int, default=32, help="with --explain: the step's batch")
  args = parser.parse_args(argv)
  if args.explain:
    for name in args.models or ["resnext50_32x4d"]:
      _print_explanation(name, args.batch_size, args.image_size)
    return
  names = args.models or models.list_models()
  print(f"{'model':<20} {'size':>5} {'params':>14} {'GMACs':>8}")
  for name in names:
    model = models.create_model(name)
    size = args.image_size or models.native_image_size(model)
    c = count(model, size)
    print(f"{name:<20} {size:>5} {c['params']:>14,d} {c['macs'] / 1e9:>8.3f}")


if __name__ == "__main__":
  main()
