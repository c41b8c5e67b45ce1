"""Parameters and multiply-adds of registered models, counted exactly while tracing (no FLOPs spent).

  python -m resnext_jax.summary                      # every model at its native size
  python -m resnext_jax.summary resnext50_32x4d --image-size 320

MACs are those of the convolutions and the classifier (what the paper's Table 1 and torchvision's GFLOPS
count): for every module with a 'kernel', output elements x kernel elements per output channel.
"""

import argparse
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnext_jax import models


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

  with nn.intercept_methods(record_macs):
    jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)  # a new function: no cached trace to skip
  params = sum(leaf.size for leaf in jax.tree.leaves(variables["params"]))
  return {"params": params, "macs": sum(macs)}


def flops_per_image(model, image_size=None, mode="train"):
  """FLOPs of one image from `count`'s exact multiply-adds, 2 FLOPs each: the forward pass for 'eval', three
  times that for 'train' (the backward computes an input and a kernel gradient, each as costly as the forward)."""
  if mode not in ("train", "eval"):
    raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
  return 2 * count(model, image_size)["macs"] * (3 if mode == "train" else 1)


def main(argv=None):
  parser = argparse.ArgumentParser(description="Parameters and GMACs of resnext_jax models")
  parser.add_argument("models", nargs="*", help="registry names (default: all)")
  parser.add_argument("--image-size", type=int, default=None, help="default: 224 (ImageNet), 32 (CIFAR)")
  args = parser.parse_args(argv)
  names = args.models or models.list_models()
  print(f"{'model':<20} {'size':>5} {'params':>14} {'GMACs':>8}")
  for name in names:
    model = models.create_model(name)
    size = args.image_size or models.native_image_size(model)
    c = count(model, size)
    print(f"{name:<20} {size:>5} {c['params']:>14,d} {c['macs'] / 1e9:>8.3f}")


if __name__ == "__main__":
  main()
