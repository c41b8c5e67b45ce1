"""The throughput benchmark's command line: a tiny model, one timed step, the JSON contract."""

import json
import subprocess
import sys

import pytest

from resnext_jax import models, summary
from test_torch_weights import require_torch


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
  # Achieved FLOP/s from the model's own multiply-adds at this size, for either mode (3 forwards per train image).
  flops = summary.flops_per_image(models.create_model("resnext11_4x16d"), 16, mode)
  assert result["achieved_tflops"] == pytest.approx(result["images_per_sec"] * flops / 1e12, rel=1e-3)


def test_compare_torch_reports_a_ratio():
  require_torch("torchvision")  # not imported here: torch beside TensorFlow crashes
  result = subprocess.run([sys.executable, "-m", "resnext_jax.benchmark", "--model", "resnext50_32x4d",
                           "--batch-size", "2", "--image-size", "64", "--steps", "1", "--mode", "eval",
                           "--compare-torch"], capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["torch_images_per_sec"] > 0
  assert out["ratio_vs_torch"] == pytest.approx(out["images_per_sec"] / out["torch_images_per_sec"], rel=1e-2)
