"""Our BatchNorm equals flax.linen.BatchNorm: variables, outputs, gradients, running statistics; its CPU
kernels equal its XLA formulation, on one device and on a sharded batch."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnext_jax.layers.batchnorm import BatchNorm

KW = dict(momentum=0.9, epsilon=1e-5)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pair(**kw):
  return BatchNorm(**KW, **kw), nn.BatchNorm(**KW, **kw)


def _init(module, x):
  variables = module.init(jax.random.key(0), x)
  # Non-trivial scale, bias and running statistics, so that every term of the formulas matters.
  c = x.shape[-1]
  rng = np.random.default_rng(0)
  return {"params": {"scale": jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32),
                     "bias": jnp.asarray(rng.normal(size=c), jnp.float32)},
          "batch_stats": {"mean": jnp.asarray(rng.normal(size=c), jnp.float32),
                          "var": jnp.asarray(rng.uniform(0.5, 2, c), jnp.float32)}}, variables


def test_same_variables_outputs_gradients_and_running_statistics():
  x = jax.random.normal(jax.random.key(1), (4, 5, 3, 8)) * 3 + 1
  ours, flax = _pair(use_running_average=False)
  variables, ours_init = _init(ours, x)
  assert jax.tree.map(jnp.shape, ours_init) == jax.tree.map(jnp.shape, flax.init(jax.random.key(0), x))

  def run(module, v, x):
    y, updates = module.apply(v, x, mutable=["batch_stats"])
    return y, updates["batch_stats"]

  (y, stats), (y_ref, stats_ref) = run(ours, variables, x), run(flax, variables, x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for k in ("mean", "var"):
    np.testing.assert_allclose(stats[k], stats_ref[k], rtol=1e-5, atol=1e-6)

  cotangent = jax.random.normal(jax.random.key(2), y.shape)
  loss = lambda m: lambda p, x: jnp.vdot(run(m, {**variables, "params": p}, x)[0], cotangent)
  grads = jax.grad(loss(ours), (0, 1))(variables["params"], x)
  grads_ref = jax.grad(loss(flax), (0, 1))(variables["params"], x)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_running_average_mode_and_bfloat16():
  x = jax.random.normal(jax.random.key(3), (2, 4, 4, 16))
  ours, flax = _pair(use_running_average=True)
  variables, _ = _init(ours, x)
  np.testing.assert_allclose(ours.apply(variables, x), flax.apply(variables, x), rtol=1e-5, atol=1e-5)
  for train in (False, True):
    ours16, flax16 = _pair(use_running_average=not train, dtype=jnp.bfloat16)
    xb = x.astype(jnp.bfloat16)
    y = ours16.apply(variables, xb, mutable=["batch_stats"])[0]
    y_ref = flax16.apply(variables, xb, mutable=["batch_stats"])[0]
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(y.astype(jnp.float32), y_ref.astype(jnp.float32), rtol=0.02, atol=0.05)


def test_initialization_leaves_statistics_untouched():
  x = jnp.full((2, 3, 3, 4), 5.0)
  stats = BatchNorm(**KW).init(jax.random.key(0), x)["batch_stats"]
  np.testing.assert_array_equal(stats["mean"], np.zeros(4))
  np.testing.assert_array_equal(stats["var"], np.ones(4))


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("relu,with_shortcut", [(False, False), (True, False), (True, True), (False, True)])
# 8: below one vector at 16 floats (AVX-512), one at 8 (AVX2), two at 4; 50 = 3 x 16 + 2 = 6 x 8 + 2 = 12 x 4 + 2:
# vectors and a 2-channel scalar tail at every vector width.
@pytest.mark.parametrize("channels", [8, 50])
def test_cpu_kernels_equal_xla(train, relu, with_shortcut, channels):
  """The CPU kernels (impl 'auto' on CPU) equal the XLA formulation: act(BN(x) + shortcut), its gradients
  for x, scale, bias and the shortcut, and the running statistics."""
  x = jax.random.normal(jax.random.key(4), (3, 5, 7, channels)) * 2 + 0.5
  shortcut = jax.random.normal(jax.random.key(5), x.shape) if with_shortcut else None
  cotangent = jax.random.normal(jax.random.key(6), x.shape)
  results = {}
  for impl in ("auto", "xla"):
    module = BatchNorm(**KW, use_running_average=not train, impl=impl)
    variables, _ = _init(module, x)

    def loss(params, x, shortcut):
      y, updates = module.apply({**variables, "params": params}, x, shortcut, relu, mutable=["batch_stats"])
      return jnp.vdot(y, cotangent), (y, updates["batch_stats"])

    fn = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))
    results[impl] = fn(variables["params"], x, shortcut)
    calls = fn.lower(variables["params"], x, shortcut).compile().as_text().count("resnext_jax_batch_norm_")
    assert (calls > 0) == (impl == "auto"), (impl, calls)
  (_, (y, stats)), grads = results["auto"]
  (_, (y_ref, stats_ref)), grads_ref = results["xla"]
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  for k in ("mean", "var"):
    np.testing.assert_allclose(stats[k], stats_ref[k], rtol=1e-5, atol=1e-6)
  assert jax.tree.structure(grads) == jax.tree.structure(grads_ref)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_cpu_kernels_keep_a_sharded_batch_sharded():
  """On 4 devices with the batch sharded: same values and gradients as XLA's formulation, the batch
  statistics are global (psum'd), and nothing gathers the batch."""
  code = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from resnext_jax import runtime
from resnext_jax.layers.batchnorm import BatchNorm
mesh = runtime.make_mesh()
sharded = NamedSharding(mesh, P("data"))
x = jax.device_put(jax.random.normal(jax.random.key(0), (8, 6, 5, 32)) * 2 + 1, sharded)
sc = jax.device_put(jax.random.normal(jax.random.key(1), (8, 6, 5, 32)), sharded)
out = {}
for impl in ("auto", "xla"):
  m = BatchNorm(impl=impl)
  v = m.init(jax.random.key(0), x)
  def loss(p, x, sc):
    y, upd = m.apply({**v, "params": p}, x, sc, True, mutable=["batch_stats"])
    return jnp.sum(jnp.sin(y)), (y, upd)
  fn = jax.jit(jax.value_and_grad(loss, (0, 1, 2), has_aux=True))
  out[impl] = fn(v["params"], x, sc)
  if impl == "auto":
    hlo = fn.lower(v["params"], x, sc).compile().as_text()
    assert "all-gather" not in hlo and "resnext_jax_batch_norm_stats" in hlo and "all-reduce" in hlo, hlo
    assert out[impl][1][1].sharding.spec[0] == "data"
for a, b in zip(jax.tree.leaves(out["auto"]), jax.tree.leaves(out["xla"])):
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
print("ok")
"""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
