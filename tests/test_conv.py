"""Every convolution implementation equals XLA's native one, in values and gradients, and shares its params."""

import functools
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnext_jax.layers import conv
from resnext_jax import cpu
from resnext_jax.cpu import grouped_conv as conv_kernel, matmul as matmul_kernel, options

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_IMPLS = [impl for impl in conv.IMPLS if impl != "xla"]

# (kernel, stride, padding, size, in channels, out channels, groups): odd and even sizes, strides 1 and 2,
# cardinalities 1 (dense), 2, 4 and 8, and the ResNeXt layers' kinds: 1x1, grouped 3x3, 7x7/2 stem.
CASES = [
    (3, 1, 1, 7, 16, 16, 4),
    (3, 2, 1, 8, 16, 16, 4),
    (3, 2, 1, 9, 32, 32, 8),
    (3, 1, 1, 6, 64, 32, 2),
    (3, 2, 1, 7, 64, 64, 8),    # 8 channels per group: several groups per super-group
    (3, 1, 1, 5, 64, 64, 4),    # 16 and 32 channels per group: the kernel's wide-group path
    (3, 1, 1, 16, 16, 16, 4),   # rows of 16+: the kernel's forward without its padded copy (narrower: with)
    (3, 1, 1, 16, 32, 32, 2),
    (3, 2, 1, 6, 64, 64, 2),
    (3, 1, 1, 6, 32, 32, 16),   # 2 and 1 (depthwise) channels per group
    (3, 2, 1, 5, 16, 16, 16),
    (1, 1, 0, 6, 16, 24, 1),    # 24 output channels: not the 1x1 kernel's (multiples of 16)
    (1, 2, 0, 7, 16, 32, 1),
    (1, 1, 0, 5, 80, 112, 1),   # the 1x1 kernel's edge tiles: 60 rows (10 x 6), 112 = 64 + 48 columns
    (1, 2, 0, 9, 48, 16, 1),
    (1, 1, 0, 16, 32, 48, 1),   # 544 rows: the kernel gradient sums two blocks of rows, in two shares
    (1, 1, 0, 3, 528, 16, 1),   # depth 528: the forward's second pass accumulates onto the first
    (7, 2, 3, 10, 3, 8, 1),
]


def _inputs(case, dtype=jnp.float32):
  k, _, _, size, cin, cout, groups = case
  kx, kw = jax.random.split(jax.random.key(sum(case)))
  x = jax.random.normal(kx, (2, size, size + 1, cin))       # H != W catches swapped axes
  w = jax.random.normal(kw, (k, k, cin // groups, cout)) * (k * k * cin // groups) ** -0.5
  return x.astype(dtype), w.astype(dtype)


def _conv_fn(case, impl):
  _, stride, pad, _, _, _, groups = case
  return functools.partial(conv.conv_general, strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                           groups=groups, impl=impl)


@functools.lru_cache(maxsize=None)
def _results(case, impl, dtype=jnp.float32):
  """Output, input and kernel gradients of a loss weighting each output differently (a sum hides transposes).

  The fast implementations are compiled with the XLA options the train and eval steps use; the native 'xla'
  reference with XLA's defaults, so that the options themselves are checked too.
  """
  def forward_and_grads(x, w):
    y, vjp = jax.vjp(_conv_fn(case, impl), x, w)
    cotangent = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape).astype(y.dtype)
    return y, *vjp(cotangent)
  options = {} if impl == "xla" else cpu.compiler_options()
  return jax.jit(forward_and_grads, compiler_options=options)(*_inputs(case, dtype))


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "k{}s{}p{}n{}c{}-{}g{}".format(*c))
def test_matches_xla_float32(impl, case):
  for got, want, name in zip(_results(case, impl), _results(case, "xla"), ("output", "dx", "dkernel")):
    assert got.dtype == jnp.float32
    # Absolute tolerance relative to the largest value: an element that cancels to near zero in a sum of
    # many (the kernel gradient sums over every pixel) keeps the rounding of the large terms it summed.
    atol = 1e-5 * max(1.0, float(np.max(np.abs(want))))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=atol, err_msg=name)


# bfloat16 cases, chosen by value (list positions drift as CASES grows): grouped convs for the grouped kernel,
# 'blockdiag' and 'matmul' per super-group; 1x1 convs for the GEMM kernel and 'matmul' as one dot.
BF16_CASES = {
    "grouped_s2": (3, 2, 1, 8, 16, 16, 4),
    "grouped8_s2": (3, 2, 1, 7, 64, 64, 8),
    "1x1_s2": (1, 2, 0, 7, 16, 32, 1),
    "1x1_edge_tiles": (1, 1, 0, 5, 80, 112, 1),
}
assert all(case in CASES for case in BF16_CASES.values())


@pytest.mark.parametrize("impl", conv.IMPLS)
@pytest.mark.parametrize("case", list(BF16_CASES.values()), ids=list(BF16_CASES))
def test_bfloat16_close_to_float32(impl, case):
  """bfloat16 inputs: output and gradients within bfloat16 rounding (8 bits, sums of <= 144 terms) of float32's;
  'kernel' runs them on our kernels (forward and both gradients)."""
  for got, want, name in zip(_results(case, impl, jnp.bfloat16), _results(case, "xla"), ("output", "dx", "dkernel")):
    assert got.dtype == jnp.bfloat16
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=0.02, atol=0.02 * scale, err_msg=name)
  if impl == "kernel":
    x, w = _inputs(case, jnp.bfloat16)
    hlo = jax.jit(jax.grad(lambda x, w: jnp.sum(_conv_fn(case, "kernel")(x, w).astype(jnp.float32) ** 2),
                           (0, 1))).lower(x, w).as_text()
    kind = "grouped_conv" if case[-1] > 1 else "matmul"
    assert hlo.count(f"custom_call @resnext_jax_{kind}_") == 3, kind  # forward, input and kernel gradients


def test_params_identical_to_nn_conv_and_shared_across_impls():
  """Same parameter tree as flax's nn.Conv; a checkpoint made with one impl gives the same outputs in another."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 16))
  kw = dict(features=32, kernel_size=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), feature_group_count=4,
            use_bias=True)
  reference = nn.Conv(**kw)
  params = reference.init(jax.random.key(1), x)
  want = reference.apply(params, x)
  for impl in conv.IMPLS:
    layer = conv.Conv(impl=impl, **kw)
    assert jax.tree.map(jnp.shape, layer.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape, params)
    np.testing.assert_allclose(layer.apply(params, x), want, rtol=1e-5, atol=1e-5)


def _auto_for(kernel_shape, groups, backend="cpu"):
  """'auto''s choice for a layer of this kernel on a 56x56 input (the suite times nothing: the recorded
  defaults, see conftest.py and tests/test_autotune.py)."""
  x = jax.ShapeDtypeStruct((8, 56, 56, kernel_shape[2] * groups), jnp.float32)
  k = jax.ShapeDtypeStruct(kernel_shape, jnp.float32)
  pad = (kernel_shape[0] // 2,) * 2
  return conv._auto(x, k, (1, 1), (pad, pad), groups, backend=backend)


def test_auto_is_xla_on_accelerators_and_fast_formulations_on_cpu():
  grouped, dense_1x1, stem = (3, 3, 4, 128), (1, 1, 256, 64), (7, 7, 3, 64)
  for backend in ("gpu", "tpu"):
    assert {_auto_for(k, g, backend) for k, g in [(grouped, 32), (dense_1x1, 1), (stem, 1)]} == {"xla"}
  assert cpu.available()  # this machine (and CI) has a C++ compiler: the kernel must build
  assert _auto_for(grouped, 32) == "kernel"
  assert _auto_for(dense_1x1, 1) == "kernel"
  assert _auto_for(stem, 1) == "xla"


def test_compiler_options_only_on_cpu_and_user_flags_win(monkeypatch):
  for backend in ("gpu", "tpu"):
    assert cpu.compiler_options(backend) == {}
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  options = cpu.compiler_options("cpu")
  assert set(options) == {"xla_cpu_experimental_ynn_fusion_type"}
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  assert cpu.compiler_options("cpu") == options
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=individual_dot")
  assert cpu.compiler_options("cpu") == {}


def test_run_once_options_only_on_cpu_and_user_flags_win(monkeypatch):
  """The initialiser's options: cheap code generation on CPU, nothing elsewhere; XLA_FLAGS still win."""
  for backend in ("gpu", "tpu"):
    assert cpu.run_once_options(backend) == {}
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  once = cpu.run_once_options("cpu")
  assert once == {**cpu.compiler_options("cpu"), "xla_cpu_use_fusion_emitters": False,
                  "xla_backend_optimization_level": 0}
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=3")
  assert "xla_backend_optimization_level" not in cpu.run_once_options("cpu")


def test_compiler_options_dropped_where_xla_rejects_them(monkeypatch):
  """An older jaxlib without the (experimental) option trains with XLA's defaults rather than failing."""
  monkeypatch.setattr(options, "_CPU_OPTIONS", {"xla_cpu_experimental_ynn_fusion_type": "NOT_A_FUSION_TYPE"})
  monkeypatch.setattr(options, "_TIMING_OPTIONS", {"xla_cpu_use_fusion_emitters": "NOT_A_BOOL",
                                                   "xla_cpu_enable_fast_math": False})
  assert cpu.compiler_options("cpu") == {}
  assert options.timing_options("cpu") == {"xla_cpu_enable_fast_math": False}  # the one XLA accepts stays


def test_layer_timing_compiles_with_the_steps_options_and_the_faster_emitters(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  assert options.timing_options("cpu") == {**cpu.compiler_options("cpu"), "xla_cpu_use_fusion_emitters": False}
  assert options.timing_options("gpu") == {}
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_fusion_emitters=true")
  assert options.timing_options("cpu") == cpu.compiler_options("cpu")


def test_compiler_options_compile_and_reach_xla():
  """The options parse in this jaxlib (a bad value is a compile error) and change the program: the dense conv
  leaves YNNPACK for XLA's own convolution, while dots and reductions stay library calls."""
  case = CASES[3]
  f = jax.jit(_conv_fn(case, "blockdiag"))
  x, w = _inputs(case)
  library_calls = lambda opts: jax.jit(f, compiler_options=opts).lower(x, w).compile().as_text().count(
      "__ynn_fusion")
  assert library_calls(cpu.compiler_options("cpu")) < library_calls({})
  with pytest.raises(Exception, match="not a valid enum value"):
    jax.jit(f, compiler_options={"xla_cpu_experimental_ynn_fusion_type": "nope"}).lower(x, w).compile()


def test_supergroups_bound_the_wasted_flops():
  assert conv._groups_per_supergroup(4, 32) == 4      # 16-channel super-groups for groups of 4
  assert conv._groups_per_supergroup(8, 32) == 2
  assert conv._groups_per_supergroup(16, 32) == 2
  assert conv._groups_per_supergroup(32, 32) == 1     # one dense conv per group
  assert conv._groups_per_supergroup(4, 1) == 1


def test_rejects_unknown_impl_and_bad_groups():
  x = jnp.zeros((1, 4, 4, 6))
  with pytest.raises(ValueError, match="unknown conv impl"):
    conv.conv_general(x, jnp.zeros((1, 1, 6, 6)), (1, 1), ((0, 0), (0, 0)), 1, impl="nope")
  with pytest.raises(ValueError, match="must divide"):
    conv.Conv(features=6, feature_group_count=4).init(jax.random.key(0), x)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] != 7], ids=lambda c: "k{}s{}p{}n{}c{}-{}g{}".format(*c))
def test_kernel_runs_where_it_applies(case):
  """'kernel' is our custom calls, forward and both gradients: for grouped convs with in = out channels and for
  1x1 convs, channels multiples of 16. Other layers fall back (so the equality tests above cover the kernels,
  not the fallback)."""
  k, _, _, size, cin, cout, groups = case
  x, w = _inputs(case)
  hlo = jax.jit(jax.grad(lambda x, w: jnp.sum(_conv_fn(case, "kernel")(x, w) ** 2), (0, 1))).lower(x, w).as_text()
  applies = cin % 16 == 0 and (cin == cout if groups > 1 else cout % 16 == 0)
  if groups > 1:
    assert conv_kernel.supported(x.shape, w.shape, groups, (1, 1), ((1, 1), (1, 1))) == applies
    targets = {f"resnext_jax_grouped_conv_{t}": 1 for t in ("forward", "input_grad", "kernel_grad")}
  else:
    assert matmul_kernel.supported(x.shape, w.shape, groups, ((0, 0), (0, 0))) == applies
    targets = {"resnext_jax_matmul_forward": 2, "resnext_jax_matmul_kernel_grad": 1}  # forward and input grad
  for target, calls in targets.items():
    assert hlo.count(f"custom_call @{target}(") == (calls if applies else 0), target


def test_kernel_on_a_sharded_batch_stays_sharded_and_matches_xla():
  """Batch sharded over 4 devices: one kernel call per device on its images, the kernel gradients summed over
  devices, no all-gather of activations; values and gradients equal XLA's. A grouped conv, then a 1x1."""
  code = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from resnext_jax import runtime
from resnext_jax.layers import conv
mesh = runtime.make_mesh()
x = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((8, 6, 5, 32)), jnp.float32),
                   NamedSharding(mesh, P("data")))
w = (jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 4, 32)), jnp.float32),
     jnp.asarray(np.random.default_rng(2).standard_normal((1, 1, 32, 16)), jnp.float32) / 4)
def loss(w, x, impl):
  y = conv.conv_general(x, w[0], (2, 2), ((1, 1), (1, 1)), 8, impl)
  return jnp.sum(jnp.sin(conv.conv_general(y, w[1], (1, 1), ((0, 0), (0, 0)), 1, impl)))
fns = {i: jax.jit(jax.value_and_grad(lambda w, x, i=i: loss(w, x, i), (0, 1))) for i in ("auto", "xla")}
(a, (gw, gx)), (b, (hw, hx)) = fns["auto"](w, x), fns["xla"](w, x)
np.testing.assert_allclose(a, b, rtol=1e-5)
for got, want in zip((*gw, gx), (*hw, hx)):
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
assert gx.sharding.spec[0] == "data"
hlo = fns["auto"].lower(w, x).compile().as_text()
assert "all-gather" not in hlo and hlo.count("resnext_jax_grouped_conv_") == 3, hlo
assert hlo.count("resnext_jax_matmul_") == 3, hlo  # forward, input gradient, kernel gradient
print("ok")
"""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_without_a_compiler_auto_falls_back_and_kernel_says_why(tmp_path):
  """No C++ compiler: 'auto' uses blockdiag and trains; forcing 'kernel' names the problem."""
  code = """
import jax, jax.numpy as jnp
from resnext_jax import cpu
from resnext_jax.layers import conv
assert not cpu.available()
x, w = jnp.ones((1, 4, 4, 16)), jnp.ones((3, 3, 4, 16))
from resnext_jax.cpu import autotune
with autotune.using_table():
  assert conv._auto(x, w, (1, 1), ((1, 1), (1, 1)), 4) == "blockdiag"
  assert conv._auto(x, jnp.ones((1, 1, 16, 16)), (1, 1), ((0, 0), (0, 0)), 1) == "matmul"
conv.conv_general(x, w, (1, 1), ((1, 1), (1, 1)), 4)
try:
  conv.conv_general(x, w, (1, 1), ((1, 1), (1, 1)), 4, impl="kernel")
except cpu.KernelUnavailable as e:
  print(e)
"""
  env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), RESNEXT_JAX_CACHE=str(tmp_path / "cache"),
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "building the CPU kernels" in result.stdout and "no-such-compiler" in result.stdout
  assert result.stderr.count("using the portable XLA implementations") == 1, result.stderr  # said once


def test_damaged_cached_kernel_is_rebuilt(tmp_path):
  """A truncated library in the cache (a build killed mid-copy, a full disk) is rebuilt, not loaded."""
  code = """
import glob, os
from resnext_jax.cpu import build as cpu_kernels
path = cpu_kernels.build()
open(path, "wb").write(b"not a shared library")
assert cpu_kernels.available()
assert os.path.getsize(path) > 1000
print("ok")
"""
  env = dict(os.environ, RESNEXT_JAX_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
