"""The 1x1 convolutions' products of one resnext50_32x4d batch-32 train step, timed alone: our GEMM kernel
(resnext_jax/cpu/matmul.py) against XLA's dot (YNNPACK, with the training job's compiler options).

    PYTHONPATH=. python benchmarks/gemm_shapes.py [--repeats 5]

Prints per shape the best-of-`repeats` ms of the forward (x w), input gradient (dy w^T) and kernel gradient
(x^T dy) for each, then the totals over the step (each shape counted as often as the model has it).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.conv_layers import best_ms
from resnext_jax import cpu
from resnext_jax.cpu import host_memory, matmul as matmul_kernel

# (pixels M = batch * H * W, in K, out N, how many 1x1 convs of the train step have this shape), from the
# optimised HLO of the step (the stride-2 downsamples after their slice).
SHAPES = [(100352, 64, 128, 1), (100352, 128, 256, 3), (100352, 64, 256, 1), (100352, 256, 128, 2),
          (100352, 256, 256, 1), (25088, 256, 512, 5), (25088, 512, 256, 3), (25088, 512, 512, 1),
          (6272, 512, 1024, 7), (6272, 1024, 512, 5), (6272, 1024, 1024, 1), (1568, 1024, 2048, 4),
          (1568, 2048, 1024, 2)]


def products(impl):
  """forward, input gradient, kernel gradient on x [32, M/32, 1, K], w [K, N], dy [32, M/32, 1, N]."""
  if impl == "kernel":
    cpu.load()
    return (matmul_kernel._forward_op(), lambda dy, w: matmul_kernel._forward_op()(dy, w.T),
            matmul_kernel._kernel_grad_op())
  flat = lambda a: a.reshape(-1, a.shape[-1])  # 2D, as conv.py's 'matmul' (XLA's fastest form)
  return (lambda x, w: flat(x) @ w, lambda dy, w: flat(dy) @ w.T, lambda x, dy: flat(x).T @ flat(dy))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args()
  host_memory.retain_freed_memory()  # as the training job
  rng = np.random.default_rng(0)
  fns = {impl: [jax.jit(f, compiler_options=cpu.compiler_options()) for f in products(impl)]
         for impl in ("kernel", "xla")}
  totals = {impl: np.zeros(3) for impl in fns}
  print(f"{'M x K x N':22s} {'impl':7s} {'fwd':>7s} {'dgrad':>7s} {'wgrad':>7s}  ms")
  for m, k, n, count in SHAPES:
    x = jnp.asarray(rng.standard_normal((32, m // 32, 1, k)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
    dy = jnp.asarray(rng.standard_normal((32, m // 32, 1, n)), jnp.float32)
    for impl, (fwd, dgrad, wgrad) in fns.items():
      ms = np.array([best_ms(fwd, x, w, repeats=args.repeats), best_ms(dgrad, dy, w, repeats=args.repeats),
                     best_ms(wgrad, x, dy, repeats=args.repeats)])
      totals[impl] += count * ms
      print(f"{m:6d} x {k:4d} x {n:4d} x{count} {impl:7s} {ms[0]:7.2f} {ms[1]:7.2f} {ms[2]:7.2f}", flush=True)
  for impl, t in totals.items():
    gflop = sum(2 * m * k * n * c for m, k, n, c in SHAPES) / 1e9
    rates = " / ".join(f"{gflop / (ms / 1e3):.0f}" for ms in t)
    print(f"total per train step, {impl}: fwd {t[0]:.0f} ms, dgrad {t[1]:.0f} ms, wgrad {t[2]:.0f} ms "
          f"({rates} GFLOP/s)")


if __name__ == "__main__":
  main()
