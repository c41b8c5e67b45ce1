"""The throughput benchmark's command line: a tiny model, one timed step, the JSON contract."""

import importlib.util
import json
import subprocess
import sys

import pytest


def run_benchmark(*args):
  result = subprocess.run([sys.executable, "-m", "resnext_jax.benchmark", "--model", "resnext11_4x16d",
                           "--batch-size", "4", "--image-size", "16", "--steps", "1", *args],
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode, impl", [("train", "auto"), ("eval", "xla")])
def test_last_line_is_the_json_result(mode, impl):
  result = run_benchmark("--mode", mode, "--impl", impl)
  assert {k: result[k] for k in ("model", "mode", "batch_size", "impl", "backend")} == {
      "model": "resnext11_4x16d", "mode": mode, "batch_size": 4, "impl": impl, "backend": "cpu"}
  assert result["images_per_sec"] > 0


def test_compare_torch_reports_a_ratio():
  if importlib.util.find_spec("torchvision") is None:  # not imported here: torch beside TensorFlow crashes
    pytest.skip("torchvision not installed (optional dependency; CI has none)")
  result = subprocess.run([sys.executable, "-m", "resnext_jax.benchmark", "--model", "resnext50_32x4d",
                           "--batch-size", "2", "--image-size", "64", "--steps", "1", "--mode", "eval",
                           "--compare-torch"], capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["torch_images_per_sec"] > 0
  assert out["ratio_vs_torch"] == pytest.approx(out["images_per_sec"] / out["torch_images_per_sec"], rel=1e-2)
