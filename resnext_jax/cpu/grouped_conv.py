"""The grouped-convolution CPU kernel (csrc/grouped_conv.cc) as a differentiable JAX op.

Built on first use with our other CPU kernels (build.py); where it cannot be built (no C++ compiler), the
layers use their portable implementations. Each op carries a custom_partitioning rule, so a
batch sharded over devices or processes stays sharded.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from resnext_jax.cpu import build, partition

_LANES = 16


def supported(x_shape, kernel_shape, groups, strides, padding, dtype=jnp.float32):
  """Whether the kernel computes this conv: in = out channels, a multiple of 16, group size 1/2/4/8 or 16k,
  and a dtype that float32 arithmetic serves (not float64, whose precision it would lose)."""
  c, (_, _, cg, cout) = x_shape[-1], kernel_shape
  return (len(x_shape) == 4 and cout == c and c % _LANES == 0 and cg * groups == c
          and jnp.dtype(dtype).itemsize <= 4 and jnp.issubdtype(dtype, jnp.floating)
          and (cg in (1, 2, 4, 8) or cg % _LANES == 0)
          and min(strides) >= 1 and min(p for pair in padding for p in pair) >= 0)


def grouped_conv(x, kernel, strides, padding):
  """NHWC x HWIO grouped conv (groups = C / kernel's I) on the CPU kernel; computes in float32."""
  if jax.default_backend() != "cpu":
    raise ValueError(f"conv impl 'kernel' is a CPU kernel; on {jax.default_backend()} use 'auto' or 'xla'")
  build.load()
  dtype = jnp.result_type(x, kernel)
  if not supported(x.shape, kernel.shape, x.shape[-1] // kernel.shape[2], strides, padding, dtype):
    raise ValueError(f"the grouped-conv kernel does not support input {x.shape} with kernel {kernel.shape}, "
                     f"strides {strides}, padding {padding}")
  y = _conv(x.astype(jnp.float32), kernel.astype(jnp.float32), tuple(strides), tuple(map(tuple, padding)))
  return y.astype(dtype)


def _attrs(strides, padding):
  return dict(sh=np.int64(strides[0]), sw=np.int64(strides[1]), pt=np.int64(padding[0][0]),
              pl=np.int64(padding[1][0]))


# Every op is independent per image, so a batch sharded over devices stays sharded (each device runs the
# kernel on its images); the kernel gradient sums its per-device results over the batch's mesh axes.
_OPS = {  # op: (FFI handler symbol, Shardy rule (einsum-like; 'n' is the batch), operands sharded on the batch)
    "forward": ("GroupedConvForward", "n h w c, kh kw i c -> n oh ow c", 1),
    "input_grad": ("GroupedConvInputGrad", "n oh ow c, kh kw i c -> n h w c", 1),
    "kernel_grad": ("GroupedConvKernelGrad", "n h w c, n oh ow c -> kh kw i c", 2),
}


@functools.cache
def _op(name, out_shape, strides, padding):
  """FFI op `name` giving `out_shape` (global) as a batch-partitioned op."""
  symbol, rule, batched = _OPS[name]
  target = build.target(symbol)

  def call(a, b):
    shape = out_shape if name == "kernel_grad" else (a.shape[0], *out_shape[1:])  # a device's share
    out = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.ffi.ffi_call(target, out, vmap_method="sequential")(a, b, **_attrs(strides, padding))
  return partition.batch_partitioned(call, rule, batched, reduce_batch=name == "kernel_grad")


def _call(name, out_shape, a, b, strides, padding):
  """The FFI op `name` on (a, b) giving `out_shape` (global), partitioned over a sharded batch."""
  return _op(name, tuple(out_shape), strides, padding)(a, b)


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
