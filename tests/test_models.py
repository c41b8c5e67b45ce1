"""The model zoo: parameter counts, shapes, BN updates, precision and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnext_jax import models
from resnext_jax.layers.conv import Conv

# Published figures: torchvision 0.29 model cards, and the paper (Table 4 and Table 7) in millions.
TORCHVISION_PARAMS = {
    "resnet50": 25_557_032, "resnet101": 44_549_160, "resnet152": 60_192_808,
    "resnext50_32x4d": 25_028_904, "resnext101_32x8d": 88_791_336, "resnext101_64x4d": 83_455_272,
}
PAPER_PARAMS_M = {"resnext101_32x4d": 44.2, "resnext29_8x64d": 34.4, "resnext29_16x64d": 68.1}


def expected_params(m):
  """An independent count from the architecture's definition (paper Sec. 3 / torchvision's Bottleneck)."""
  k = 3 if m.stem == "cifar" else 7
  total = k * k * 3 * m.stem_width + 2 * m.stem_width
  cin = m.stem_width
  for i, (blocks, planes) in enumerate(zip(m.stage_sizes, m.planes)):
    width, out = planes * m.base_width // 64 * m.cardinality, 4 * planes
    for j in range(blocks):
      total += cin * width + 2 * width                      # conv1 + bn1
      total += 9 * (width // m.cardinality) * width + 2 * width  # grouped conv2 + bn2
      total += width * out + 2 * out                        # conv3 + bn3
      if j == 0 and (i > 0 or cin != out):
        total += cin * out + 2 * out                        # projection shortcut
      cin = out
  return total + cin * m.num_classes + m.num_classes


def param_count(model, size):
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
  return sum(x.size for x in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("name", models.list_models())
def test_param_count_of_every_model(name):
  model = models.create_model(name)
  n = param_count(model, 32 if model.stem == "cifar" else 224)
  assert n == expected_params(model)
  if name in TORCHVISION_PARAMS:
    assert n == TORCHVISION_PARAMS[name]
  if name in PAPER_PARAMS_M:
    assert abs(n / 1e6 - PAPER_PARAMS_M[name]) < 0.1


def test_table2_family_has_resnet50_complexity():
  """Paper Table 2: C x d = 1x64, 2x40, 4x24, 8x14, 32x4 keep about ResNet-50's parameters."""
  counts = [param_count(models.create_model(f"resnext50_{c}"), 224)
            for c in ("1x64d", "2x40d", "4x24d", "8x14d", "32x4d")]
  assert counts[0] == TORCHVISION_PARAMS["resnet50"]
  assert all(abs(n - 25.5e6) < 0.6e6 for n in counts), counts


def test_widths_follow_the_paper():
  model = models.create_model("resnext50_8x14d", stage_sizes=(1, 1, 1, 1), num_classes=3)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))["params"]
  # d = floor(planes * 14 / 64): 14, 28, 56, 112 per group; group conv width 8 * d.
  for stage, d in zip(range(1, 5), (14, 28, 56, 112)):
    assert shapes[f"layer{stage}_0"]["conv2"]["kernel"].shape == (3, 3, d, 8 * d)
  assert "downsample_0" in shapes["layer1_0"]  # 64 -> 256 channels changes shape


def tiny(name="resnext50_32x4d", **kw):
  """ResNeXt-50's layout with one block per stage and narrow planes: the same code paths, fast on CPU."""
  return models.create_model(name, num_classes=5, stage_sizes=(1, 1, 1, 1), planes=(16, 32, 64, 128),
                             stem_width=16, cardinality=8, base_width=16, **kw)


@pytest.fixture(scope="module")
def tiny_setup():
  """One initialised tiny model shared by the tests below (XLA:CPU compiles dominate their cost)."""
  model = tiny()
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3)) * 2.0 + 1.0
  return model, x, jax.jit(model.init)(jax.random.key(0, impl="rbg"), x)


def test_train_mode_updates_batch_stats_with_torch_momentum(tiny_setup):
  model, x, variables = tiny_setup
  logits, updates = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables)
  assert logits.shape == (4, 5)
  # The stem's BN sees conv1's output; running mean moves 10% of the way to the batch mean (PyTorch 0.1).
  stem = jax.lax.conv_general_dilated(x, variables["params"]["conv1"]["kernel"], (2, 2), ((3, 3), (3, 3)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  new_mean = updates["batch_stats"]["bn1"]["mean"]
  np.testing.assert_allclose(new_mean, 0.1 * stem.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"], updates["batch_stats"])
  assert all(jax.tree.leaves(changed))
  # Eval mode leaves them alone and does not depend on the batch.
  apply = jax.jit(model.apply)
  np.testing.assert_allclose(apply(variables, x[:1]), apply(variables, x)[:1], rtol=1e-5, atol=1e-5)


def test_bfloat16_forward_close_to_float32(tiny_setup):
  f32, x, variables = tiny_setup
  bf16 = tiny(dtype=jnp.bfloat16)
  out32, out16 = jax.jit(f32.apply)(variables, x), jax.jit(bf16.apply)(variables, x)
  assert out16.dtype == jnp.float32  # logits come back in float32
  assert jax.tree.leaves(jax.eval_shape(bf16.init, jax.random.key(0), x))[0].dtype == jnp.float32
  rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
  assert rel < 0.05, rel


def test_zero_init_last_bn_zeroes_every_block_s_last_bn_scale():
  def bn3_scales(**kw):
    model = models.create_model("resnext11_4x16d", stage_sizes=(2,), planes=(8,), stem_width=8, **kw)
    params = jax.jit(model.init)(jax.random.key(0, impl="rbg"), jnp.zeros((1, 8, 8, 3)))["params"]
    return [params[f"layer1_{j}"]["bn3"]["scale"] for j in (0, 1)] + [params["layer1_0"]["bn2"]["scale"]]
  *last, other = bn3_scales(zero_init_last_bn=True)
  assert not any(jnp.any(s) for s in last) and jnp.all(other == 1)
  assert all(jnp.all(s == 1) for s in bn3_scales())  # default off, as torchvision


def test_features_are_stage_outputs_of_the_classifier_path(tiny_setup):
  model, _, variables = tiny_setup
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  feats = jax.jit(lambda v: model.apply(v, x, features=True))(variables)
  assert {k: v.shape for k, v in feats.items()} == {
      "stem": (2, 16, 16, 16), "layer1": (2, 16, 16, 64), "layer2": (2, 8, 8, 128),
      "layer3": (2, 4, 4, 256), "layer4": (2, 2, 2, 512)}
  head = variables["params"]["fc"]
  logits = feats["layer4"].mean(axis=(1, 2)) @ head["kernel"] + head["bias"]
  np.testing.assert_allclose(logits, jax.jit(model.apply)(variables, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [33, 47])
def test_odd_input_sizes_give_torchvision_output_sizes(size):
  feats = jax.eval_shape(lambda: tiny().init_with_output(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), features=True)[0])
  # torchvision: floor((n + 2*3 - 7) / 2) + 1 for conv1, then floor((n + 2 - 3) / 2) + 1 for the pool.
  n = (size - 1) // 2 + 1
  n = (n - 1) // 2 + 1
  assert feats["stem"].shape[1:3] == (n, n)
  for stage in (2, 3, 4):
    n = (n - 1) // 2 + 1
    assert feats[f"layer{stage}"].shape[1:3] == (n, n)


def test_unknown_model_lists_the_choices():
  with pytest.raises(ValueError, match=r"unknown model 'resnext51'.*resnext50_32x4d"):
    models.create_model("resnext51")


def test_unknown_option_lists_the_fields():
  with pytest.raises(ValueError, match=r"unknown model option.*'groups'.*cardinality"):
    models.create_model("resnext50_32x4d", groups=32)


@pytest.mark.parametrize("overrides, message", [
    (dict(base_width=0), "width per group"),
    (dict(cardinality=0), "cardinality must be >= 1"),
    (dict(stage_sizes=(3, 0, 6, 3)), "stage_sizes must be positive"),
    (dict(stage_sizes=(1, 1, 1, 1, 1)), "5 stages need as many planes"),
    (dict(block_form="fig3d"), "unknown block_form"),
])
def test_impossible_shapes_raise(overrides, message):
  with pytest.raises(ValueError, match=message):
    models.create_model("resnext50_32x4d", **overrides)


def test_cardinality_must_divide_the_channels():
  conv = Conv(features=100, kernel_size=(3, 3), feature_group_count=32)
  with pytest.raises(ValueError, match="groups=32 must divide"):
    conv.init(jax.random.key(0), jnp.zeros((1, 8, 8, 128)))


def test_init_never_asks_for_the_cpu_kernels(monkeypatch):
  """Initialising traces XLA's ops only: every impl makes the same parameters, and a job's init then runs
  while the kernels' first-use build is still going (train.py starts it in the background)."""
  from resnext_jax.cpu import build  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(build, "load", lambda: pytest.fail("init asked for the CPU kernels"))
  x = jnp.zeros((2, 32, 32, 3))
  variables = models.create_model("resnext50_32x4d", num_classes=10).init(jax.random.key(0), x)
  portable = models.create_model("resnext50_32x4d", num_classes=10, conv_impl="xla").init(jax.random.key(0), x)
  assert jax.tree.all(jax.tree.map(lambda a, b: a.shape == b.shape and bool(jnp.all(a == b)), variables, portable))
