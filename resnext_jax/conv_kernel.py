"""The grouped-convolution CPU kernel (csrc/grouped_conv.cc) as a differentiable JAX op.

The C++ source is compiled on first use for the machine it runs on (-march=native) against the installed
jaxlib's XLA FFI headers, cached under ~/.cache/resnext_jax (or $RESNEXT_JAX_CACHE) by a key of source,
compiler, jaxlib version and CPU, and registered as XLA FFI targets. Building at first use rather than at
install time keeps `pip install` a pure-Python install and the binary matched to the host CPU and jaxlib. Where
it cannot be built (no C++ compiler), `available()` is False and conv.py's 'auto' uses 'blockdiag'.
Each op carries a custom_partitioning rule, so a batch sharded over devices or processes stays sharded.
"""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

from absl import logging
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec as P

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "grouped_conv.cc")
_TARGETS = {"forward": "GroupedConvForward", "input_grad": "GroupedConvInputGrad",
            "kernel_grad": "GroupedConvKernelGrad"}
_LANES = 16


class KernelUnavailable(RuntimeError):
  """The kernel could not be built or loaded here (the message says why)."""


def supported(x_shape, kernel_shape, groups, strides, padding, dtype=jnp.float32):
  """Whether the kernel computes this conv: in = out channels, a multiple of 16, group size 1/2/4/8 or 16k,
  and a dtype that float32 arithmetic serves (not float64, whose precision it would lose)."""
  c, (_, _, cg, cout) = x_shape[-1], kernel_shape
  return (len(x_shape) == 4 and cout == c and c % _LANES == 0 and cg * groups == c
          and jnp.dtype(dtype).itemsize <= 4 and jnp.issubdtype(dtype, jnp.floating)
          and (cg in (1, 2, 4, 8) or cg % _LANES == 0)
          and min(strides) >= 1 and min(p for pair in padding for p in pair) >= 0)


def available():
  """Whether the kernel is built and registered (builds it on first call)."""
  try:
    _load()
    return True
  except KernelUnavailable:
    return False


@functools.cache
def _load():
  """Builds (or finds in the cache) the shared library and registers its FFI targets; once per process.

  A cached library that does not load (a damaged file) is rebuilt once.
  """
  path = _build()
  try:
    lib = ctypes.cdll.LoadLibrary(path)
  except OSError:
    os.unlink(path)
    path = _build()
    try:
      lib = ctypes.cdll.LoadLibrary(path)
    except OSError as e:
      raise KernelUnavailable(f"cannot load the grouped-conv kernel {path}: {e}") from e
  for name, symbol in _TARGETS.items():
    jax.ffi.register_ffi_target(_target(name), jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
  return path


def _target(name):
  return f"resnext_jax_grouped_conv_{name}"


def _compiler():
  cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
  if not cxx:
    raise KernelUnavailable("no C++ compiler found (set CXX, or install g++) to build the grouped-conv kernel")
  return cxx


def _cpu_fingerprint():
  """The CPU model and feature flags: a -march=native binary must not be reused on another CPU."""
  try:
    with open("/proc/cpuinfo") as f:
      lines = [l for l in f if l.startswith(("model name", "flags"))]
    return "".join(sorted(set(lines)))
  except OSError:
    return f"{platform.machine()} {platform.processor()}"


def _build():
  """Path of the compiled library for this source, compiler, jaxlib and CPU; compiles it if not cached."""
  cxx = _compiler()
  flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}"]
  with open(SOURCE, "rb") as f:
    source = f.read()
  identity = [source, " ".join([cxx, *flags]).encode(), jaxlib.__version__.encode(), _cpu_fingerprint().encode()]
  key = hashlib.sha256(b"\0".join(identity)).hexdigest()[:16]
  cache = os.environ.get("RESNEXT_JAX_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "resnext_jax")
  path = os.path.join(cache, f"grouped_conv_{key}.so")
  if os.path.exists(path):
    return path
  os.makedirs(cache, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)  # compile beside, then rename: safe for parallel builds
  os.close(fd)
  logging.info("building the grouped-conv kernel: %s", path)
  try:
    result = subprocess.run([cxx, *flags, SOURCE, "-o", tmp], capture_output=True, text=True)
  except OSError as e:
    result = subprocess.CompletedProcess([cxx], 1, "", str(e))
  if result.returncode != 0:
    os.unlink(tmp)
    raise KernelUnavailable(f"building the grouped-conv kernel with {cxx} failed:\n{result.stderr[-2000:]}")
  os.replace(tmp, path)
  return path


def grouped_conv(x, kernel, strides, padding):
  """NHWC x HWIO grouped conv (groups = C / kernel's I) on the CPU kernel; computes in float32."""
  if jax.default_backend() != "cpu":
    raise ValueError(f"conv impl 'kernel' is a CPU kernel; on {jax.default_backend()} use 'auto' or 'xla'")
  _load()
  dtype = jnp.result_type(x, kernel)
  if not supported(x.shape, kernel.shape, x.shape[-1] // kernel.shape[2], strides, padding, dtype):
    raise ValueError(f"the grouped-conv kernel does not support input {x.shape} with kernel {kernel.shape}, "
                     f"strides {strides}, padding {padding}")
  y = _conv(x.astype(jnp.float32), kernel.astype(jnp.float32), tuple(strides), tuple(map(tuple, padding)))
  return y.astype(dtype)


def _attrs(strides, padding):
  return dict(sh=np.int64(strides[0]), sw=np.int64(strides[1]), pt=np.int64(padding[0][0]),
              pl=np.int64(padding[1][0]))


def _ffi(name, out_shape, a, b, strides, padding):
  out = jax.ShapeDtypeStruct(out_shape, jnp.float32)
  return jax.ffi.ffi_call(_target(name), out, vmap_method="sequential")(a, b, **_attrs(strides, padding))


# Sharding: every op is independent per image, so a batch sharded over devices stays sharded (each device
# runs the kernel on its images); the kernel gradient sums its per-device results over the batch's mesh axes.
# Other dimensions are replicated. Without these rules XLA would gather the whole batch onto every device.
_RULES = {  # Shardy rule (einsum-like) per op; 'n' is the batch
    "forward": "n h w c, kh kw i c -> n oh ow c",
    "input_grad": "n oh ow c, kh kw i c -> n h w c",
    "kernel_grad": "n h w c, n oh ow c -> kh kw i c",
}


def _factors_in_order(rule, skip):
  """The rule's factors in order of first appearance (Shardy wants special factors sorted), less `skip`."""
  seen = []
  for f in rule.replace(",", " ").replace("->", " ").split():
    if f != skip and f not in seen:
      seen.append(f)
  return tuple(seen)


def _batch_axes(arg_shapes):
  spec = arg_shapes[0].sharding.spec
  return spec[0] if len(spec) else None


def _partitioned(name):
  """FFI op `name` as a custom_partitioning op: batch-sharded operands, one kernel call per device."""
  @functools.partial(custom_partitioning, static_argnums=(2, 3, 4))
  def op(a, b, strides, padding, out_shape):
    return _ffi(name, out_shape, a, b, strides, padding)

  def shardings(mesh, arg_shapes):
    batch = _batch_axes(arg_shapes)
    sharded, replicated = NamedSharding(mesh, P(batch)), NamedSharding(mesh, P())
    if name == "kernel_grad":               # (x, dy) both per image -> one kernel gradient
      return batch, replicated, (sharded, sharded)
    return batch, sharded, (sharded, replicated)

  def partition(strides, padding, out_shape, mesh, arg_shapes, result_shape):
    del result_shape
    batch, result, args = shardings(mesh, arg_shapes)
    def lower(a, b):
      if name == "kernel_grad":
        dw = _ffi(name, out_shape, a, b, strides, padding)
        return dw if batch is None else jax.lax.psum(dw, batch)
      return _ffi(name, (a.shape[0], *out_shape[1:]), a, b, strides, padding)
    return mesh, lower, result, args

  def infer(strides, padding, out_shape, mesh, arg_shapes, result_shape):
    del strides, padding, out_shape, result_shape
    return shardings(mesh, arg_shapes)[1]

  op.def_partition(partition=partition, infer_sharding_from_operands=infer, sharding_rule=_RULES[name],
                   reduction_factors=("n",) if name == "kernel_grad" else (),
                   need_replication_factors=_factors_in_order(_RULES[name], skip="n"))
  return op


_OPS = {name: _partitioned(name) for name in _TARGETS}


def _call(name, out_shape, a, b, strides, padding):
  """The FFI op `name` on (a, b) giving `out_shape` (global), partitioned over a sharded batch."""
  return _OPS[name](a, b, strides, padding, tuple(out_shape))


def _out_shape(x_shape, kernel_shape, strides, padding):
  n, h, w, c = x_shape
  kh, kw = kernel_shape[:2]
  (pt, pb), (pl, pr) = padding
  return (n, (h + pt + pb - kh) // strides[0] + 1, (w + pl + pr - kw) // strides[1] + 1, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, strides, padding):
  return _call("forward", _out_shape(x.shape, kernel.shape, strides, padding), x, kernel, strides, padding)


def _conv_fwd(x, kernel, strides, padding):
  return _conv(x, kernel, strides, padding), (x, kernel)


def _conv_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  dx = _call("input_grad", x.shape, dy, _transpose_groups(kernel), strides, padding)
  dkernel = _call("kernel_grad", kernel.shape, x, dy, strides, padding)
  return dx, dkernel


_conv.defvjp(_conv_fwd, _conv_bwd)


def _transpose_groups(kernel):
  """kernel_t[h, w, o, g*Cg + i] = kernel[h, w, i, g*Cg + o]: the input gradient's weights."""
  kh, kw, cg, c = kernel.shape
  k = kernel.reshape(kh, kw, cg, c // cg, cg)
  return jnp.transpose(k, (0, 1, 4, 3, 2)).reshape(kh, kw, cg, c)
