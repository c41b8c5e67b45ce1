"""Everything that exists only for XLA:CPU: our C++ kernels, their build, the compiler options, host memory.

- build.py: compiles csrc/ for this machine's ISA on first use, caches and registers the library.
- grouped_conv.py, matmul.py, batch_norm.py, max_pool.py: the kernels as differentiable JAX ops.
- partition.py: keeps a sharded batch sharded around the kernels.
- options.py: the XLA:CPU options the steps are compiled with; host_memory.py: malloc settings.
- autotune.py: 'auto' times each layer's candidate implementations on this machine once and caches the fastest.

The portable layers (resnext_jax.layers) ask this package one question per op, "is there a faster CPU op for
this?": `conv_op`, `batch_norm_ops` and `max_pool_op` return our kernel's op where it applies, else None.
"""

import functools

import jax
import jax.numpy as jnp

from resnext_jax.cpu import autotune, batch_norm, build, grouped_conv, matmul, max_pool
from resnext_jax.cpu.build import KernelUnavailable, available, load  # pylint: disable=unused-import
from resnext_jax.cpu.options import compiler_options, run_once_options  # pylint: disable=unused-import


def kernel_status():
  """One line on the kernels here: the ISA they were built for, or why they are not available."""
  try:
    name, lanes = build.isa()
    return f"built for {name} ({lanes} floats per vector, -march={build.march()})"
  except KernelUnavailable as e:
    return f"not available ({str(e).splitlines()[0]})"


def prepare(conv_impl="auto"):
  """Starts building (or loading) the kernels in the background where a job will use them: a CPU backend and
  conv_impl 'auto' or 'kernel'. A job calls this first thing; its first kernel layer waits for the build.

  Why: the first-use build (~10 s on 2 cores, 2-core AVX2 EPYC) then overlaps importing TensorFlow and preparing
  the dataset.
  """
  if conv_impl in ("auto", "kernel") and jax.default_backend() == "cpu":
    build.load_in_background()


def _on_cpu():
  return jax.default_backend() == "cpu" and available()


def conv_op(x, kernel, strides, padding, groups):
  """Our kernel for this NHWC x HWIO convolution as a function of (x, kernel), or None where none covers it."""
  if not _on_cpu():
    return None
  if groups > 1 and grouped_conv.supported(x.shape, kernel.shape, groups, strides, padding, x.dtype):
    return functools.partial(grouped_conv.grouped_conv, strides=strides, padding=padding)
  if tuple(kernel.shape[:2]) == (1, 1) and matmul.supported(x.shape, kernel.shape, groups, padding, x.dtype):
    return functools.partial(matmul.pointwise_conv, strides=strides)
  return None


def batch_norm_ops(x, scale, bias, shortcut=None):
  """The batch-norm kernels (a module with `normalize` and `apply_running`) for these operands, or None."""
  operands = (x, scale, bias) + (() if shortcut is None else (shortcut,))
  if not (x.ndim == 4 and all(a.dtype == jnp.float32 for a in operands) and _on_cpu()):
    return None
  return batch_norm


def max_pool_op(x, window, strides, padding):
  """Our max-pool kernel for this geometry as a function of x, or None."""
  if not (max_pool.applies(x, window, strides, padding) and _on_cpu()):
    return None
  return lambda v: max_pool.max_pool(v, window, strides, padding)
