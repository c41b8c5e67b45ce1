"""A TensorFlow op for the input pipeline's resize (csrc/resize_bilinear_u8.cc), built on first use.

What it replaces: the fast transforms' last step, `saturate_cast<uint8>(round(ResizeBilinear(window)))` and the
train flip, four TF ops with a float32 image between them. The op does the same arithmetic in one pass and is
bit-identical (tests/test_resize_op.py). Measured on a quiet 2-core AVX2 EPYC, one tf.data thread: a 330 x 330
window to 224 x 224 took 0.21-0.23 ms above a no-op map, against 0.54-0.56 ms for the TF ops. On ImageNet-like
JPEGs the train transform went from a median of 517 to 638 images per CPU-second, and eval from 500 to 611
(benchmarks/input_pipeline_benchmark.py, three runs each; docs/input_pipeline.md).

- Build: the C++ compiler and target flags of the CPU kernels (cpu/build.py: `-march=native` or
  $RESNEXT_JAX_CPU_MARCH), TensorFlow's own compile and link flags (`tf.sysconfig`), `-ffp-contract=off` (a
  fused multiply-add would change the last bit), ~13 s on 2 cores (TF's headers are most of it), said on the
  console.
- Cache: beside the CPU kernels ($RESNEXT_JAX_CACHE or ~/.cache/resnext_jax), keyed by the source, the compiler,
  its flags and view of the target, and TensorFlow's version (custom ops are built against its headers).
- A cached library that does not load (a damaged file) is rebuilt once. Failure (no compiler, no TF headers, a
  TF that rejects the library) is remembered for the process and said once; the transforms then use the TF
  ops, with the same pixels. $RESNEXT_JAX_INPUT_OP=off does the same.
"""

import hashlib
import os

import tensorflow as tf

from resnext_jax.cpu import build as cpu_build
from resnext_jax.errors import KernelUnavailable

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "resize_bilinear_u8.cc")
PURPOSE = "the input pipeline's resize op"
_FLAGS = ["-O3", "-fPIC", "-shared", "-ffp-contract=off", "-Wno-deprecated-declarations"]


def enabled() -> bool:
  return os.environ.get("RESNEXT_JAX_INPUT_OP", "on").lower() not in ("0", "off", "false")


def library():
  """The loaded op library (its ops as Python functions), or None where it is switched off or cannot be built."""
  if not enabled():
    return None
  try:
    return _load_once()  # locked: tf.data may trace transforms from several threads
  except KernelUnavailable:
    return None


def resize_bilinear_u8(image: tf.Tensor, size: int, flip, columns=None) -> tf.Tensor | None:
  """uint8 (h, w, 3) -> uint8 (size, size, 3), mirrored where `flip` (a bool tensor); None without the op.
  columns: int32 [first, count], the part of the image to resize (default all of it)."""
  lib = library()
  if lib is None:
    return None
  if columns is None:
    columns = tf.stack([0, tf.shape(image)[1]])
  return lib.resnext_resize_bilinear_u8(image, columns, flip, size=size)


_LOAD_ERRORS = (tf.errors.NotFoundError, tf.errors.InvalidArgumentError, OSError)


def _load():
  _, lib = cpu_build.load_rebuilding_once(build, tf.load_op_library, _LOAD_ERRORS, PURPOSE)
  return lib


_load_once = cpu_build.LoadOnce(_load, "the input pipeline resizes with TensorFlow's ops instead (same pixels)")


def library_key(cxx, isa_flags, macros) -> str:
  identity = [" ".join([cxx, *isa_flags, *_FLAGS]).encode(), macros.encode(), tf.__version__.encode(),
              " ".join(tf.sysconfig.get_compile_flags()).encode()]
  with open(SOURCE, "rb") as f:
    identity.append(f.read())
  return hashlib.sha256(b"\0".join(identity)).hexdigest()[:16]


def build() -> str:
  """Path of the op library for this machine and TensorFlow; compiles it if it is not in the cache."""
  cxx = cpu_build.compiler(PURPOSE)
  isa_flags, macros = cpu_build.target_flags(cxx, PURPOSE)
  path = os.path.join(cpu_build.cache_dir(), f"tf_resize_op_{library_key(cxx, isa_flags, macros)}.so")
  if os.path.exists(path):
    return path
  if not os.path.exists(os.path.join(tf.sysconfig.get_include(), "tensorflow", "core", "framework", "op_kernel.h")):
    raise KernelUnavailable(f"building {PURPOSE} needs TensorFlow's C++ headers, not found in "
                            f"{tf.sysconfig.get_include()}")

  def compile_into(tmp):
    out = os.path.join(tmp, "op.so")
    cpu_build.check(cpu_build.run([cxx, *_FLAGS, *isa_flags, *tf.sysconfig.get_compile_flags(), SOURCE, "-o", out,
                                   *tf.sysconfig.get_link_flags()]), cxx, "compiling and linking", PURPOSE)
    return out

  return cpu_build.build_beside(path, PURPOSE, f"for this machine and TensorFlow {tf.__version__}", compile_into)
