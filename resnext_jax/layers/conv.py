"""Convolution layer used by every conv of the model, with interchangeable implementations.

All implementations compute the same NHWC x HWIO convolution from the same parameter ('kernel', HWIO with
I = in_features // groups, as nn.Conv), so a checkpoint trained with one loads into any other; they differ
only in how XLA is asked to compute it, because XLA's speed depends heavily on the formulation:

- 'xla': `lax.conv_general_dilated(feature_group_count=groups)`. On CPU, XLA rewrites a grouped conv into a
  dense conv with a block-diagonal kernel (`groups` times the FLOPs) and its backward is far worse still
  (36 s for one 56x56x128 32-group conv at batch 32); the dense convolutions' weight gradient is slow too.
  On GPU/TPU it is cuDNN/the TPU convolution unit, the reasonable default there.
- 'blockdiag': channels are cut into super-groups of a few groups each; each super-group is one dense conv
  with a block-diagonal kernel. That bounds the wasted FLOPs to the super-group size while keeping XLA's
  fast dense (Eigen) convolution, and autodiff of dense convs avoids the grouped backward.
- 'matmul': im2col (one shifted slice per tap) and 2D matmuls, per super-group for grouped convs. A 1x1
  conv is then a single matmul, whose backward is two matmuls: on CPU ~6x faster than the conv's.
- 'kernel': our own CPU kernels through XLA's FFI (resnext_jax/cpu/): grouped convs, the grouped conv itself
  with no wasted FLOPs, no split or concatenation; and 1x1 convs, a register-blocked GEMM. Forward, input and
  kernel gradients, sized for the machine's vector ISA. Layers they do not cover (the stem, channels not
  multiples of 16, float64) run as 'blockdiag' (grouped) or 'matmul' (1x1) or 'xla'.
- 'auto': 'xla' on GPU/TPU; on CPU the fastest of the kernel and the portable implementations for each layer
  shape, timed on this machine on first use and cached (see `_auto` and resnext_jax/cpu/autotune.py).

The XLA:CPU options the training and eval steps are compiled with (resnext_jax/cpu/options.py) are part of
what makes these formulations fast on CPU.
"""

import contextlib
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnext_jax import cpu

IMPLS = ("auto", "xla", "blockdiag", "matmul", "kernel")

PORTABLE_IMPLS = ("xla", "blockdiag", "matmul")  # plain XLA on every backend: what an exported artifact may use


def conv_general(x, kernel, strides, padding, groups, impl="auto", measure=True, backward=True):
  """NHWC x HWIO convolution with explicit padding ((top, bottom), (left, right)) and `groups` groups.

  With `measure=False`, 'auto' takes the recorded default rather than timing the layer (for initialisation,
  where any implementation will do). `backward=False` (the model in eval mode) makes 'auto' time the forward
  alone: the fastest forward+backward is often not the fastest forward (the stem: 180 vs 227 ms fwd+bwd for
  'kernel' vs 'xla', but 113 vs 91 ms forward; batch 32, 2-core AVX2, benchmarks/conv_layers.py).
  """
  if impl not in IMPLS:
    raise ValueError(f"unknown conv impl {impl!r}; choose one of {IMPLS}")
  strides, padding = tuple(strides), tuple(map(tuple, padding))
  if impl == "auto":
    impl = _auto(x, kernel, strides, padding, groups, measure, backward=backward)
  return _IMPL_FNS[impl](x, kernel, strides, padding, groups)


# 'auto' on CPU times these per layer shape (cpu/autotune.py) and keeps the fastest, adding 'kernel' where our
# kernels cover the layer. XLA's own grouped conv is not a candidate: its backward takes seconds per layer
# (22 s for 56x56x128 with 32 groups, batch 32), far from the others. Other backends run 'xla' (cuDNN, the TPU
# convolution unit): not measured (no accelerator was available).
_CPU_CANDIDATES = {"grouped": ("blockdiag", "matmul"), "1x1": ("matmul", "xla"), "dense": ("xla", "matmul")}
# The recorded defaults where nothing is timed (measuring off, several processes): the fastest forward+backward
# per layer on the 2-core AVX-512 machine (docs/performance.md): grouped 56x56x128 kernel 33 ms vs blockdiag
# 103; 1x1 56x56 256->128 kernel 50 vs matmul 63 (XLA's conv 490); the 7x7 stem: im2col costs more than it saves.
_CPU_DEFAULTS = {"grouped": "kernel", "1x1": "kernel", "dense": "xla"}
_KERNEL_FALLBACK = {"grouped": "blockdiag", "1x1": "matmul"}  # 'kernel' on layers the kernels do not cover


def _kind(kernel_shape, groups):
  return "grouped" if groups > 1 else "1x1" if tuple(kernel_shape[:2]) == (1, 1) else "dense"


def _auto(x, kernel, strides, padding, groups, measure=True, backend=None, backward=True):
  """'xla' off the CPU; on the CPU the fastest candidate for this layer, measured (cpu/autotune.py)."""
  if (backend or jax.default_backend()) != "cpu":
    return "xla"
  kind = _kind(kernel.shape, groups)
  impls = list(_CPU_CANDIDATES[kind])
  if cpu.conv_op(x, kernel, strides, padding, groups) is not None:
    impls.insert(0, "kernel")
  fns = {impl: functools.partial(_IMPL_FNS[impl], strides=strides, padding=padding, groups=groups)
         for impl in impls}
  default = _CPU_DEFAULTS[kind] if _CPU_DEFAULTS[kind] in impls else impls[0]
  with contextlib.nullcontext() if measure else cpu.autotune.using_table():
    return cpu.autotune.choose(f"conv {kind} stride{strides[0]} pad{padding[0][0]} groups{groups}", fns,
                               (x, kernel), default, backward=backward)


def _xla(x, kernel, strides, padding, groups):
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


def _blockdiag(x, kernel, strides, padding, groups):
  """One dense conv per super-group, each with a block-diagonal kernel."""
  kernels = _supergroup_kernels(kernel, groups)
  xs = jnp.split(x, len(kernels), axis=-1)
  return _concat([_xla(xj, kj, strides, padding, 1) for xj, kj in zip(xs, kernels)])


def _matmul(x, kernel, strides, padding, groups):
  """im2col then one 2D matmul per super-group (block-diagonal kernel)."""
  kh, kw = kernel.shape[:2]
  kernels = _supergroup_kernels(kernel, groups)
  outs = []
  for xj, kj in zip(jnp.split(x, len(kernels), axis=-1), kernels):
    patches = _im2col(xj, (kh, kw), strides, padding)               # (B, Ho, Wo, kh*kw*cin)
    b, ho, wo, k = patches.shape
    # A 2D dot, so that autodiff's kernel gradient contracts one dimension (B*Ho*Wo): XLA CPU runs that as a
    # transposed-operand GEMM, whereas contracting (B, Ho, Wo) first copies dy into a transposed layout.
    y = jnp.dot(patches.reshape(b * ho * wo, k), kj.reshape(k, kj.shape[-1]))
    outs.append(y.reshape(b, ho, wo, -1))
  return _concat(outs)


def _im2col(x, kernel_size, strides, padding):
  """(B, Ho, Wo, kh*kw*C) patches, tap-major then channel, matching an HWIO kernel flattened over HWI."""
  x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
  (kh, kw), (sh, sw) = kernel_size, strides
  ho, wo = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
  taps = [x[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw] for i in range(kh) for j in range(kw)]
  return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)


def _supergroup_kernels(kernel, groups):
  """Splits a grouped HWIO kernel into dense block-diagonal kernels, one per super-group of channels."""
  if groups == 1:
    return [kernel]
  kh, kw, cin, cout = kernel.shape
  per_super = _groups_per_supergroup(cin, groups)
  num_super, out_per_group = groups // per_super, cout // groups
  k = kernel.reshape(kh, kw, cin, num_super, per_super, out_per_group)
  eye = jnp.eye(per_super, dtype=kernel.dtype)
  dense = jnp.einsum("hwcjko,kl->jhwlcko", k, eye)  # [.., l, c, k, o] = kernel of group k if l == k else 0
  return list(dense.reshape(num_super, kh, kw, per_super * cin, per_super * out_per_group))


def _groups_per_supergroup(in_per_group, groups):
  """Groups per super-group for 'blockdiag'/'matmul': a divisor of `groups`, as many as fit the width.

  Each super-group wastes (width / group size) x the FLOPs of the grouped conv but runs as one dense op.
  Measured best on CPU (docs/performance.md): 16 channels wide for groups of 4 or 8, 32 for groups of 16,
  a single group from 32 channels up.
  """
  width = max(in_per_group, 16 if in_per_group < 16 else 32)
  return max(k for k in range(1, groups + 1) if groups % k == 0 and k * in_per_group <= width)


def _concat(ys):
  return ys[0] if len(ys) == 1 else jnp.concatenate(ys, axis=-1)


def _kernel(x, kernel, strides, padding, groups):
  """Our CPU kernels where they apply: grouped convs (conv_kernel.py) and 1x1 convs (matmul_kernel.py).
  Other layers, and shapes the kernels do not cover, run as 'auto' would without them; a kernel that cannot be
  built here is an error that says why."""
  if jax.default_backend() != "cpu":
    raise ValueError(f"conv impl 'kernel' is a CPU kernel; on {jax.default_backend()} use 'auto' or 'xla'")
  cpu.load()  # raises KernelUnavailable, saying why, where the kernels cannot be built
  kind = _kind(kernel.shape, groups)
  fast = cpu.conv_op(x, kernel, strides, padding, groups)
  if fast is not None:
    return fast(x, kernel)
  impl = _KERNEL_FALLBACK.get(kind) or _CPU_DEFAULTS[kind]
  return _IMPL_FNS[impl](x, kernel, strides, padding, groups)


_IMPL_FNS = {"xla": _xla, "blockdiag": _blockdiag, "matmul": _matmul, "kernel": _kernel}

HE_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # torchvision's conv init


class Conv(nn.Module):
  """nn.Conv-compatible convolution (explicit padding, optional groups) with a selectable implementation."""
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0))
  feature_group_count: int = 1
  use_bias: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Callable = HE_FAN_OUT
  bias_init: Callable = nn.initializers.zeros
  impl: str = "auto"
  backward: bool = True             # False where no gradient is taken (eval): 'auto' times the forward only

  @nn.compact
  def __call__(self, x):
    in_features = x.shape[-1]
    if in_features % self.feature_group_count or self.features % self.feature_group_count:
      raise ValueError(
          f"groups={self.feature_group_count} must divide both input ({in_features}) and output "
          f"({self.features}) channels")
    kernel_shape = (*self.kernel_size, in_features // self.feature_group_count, self.features)
    kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    y = conv_general(x, kernel, self.strides, self.padding, self.feature_group_count, self.impl,
                     measure=not self.is_initializing(), backward=self.backward)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(y.dtype)
    return y
