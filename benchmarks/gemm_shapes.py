"""The 1x1 convolutions' products of one train step (default: resnext50_32x4d, batch 32), timed alone: our
GEMM kernel (resnext_jax/cpu/matmul.py) against XLA's dot (YNNPACK, with the training job's compiler options).

    PYTHONPATH=. python benchmarks/gemm_shapes.py [--model resnext50_32x4d] [--batch-size 32] [--repeats 5]

Prints per shape the best-of-`repeats` ms of the forward (x w), input gradient (dy w^T) and kernel gradient
(x^T dy) for each, then the totals over the step (each shape counted as often as the model has it). The shapes
come from the model itself (`shapes`: every 1x1 conv met while tracing it), not from a typed-in list.
"""

import argparse
import collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.conv_layers import best_ms
from resnext_jax import cpu, models
from resnext_jax.cpu import host_memory, matmul as matmul_kernel
from resnext_jax.layers import conv


def shapes(model, batch_size, image_size=None):
  """[(pixels M = batch * Ho * Wo, in K, out N, how many 1x1 convs of the model have this shape)] in the order
  the forward meets them, from tracing the model (no FLOPs spent). A stride-2 1x1 conv (a downsample) is a
  product over its output pixels: the kernel runs it on the strided slice of its input."""
  size = image_size or models.native_image_size(model)
  x = jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32)
  counts = collections.Counter()

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if (context.method_name == "__call__" and isinstance(module, conv.Conv)
        and tuple(module.kernel_size) == (1, 1) and module.feature_group_count == 1):
      b, ho, wo, n = out.shape
      counts[(b * ho * wo, args[0].shape[-1], n)] += 1  # Counter keeps the order of first appearance
    return out

  model = model.clone(conv_impl="xla")  # the same shapes; nothing for 'auto' to time while tracing
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)  # a new function: traced anew, never cached
  return [(m, k, n, c) for (m, k, n), c in counts.items()]


def products(impl):
  """forward, input gradient, kernel gradient on x [B, M/B, 1, K], w [K, N], dy [B, M/B, 1, N]."""
  if impl == "kernel":
    cpu.load()
    return (matmul_kernel._forward_op(), lambda dy, w: matmul_kernel._forward_op()(dy, w.T),
            matmul_kernel._kernel_grad_op())
  flat = lambda a: a.reshape(-1, a.shape[-1])  # 2D, as conv.py's 'matmul' (XLA's fastest form)
  return (lambda x, w: flat(x) @ w, lambda dy, w: flat(dy) @ w.T, lambda x, dy: flat(x).T @ flat(dy))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="resnext50_32x4d")
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--image-size", type=int, default=None, help="default: the model's (224 ImageNet, 32 CIFAR)")
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args()
  host_memory.retain_freed_memory()  # as the training job
  gemms = shapes(models.create_model(args.model), args.batch_size, args.image_size)
  batch = args.batch_size
  rng = np.random.default_rng(0)
  fns = {impl: [jax.jit(f, compiler_options=cpu.compiler_options()) for f in products(impl)]
         for impl in ("kernel", "xla")}
  totals = {impl: np.zeros(3) for impl in fns}
  print(f"{'M x K x N':22s} {'impl':7s} {'fwd':>7s} {'dgrad':>7s} {'wgrad':>7s}  ms")
  for m, k, n, count in gemms:
    x = jnp.asarray(rng.standard_normal((batch, m // batch, 1, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((batch, m // batch, 1, n)), jnp.float32)
    for impl, (fwd, dgrad, wgrad) in fns.items():
      ms = np.array([best_ms(fwd, x, w, repeats=args.repeats), best_ms(dgrad, dy, w, repeats=args.repeats),
                     best_ms(wgrad, x, dy, repeats=args.repeats)])
      totals[impl] += count * ms
      print(f"{m:6d} x {k:4d} x {n:4d} x{count} {impl:7s} {ms[0]:7.2f} {ms[1]:7.2f} {ms[2]:7.2f}", flush=True)
  for impl, t in totals.items():
    gflop = sum(2 * m * k * n * c for m, k, n, c in gemms) / 1e9
    rates = " / ".join(f"{gflop / (ms / 1e3):.0f}" for ms in t)
    print(f"total per train step, {impl}: fwd {t[0]:.0f} ms, dgrad {t[1]:.0f} ms, wgrad {t[2]:.0f} ms "
          f"({rates} GFLOP/s)")


if __name__ == "__main__":
  main()
