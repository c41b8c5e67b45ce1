"""Per-layer timing of ResNeXt-50 32x4d's convolutions for each implementation (and PyTorch's, if installed).

    python benchmarks/conv_layers.py [--batch-size 32] [--impls xla,blockdiag,matmul] [--layers grouped56,...]
        [--repeats 3] [--torch]

Forward is the conv alone; 'fwd+bwd' is the conv plus the gradients a train step needs (input and kernel;
kernel only for the stem, whose input is the image). Prints one line per layer and implementation: the
best-of-`repeats` milliseconds, compiled with the options the training job uses (`cpu.compiler_options()`).
These figures choose `auto` in resnext_jax/layers/conv.py (docs/performance.md).
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp

from resnext_jax import cpu
from resnext_jax.cpu import host_memory
from resnext_jax.layers import conv

# name: (input size, in channels, out channels, kernel, stride, groups), as in resnext50_32x4d.
LAYERS = {
    "stem7x7": (224, 3, 64, 7, 2, 1),
    "1x1_56_256to128": (56, 256, 128, 1, 1, 1),
    "1x1_56_128to256": (56, 128, 256, 1, 1, 1),
    "grouped56": (56, 128, 128, 3, 1, 32),
    "grouped28": (28, 256, 256, 3, 1, 32),
    "grouped14": (14, 512, 512, 3, 1, 32),
    "grouped7": (7, 1024, 1024, 3, 1, 32),
    "grouped56_s2": (56, 256, 256, 3, 2, 32),
    "grouped28_s2": (28, 512, 512, 3, 2, 32),
    "grouped14_s2": (14, 1024, 1024, 3, 2, 32),
    "downsample1x1_s2": (56, 256, 512, 1, 2, 1),
    "1x1_14_1024to512": (14, 1024, 512, 1, 1, 1),
}


def best_ms(fn, *args, repeats):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * min(times)


def jax_fns(layer, impl):
  _, _, _, k, s, groups = layer
  f = functools.partial(conv.conv_general, strides=(s, s), padding=((k // 2, k // 2),) * 2, groups=groups,
                        impl=impl)
  argnums = (1,) if layer[1] == 3 else (0, 1)          # the stem needs no input gradient
  grads = jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), argnums=argnums)
  options = cpu.compiler_options()       # as the training job compiles its steps
  return jax.jit(f, compiler_options=options), jax.jit(grads, compiler_options=options)


def time_jax(layer, impl, batch, repeats):
  size, cin, cout, k, _, groups = layer
  x = jax.random.normal(jax.random.key(0), (batch, size, size, cin))
  w = jax.random.normal(jax.random.key(1), (k, k, cin // groups, cout)) * 0.05
  fwd, fwd_bwd = jax_fns(layer, impl)
  return best_ms(fwd, x, w, repeats=repeats), best_ms(fwd_bwd, x, w, repeats=repeats)


def time_torch(layer, batch, repeats):
  import torch

  size, cin, cout, k, s, groups = layer
  m = torch.nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False).to(memory_format=torch.channels_last)
  x = torch.randn(batch, cin, size, size).contiguous(memory_format=torch.channels_last)
  x.requires_grad_(cin != 3)

  def fwd():
    with torch.no_grad():
      m(x)

  def fwd_bwd():
    m(x).square().sum().backward()

  return tuple(best_ms_torch(f, repeats) for f in (fwd, fwd_bwd))


def best_ms_torch(fn, repeats):
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * min(times)


def main():
  host_memory.retain_freed_memory()  # as the training job: repeated calls reuse pages (JAX and torch alike)
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--impls", default="xla,blockdiag,matmul")
  p.add_argument("--layers", default=",".join(LAYERS))
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--torch", action="store_true", help="also time torch.nn.Conv2d (channels_last)")
  args = p.parse_args()
  print(f"{'layer':20s} {'impl':10s} {'fwd ms':>9s} {'fwd+bwd ms':>11s}")
  for name in args.layers.split(","):
    layer = LAYERS[name]
    rows = [(impl, time_jax(layer, impl, args.batch_size, args.repeats)) for impl in args.impls.split(",")]
    if args.torch:
      rows.append(("torch", time_torch(layer, args.batch_size, args.repeats)))
    for impl, (fwd, fwd_bwd) in rows:
      print(f"{name:20s} {impl:10s} {fwd:9.1f} {fwd_bwd:11.1f}", flush=True)


if __name__ == "__main__":
  main()
