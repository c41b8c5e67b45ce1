"""torchvision weights: golden outputs made by torchvision itself (../shared/fixtures) and the CLI."""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from resnext_jax import checkpoint, convert, errors, models
from test_torch_weights import require_torch

FIXTURES = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
WEIGHTS = FIXTURES / "torchvision_resnext_tiny.safetensors"
SIZES = (64, 83, 224)


@pytest.fixture(scope="module")
def golden():
  if not WEIGHTS.exists():
    pytest.fail(f"golden fixtures missing at {FIXTURES} (they ship in shared/ beside the project)")
  return load_file(str(WEIGHTS)), np.load(FIXTURES / "torchvision_resnext_tiny_outputs.npz")


def fixture_model(dtype):
  """torchvision's ResNet(Bottleneck, [1, 1, 1, 1], groups=32, width_per_group=4, num_classes=10)."""
  return models.create_model("resnext50_32x4d", num_classes=10, stage_sizes=(1, 1, 1, 1), dtype=dtype,
                             param_dtype=dtype)


def nhwc(x):
  return x.transpose(0, 2, 3, 1)


def convert_for(model, state_dict, dtype):
  target = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3), dtype)))
  return convert.torchvision_to_flax(state_dict, target=target, dtype=dtype)


def test_reproduces_torchvision_in_float64(golden):
  state_dict, outputs = golden
  with jax.enable_x64(True):
    model = fixture_model(jnp.float64)
    variables = convert_for(model, state_dict, np.float64)
    for size in SIZES:
      logits = model.apply(variables, nhwc(outputs[f"x{size}_nchw"]))
      np.testing.assert_allclose(logits, outputs[f"x{size}_logits"], rtol=0, atol=1e-12)
    feats = model.apply(variables, nhwc(outputs["x64_nchw"]), features=True)
    for stage in ("stem", "layer1", "layer2", "layer3", "layer4"):
      np.testing.assert_allclose(feats[stage], nhwc(outputs[f"x64_{stage}_nchw"]), rtol=0, atol=1e-12)


def test_reproduces_torchvision_in_float32(golden):
  state_dict, outputs = golden
  model = fixture_model(jnp.float32)
  variables = convert_for(model, state_dict, np.float32)
  for size in SIZES:
    logits = model.apply(variables, nhwc(outputs[f"x{size}_nchw"]).astype(np.float32))
    np.testing.assert_allclose(logits, outputs[f"x{size}_logits"], rtol=1e-5, atol=1e-5)
  # Each stage too, as in float64: the logits average layer4 over space, so a stage's output could be wrong
  # (e.g. its pixels permuted) with the logits still right.
  feats = model.apply(variables, nhwc(outputs["x64_nchw"]).astype(np.float32), features=True)
  for stage in ("stem", "layer1", "layer2", "layer3", "layer4"):
    want = nhwc(outputs[f"x64_{stage}_nchw"])
    assert feats[stage].dtype == np.float32 and feats[stage].shape == want.shape, stage
    np.testing.assert_allclose(feats[stage], want, rtol=1e-5, atol=2e-5, err_msg=stage)


_TORCH_TENSORS = """
import jax, numpy as np, torch
from safetensors.numpy import load_file
from resnext_jax import convert
state_dict = load_file({weights!r})
ours = convert.torchvision_to_flax({{k: torch.from_numpy(v.copy()) for k, v in state_dict.items()}})
jax.tree.map(np.testing.assert_array_equal, ours, convert.torchvision_to_flax(state_dict))
print("same")
"""


def test_accepts_torch_tensors():
  require_torch()  # optional dependency: numpy arrays are covered above
  # A fresh process: torch imported beside TensorFlow (which other tests load) crashes.
  result = subprocess.run([sys.executable, "-c", _TORCH_TENSORS.format(weights=str(WEIGHTS))],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0 and result.stdout.split()[-1] == "same", result.stderr[-2000:]


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("layer3.0.conv2.weight"), r"lacks 1 tensor.*'layer3\.0\.conv2\.weight'"),
    (lambda sd: sd.update({"layer1.1.conv1.weight": sd["layer1.0.conv1.weight"]}),
     r"does not, e\.g\. 'layer1\.1\.conv1\.weight'"),
    (lambda sd: sd.update({"layer2.0.bn2.running_var": np.ones(7, np.float16)}),
     r"'layer2\.0\.bn2\.running_var' has shape .*\(7,\).*expects \(256,\)"),
    (lambda sd: sd.update({"layer1.0.se.fc1.weight": np.ones((4, 4), np.float16)}),
     r"unexpected tensor 'layer1\.0\.se\.fc1\.weight'"),
    (lambda sd: sd.update({"conv1.weight": sd["conv1.weight"][0]}), r"'conv1\.weight' has shape"),
])
def test_mismatches_name_the_tensor(golden, edit, message):
  state_dict = dict(golden[0])
  edit(state_dict)
  with pytest.raises(errors.ConversionError, match=message):
    convert_for(fixture_model(jnp.float32), state_dict, np.float32)


def test_cli_writes_an_orbax_checkpoint_that_restores(tmp_path):
  """Round trip on a full-size registry model: Flax -> torchvision names -> CLI -> Orbax -> restore."""
  model = models.create_model("resnext50_32x4d", num_classes=7)
  x = jnp.zeros((1, 224, 224, 3))
  variables = jax.jit(lambda: model.init(jax.random.key(3), x))()
  variables = {"params": variables["params"], "batch_stats": jax.tree.map(
      lambda v: v + jax.random.uniform(jax.random.key(4), v.shape), variables["batch_stats"])}
  state_dict = convert.flax_to_torchvision(variables)
  assert state_dict["layer1.0.conv2.weight"].shape == (128, 4, 3, 3)  # torchvision's OIHW, grouped
  save_file(state_dict, str(tmp_path / "w.safetensors"))
  out = tmp_path / "ckpt"
  assert convert.main(["--arch", "resnext50_32x4d", "--weights", str(tmp_path / "w.safetensors"),
                       "--output", str(out)]) == 0
  target = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  restored = checkpoint.restore(str(out), model_target=dict(target))
  assert restored["step"] == 0 and restored["meta"]["model"] == "resnext50_32x4d"
  assert restored["meta"]["num_classes"] == 7
  jax.tree.map(np.testing.assert_array_equal, restored["model"], variables)


def test_cli_reports_a_wrong_architecture_without_traceback(tmp_path, capsys):
  # The fixture has one block per stage; a real resnext50_32x4d needs 3, 4, 6, 3.
  code = convert.main(["--arch", "resnext50_32x4d", "--weights", str(WEIGHTS), "--output", str(tmp_path)])
  err = capsys.readouterr().err
  assert code == 2
  assert "lacks" in err and "'layer1.1." in err and "Traceback" not in err


def test_cli_reports_missing_file_and_unknown_arch(tmp_path, capsys):
  assert convert.main(["--arch", "resnext50_32x4d", "--weights", str(tmp_path / "none.pth"),
                       "--output", str(tmp_path / "o")]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert convert.main(["--arch", "resnext49", "--weights", str(WEIGHTS), "--output", str(tmp_path / "o")]) == 2
  assert "unknown model 'resnext49'" in capsys.readouterr().err
