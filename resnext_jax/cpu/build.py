"""Our C++ CPU kernels (csrc/*.cc), built on first use and registered as XLA FFI targets.

The sources are compiled into one library for the machine they run on (-march=native) against the installed
jaxlib's XLA FFI headers, cached under ~/.cache/resnext_jax (or $RESNEXT_JAX_CACHE) by a key of the sources,
compiler, jaxlib version and CPU. Building at first use rather than at install time keeps `pip install` a
pure-Python install and the binary matched to the host CPU and jaxlib. Where it cannot be built (no C++
compiler), `available()` is False and callers use their XLA formulations.

`batch_partitioned` makes an FFI call a custom_partitioning op, so a batch sharded over devices or processes
stays sharded: each device runs the kernel on its images.
"""

import ctypes
import functools
import glob
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

from absl import logging
import jax
import jaxlib

from resnext_jax.errors import KernelUnavailable

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")

# Exported handler symbol -> FFI target name, for every kernel in csrc/.
TARGETS = {
    "GroupedConvForward": "resnext_jax_grouped_conv_forward",
    "GroupedConvInputGrad": "resnext_jax_grouped_conv_input_grad",
    "GroupedConvKernelGrad": "resnext_jax_grouped_conv_kernel_grad",
    "BatchNormStats": "resnext_jax_batch_norm_stats",
    "BatchNormApply": "resnext_jax_batch_norm_apply",
    "BatchNormGradStats": "resnext_jax_batch_norm_grad_stats",
    "BatchNormGradApply": "resnext_jax_batch_norm_grad_apply",
    "MaxPoolForward": "resnext_jax_max_pool_forward",
    "MaxPoolBackward": "resnext_jax_max_pool_backward",
    "MatMulForward": "resnext_jax_matmul_forward",
    "MatMulKernelGrad": "resnext_jax_matmul_kernel_grad",
}




def available():
  """Whether the kernels are built and registered (builds them on first call)."""
  try:
    load()
    return True
  except KernelUnavailable:
    return False


@functools.cache
def load():
  """Builds (or finds in the cache) the shared library and registers its FFI targets; once per process.

  A cached library that does not load (a damaged file) is rebuilt once.
  """
  path = build()
  try:
    lib = ctypes.cdll.LoadLibrary(path)
  except OSError:
    os.unlink(path)
    path = build()
    try:
      lib = ctypes.cdll.LoadLibrary(path)
    except OSError as e:
      raise KernelUnavailable(f"cannot load the CPU kernels {path}: {e}") from e
  for symbol, target in TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  return path


def _compiler():
  cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
  if not cxx:
    raise KernelUnavailable("no C++ compiler found (set CXX, or install g++) to build the CPU kernels")
  return cxx


def _cpu_fingerprint():
  """The CPU model and feature flags: a -march=native binary must not be reused on another CPU."""
  try:
    with open("/proc/cpuinfo") as f:
      lines = [l for l in f if l.startswith(("model name", "flags"))]
    return "".join(sorted(set(lines)))
  except OSError:
    return f"{platform.machine()} {platform.processor()}"


def build():
  """Path of the compiled library for these sources, compiler, jaxlib and CPU; compiles it if not cached."""
  cxx = _compiler()
  march = os.environ.get("RESNEXT_JAX_CPU_MARCH") or "native"
  flags = ["-O3", f"-march={march}", "-std=c++17", "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}"]
  sources = sorted(glob.glob(os.path.join(CSRC, "*.cc")))
  identity = [" ".join([cxx, *flags]).encode(), jaxlib.__version__.encode(), _cpu_fingerprint().encode()]
  for path in sorted(glob.glob(os.path.join(CSRC, "*.*"))):  # sources and headers
    with open(path, "rb") as f:
      identity += [os.path.basename(path).encode(), f.read()]
  key = hashlib.sha256(b"\0".join(identity)).hexdigest()[:16]
  cache = os.environ.get("RESNEXT_JAX_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "resnext_jax")
  path = os.path.join(cache, f"cpu_kernels_{key}.so")
  if os.path.exists(path):
    return path
  os.makedirs(cache, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)  # compile beside, then rename: safe for parallel builds
  os.close(fd)
  logging.info("building the CPU kernels: %s", path)
  try:
    result = subprocess.run([cxx, *flags, *sources, "-o", tmp], capture_output=True, text=True)
  except OSError as e:
    result = subprocess.CompletedProcess([cxx], 1, "", str(e))
  if result.returncode != 0:
    os.unlink(tmp)
    raise KernelUnavailable(f"building the CPU kernels with {cxx} failed:\n{result.stderr[-2000:]}")
  os.replace(tmp, path)
  return path


def target(symbol):
  """The registered FFI target name of handler `symbol` (builds and registers the kernels on first use)."""
  load()
  return TARGETS[symbol]
