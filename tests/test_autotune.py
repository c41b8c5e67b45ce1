"""'auto' measures on the machine it runs on: it times the candidates, keeps the fastest, caches the choice,
never replaces a recorded one, and says why for every layer (summary --explain)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from resnext_jax.cpu import autotune

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def measuring(monkeypatch, tmp_path):
  """Timing on (the suite runs with recorded defaults), a fresh cache, an empty in-process memory."""
  monkeypatch.setenv("RESNEXT_JAX_AUTOTUNE", "on")
  monkeypatch.setattr(autotune, "cache_path", lambda: str(tmp_path / "autotune.json"))
  monkeypatch.setattr(autotune, "_memory", {})
  return tmp_path / "autotune.json"


def _candidates():
  """'slow' does the same work 40 times over: any honest timing ranks it last."""
  fast = lambda x: jnp.tanh(x)
  def slow(x):
    for _ in range(40):
      x = jnp.tanh(x @ jnp.eye(x.shape[-1], dtype=x.dtype))
    return x
  return {"slow": slow, "fast": fast}


def test_times_the_candidates_and_keeps_the_fastest(measuring):
  x = jax.ShapeDtypeStruct((64, 128), jnp.float32)
  with autotune.explain() as log:
    assert autotune.choose("toy", _candidates(), (x,), default="slow") == "fast"
    assert autotune.choose("toy", _candidates(), (x,), default="slow") == "fast"
  assert log[0]["reason"] == "measured now" and log[0]["ms"]["slow"] > log[0]["ms"]["fast"] > 0
  assert log[1]["reason"] == "measured earlier in this process"
  assert list(json.loads(measuring.read_text()).values()) == ["fast"]


def test_candidates_compile_with_the_timing_options(measuring, monkeypatch):
  """The layer programs take options.timing_options(): an option XLA rejects there fails the timing."""
  monkeypatch.setattr(autotune.options, "timing_options", lambda: {"xla_cpu_use_fusion_emitters": "NOT_A_BOOL"})
  with pytest.raises(Exception, match="xla_cpu_use_fusion_emitters"):
    autotune.choose("toy", _candidates(), (jax.ShapeDtypeStruct((64, 128), jnp.float32),), default="slow")


@pytest.mark.parametrize("shape, images", [
    ((64, 16, 16, 64), 16),    # 256 pixels: 16 images make MIN_PIXELS
    ((64, 4, 4, 256), 64),     # a small map: the whole batch
    ((32, 56, 56, 128), 8),    # a large map: MIN_IMAGES
    ((4, 4, 4, 256), 4),       # never more than the batch
    ((64, 128), 8),            # not an image: MIN_IMAGES
])
def test_small_maps_are_timed_on_more_images(shape, images):
  assert autotune.timing_images([jax.ShapeDtypeStruct(shape, jnp.float32)]) == images


def test_the_timed_programs_take_the_cut_batch(measuring, monkeypatch):
  """The candidates compile (and run) for timing_images() of the batch; unbatched arguments keep their shape."""
  shapes = []
  compile_ = autotune._compile  # pylint: disable=protected-access
  monkeypatch.setattr(autotune, "_compile", lambda fn, ops, bwd: shapes.append([o.shape for o in ops]) or
                      compile_(fn, ops, bwd))
  x, w = jax.ShapeDtypeStruct((64, 4, 4, 16), jnp.float32), jax.ShapeDtypeStruct((16,), jnp.float32)
  candidates = {"slow": lambda x, w: _candidates()["slow"](x * w), "fast": lambda x, w: jnp.tanh(x * w)}
  assert autotune.choose("toy map", candidates, (x, w), default="slow") == "fast"
  assert shapes == [[(64, 4, 4, 16), (16,), (64, 4, 4, 16)]] * 2  # x, w and the cotangent, whole batch
  shapes.clear()
  autotune.choose("toy map", candidates, (jax.ShapeDtypeStruct((64, 32, 32, 16), jnp.float32), w), default="slow")
  assert shapes == [[(8, 32, 32, 16), (16,), (8, 32, 32, 16)]] * 2


def test_a_recorded_choice_is_used_and_never_replaced(measuring):
  """Another process (or an earlier run) recorded 'slow': this one takes it, so processes agree."""
  x = jax.ShapeDtypeStruct((64, 128), jnp.float32)
  signature = autotune._signature("toy", (x,), True)  # pylint: disable=protected-access
  measuring.write_text(json.dumps({signature: "slow"}))
  with autotune.explain() as log:
    assert autotune.choose("toy", _candidates(), (x,), default="fast") == "slow"
  assert log[0]["reason"] == "measured on this machine before (cache)"
  assert autotune._record(signature, "fast") == "slow"  # pylint: disable=protected-access
  assert json.loads(measuring.read_text()) == {signature: "slow"}


def test_switched_off_the_recorded_default_is_used_and_nothing_is_timed(measuring, monkeypatch):
  x = jax.ShapeDtypeStruct((64, 128), jnp.float32)
  with autotune.using_table():
    assert autotune.choose("toy", _candidates(), (x,), default="slow") == "slow"
  monkeypatch.setenv("RESNEXT_JAX_AUTOTUNE", "off")
  assert autotune.choose("toy", _candidates(), (x,), default="slow") == "slow"
  assert not measuring.exists()


def test_explain_names_every_layer_and_a_second_process_times_nothing(tmp_path):
  """`summary --explain` in a fresh cache times each layer; run again, every choice comes from the cache."""
  env = dict(os.environ, RESNEXT_JAX_AUTOTUNE="on", RESNEXT_JAX_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "resnext_jax.summary", "resnext11_4x16d", "--explain", "--batch-size", "4"]
  first = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
  assert first.returncode == 0, first.stderr[-3000:]
  rows = [l for l in first.stdout.splitlines() if l.startswith(("conv1", "bn1", "layer"))]
  assert any(l.startswith("layer1_0/conv2 ") and "conv grouped" in l for l in rows), first.stdout
  assert any(l.startswith("layer3_0/bn3 ") and "batch_norm train" in l for l in rows), first.stdout
  assert "measured now" in first.stdout
  second = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "measured now" not in second.stdout and "(cache)" in second.stdout
  layer_op_choice = lambda out: [l[:74] for l in out.splitlines() if l.startswith(("conv1", "bn1", "layer"))]
  assert layer_op_choice(second.stdout) == layer_op_choice(first.stdout)  # same layers, same choices


def test_a_measured_model_computes_what_the_recorded_defaults_compute(measuring):
  """Whatever 'auto' picked, the model's outputs and gradients are the same function."""
  from resnext_jax import models  # pylint: disable=g-import-not-at-top
  model = models.create_model("resnext11_4x16d", num_classes=10)
  x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
  variables = model.init(jax.random.key(0), x)
  def loss(params):
    logits, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
    return jnp.sum(logits * jnp.arange(10.0))
  measured = jax.jit(jax.value_and_grad(loss))(variables["params"])
  with autotune.using_table():
    recorded = jax.jit(jax.value_and_grad(loss))(variables["params"])
  for a, b in zip(jax.tree.leaves(measured), jax.tree.leaves(recorded)):
    assert jnp.allclose(a, b, rtol=2e-4, atol=2e-4)
  assert measuring.exists()


def test_eval_mode_layers_are_chosen_by_their_forward_alone():
  """The eval step takes no gradient: its convs and max pool are decided on forward time ('fwd' signatures),
  the train step's on forward+backward, so each gets its own fastest implementation."""
  from resnext_jax import models  # pylint: disable=g-import-not-at-top
  model = models.create_model("resnext11_4x16d", num_classes=10)
  x = jnp.zeros((2, 32, 32, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  def signatures(train):
    with autotune.explain() as log:
      jax.eval_shape(lambda v: model.apply(v, x, train=train, mutable=["batch_stats"]), variables)
    return [d["signature"] for d in log if d["op"].startswith(("conv", "max_pool"))]
  eval_sigs, train_sigs = signatures(False), signatures(True)
  assert eval_sigs and len(eval_sigs) == len(train_sigs)
  assert all(" fwd " in s for s in eval_sigs), eval_sigs
  assert all(" fwd+bwd " in s for s in train_sigs), train_sigs


def test_layers_met_in_a_trace_are_timed_together_then_traced_again(measuring, monkeypatch):
  """measure_layers: a dry pass collects the layers, all candidates of all layers compile before any is timed,
  and the second pass (not the cached dry trace) runs the measured choices; run again, one pass, no timing."""
  events, chosen = [], []
  compile_, seconds = autotune._compile, autotune._seconds  # pylint: disable=protected-access
  monkeypatch.setattr(autotune, "_compile", lambda *a: events.append("compile") or compile_(*a))
  monkeypatch.setattr(autotune, "_seconds", lambda *a: events.append("time") or seconds(*a))

  def layer(x, op):
    chosen.append(autotune.choose(op, _candidates(), (x,), default="slow"))
    return _candidates()[chosen[-1]](x)

  step = jax.jit(lambda x: layer(layer(x, "toy a"), "toy b"))
  x = jnp.ones((64, 128))
  traced = autotune.measure_layers(lambda: step.trace(x))
  assert chosen == ["slow", "slow", "fast", "fast"]  # the dry pass's defaults, then the measured choices
  assert events == ["compile"] * 4 + ["time"] * 2  # each layer's two candidates timed taking turns
  assert "tanh" in str(traced.jaxpr) and "dot_general" not in str(traced.jaxpr)
  assert "dot_general" not in str(step.trace(x).jaxpr)  # the dry trace is not what a later call reuses
  assert len(json.loads(measuring.read_text())) == 2

  events.clear(), chosen.clear()
  autotune.measure_layers(lambda: jax.jit(lambda x: layer(x, "toy a")).trace(x))
  assert chosen == ["fast"] and not events  # measured before: a single pass


def test_layers_a_job_runs_on_few_images_are_timed_only_where_it_pays(measuring, monkeypatch):
  """timed_if_it_pays: a layer the job runs on a handful of images keeps its recorded default (recorded as
  untimed, so the same job run again weighs nothing), one it runs on many is timed; a job that runs the layer
  on more images, or one that always runs it, times it."""
  events, chosen = [], []
  compile_ = autotune._compile  # pylint: disable=protected-access
  monkeypatch.setattr(autotune, "_compile", lambda *a: events.append("compile") or compile_(*a))

  def layer(x, op):
    chosen.append(autotune.choose(op, _candidates(), (x,), default="slow"))
    return _candidates()[chosen[-1]](x)

  def job(eval_images, eval_op="toy eval", train_op="toy train"):
    events.clear(), chosen.clear()
    x = jnp.ones((64, 128))
    def trace():
      traced = [jax.jit(lambda x: layer(x, train_op)).trace(x)]
      with autotune.timed_if_it_pays(images=eval_images):
        traced.append(jax.jit(lambda x: layer(x, eval_op)).trace(x))
      return traced
    with autotune.explain() as log:
      autotune.measure_layers(trace)
    return log

  log = job(eval_images=1)  # ~1 us per image in 'toy train': far less than timing 'toy eval' costs
  assert chosen == ["slow", "slow", "fast", "slow"] and events == ["compile"] * 2, (chosen, events)
  assert any("not timed" in d["reason"] and d["op"] == "toy eval" for d in log), log
  table = json.loads(measuring.read_text())
  assert [table[k] for k in table if k.startswith("untimed for 1 images toy eval ")] == ["slow"], table

  job(eval_images=1)  # the same job again: one pass, nothing timed or weighed
  assert chosen == ["fast", "slow"] and not events, (chosen, events)

  monkeypatch.setattr(autotune, "_memory", {})
  x = jax.ShapeDtypeStruct((64, 128), jnp.float32)
  assert autotune.choose("toy eval", _candidates(), (x,), default="slow") == "fast"  # a step that always runs it

  job(eval_images=10**9, eval_op="toy eval big", train_op="toy train 2")  # more time in it than timing costs
  assert chosen[-1] == "fast" and events == ["compile"] * 4, (chosen, events)

  job(eval_images=1, eval_op="toy eval small", train_op="toy train 3")
  assert chosen[-1] == "slow"
  job(eval_images=2, eval_op="toy eval small", train_op="toy train 3")  # more images than weighed before
  assert chosen[-1] == "fast" and events == ["compile"] * 2, (chosen, events)
