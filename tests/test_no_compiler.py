"""Without a C++ compiler the whole model falls back to portable XLA: 'auto' initialises, applies and
differentiates like conv_impl='xla', and no compiled program calls one of our kernels."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# An ImageNet-stem ResNeXt (7x7/2 conv, max pool), grouped 3x3 convs of 4 groups, 1x1 convs and batch norms
# with channels in multiples of 16: every layer is of a kind our kernels would take if they could be built.
_CODE = """
import jax, jax.numpy as jnp, numpy as np
from resnext_jax import cpu, models
assert not cpu.available()
x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
cotangent = jax.random.normal(jax.random.key(1), (4, 10))
results = {}
for impl in ("auto", "xla"):
  model = models.create_model("resnext50_32x4d", num_classes=10, stage_sizes=(1, 1), planes=(16, 32), stem_width=16,
                              cardinality=4, base_width=64, conv_impl=impl)
  variables = jax.jit(lambda key: model.init(key, x[:1], train=False))(jax.random.key(2, impl="rbg"))

  def loss(params, batch_stats, x):
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                  mutable=["batch_stats"])
    return jnp.vdot(logits, cotangent), (logits, updates["batch_stats"])

  train = jax.jit(jax.value_and_grad(loss, (0, 2), has_aux=True))
  predict = jax.jit(lambda v, x: model.apply(v, x, train=False))
  args = (variables["params"], variables["batch_stats"], x)
  for fn, fn_args in ((train, args), (predict, (variables, x))):
    hlo = fn.lower(*fn_args).compile().as_text()
    assert "resnext_jax_" not in hlo, [l for l in hlo.splitlines() if "resnext_jax_" in l][:3]
  results[impl] = variables, train(*args), predict(variables, x)
(v_auto, train_auto, eval_auto), (v_xla, train_xla, eval_xla) = results["auto"], results["xla"]
jax.tree.map(np.testing.assert_array_equal, v_auto, v_xla)  # the same parameters from the same key
for got, want in zip(jax.tree.leaves((train_auto, eval_auto)), jax.tree.leaves((train_xla, eval_xla))):
  scale = max(1.0, float(np.max(np.abs(want))))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale)
print("ok")
"""


def test_whole_model_without_a_compiler_equals_xla(tmp_path):
  env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"), RESNEXT_JAX_CACHE=str(tmp_path / "cache"),
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  result = subprocess.run([sys.executable, "-c", _CODE], env=env, capture_output=True, text=True, cwd=REPO,
                          timeout=600)
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
  assert "no-such-compiler" in result.stderr  # it said why it fell back
